"""Who each process is and how it starts: launch environments, the process group, signals, submission."""

import os as _os

#: The parent process when this package was first imported, the earliest moment our code runs. A launching
#: agent (torchrun) that dies later is recognised by the parent changing, whatever the new parent's PID is
#: (in a container, torchrun itself can be PID 1).
PARENT_AT_START = _os.getppid()
