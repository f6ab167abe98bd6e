"""CIFAR-10 as in-memory tensors: the real dataset, its download, and a learnable synthetic stand-in.

The real data is read straight from the standard python-pickle folder ``cifar-10-batches-py``
into one ``(N, 3, 32, 32)`` uint8 tensor per split, so training loops index tensors instead of
decoding PIL images per sample. When the real data is missing and cannot be fetched (offline
cluster nodes are common), every failure surfaces as :class:`DatasetUnavailable` whose message
says how to fix it, including the ``data.synthetic=true`` escape hatch backed by
:func:`synthetic_cifar10`.
"""

from __future__ import annotations

import codecs
import gzip
import http.client
import pickle
import socket
import tarfile
import urllib.error
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from launcher.errors import DatasetUnavailable
from trainers.core.data import TensorSplit

__all__ = ["ArrayDataset", "DatasetUnavailable", "CIFAR10_MEAN", "CIFAR10_STD", "CLASSES", "load_cifar10",
           "download_cifar10", "synthetic_cifar10", "cifar10_folder"]

# Per-channel statistics over all pixels of the 50k training images scaled to [0, 1]. The
# often-quoted std (0.2023, 0.1994, 0.2010) is not this dataset-wide std that Normalize expects.
CIFAR10_MEAN: tuple[float, float, float] = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD: tuple[float, float, float] = (0.24703223, 0.24348513, 0.26158784)
CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_FOLDER_NAME = "cifar-10-batches-py"
_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES: tuple[str, ...] = ("test_batch",)
_META_FILE = "batches.meta"
_ALL_FILES: tuple[str, ...] = _TRAIN_FILES + _TEST_FILES + (_META_FILE,)
_CHANNELS, _SIDE = 3, 32
_PIXELS = _CHANNELS * _SIDE * _SIDE


class ArrayDataset(TensorSplit):
    """A whole image classification split held in memory: ``images`` ``(N, 3, H, W)`` uint8 (CHW) and
    ``labels`` ``(N,)`` int64. Sample ``i`` is ``(images[i], labels[i])``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        # Fail at construction, not deep inside a DataLoader worker, when a producer got it wrong.
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != _CHANNELS:
            raise ValueError(f"images must be (N, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(f"labels must be (N,) int64, got {tuple(labels.shape)} {labels.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        super().__init__(images, labels)

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]


def cifar10_folder(root: str | Path) -> Path:
    """Return the folder holding the python-pickle CIFAR-10 files: ``root / "cifar-10-batches-py"``."""
    return Path(root).expanduser() / _FOLDER_NAME


# ---------------------------------------------------------------------------------------------
# Reading the pickles
# ---------------------------------------------------------------------------------------------


def _cifar10() -> Any:
    """torchvision's CIFAR10 class, for the archive's URL, file name and md5: imported when needed (a download or
    an error message), since importing torchvision costs about 2 s that training on the files does not need."""
    from torchvision.datasets import CIFAR10

    return CIFAR10


def _unavailable_message(folder: Path, problem: str) -> str:
    return (
        f"CIFAR-10 is not usable at {folder}: {problem}. "
        "Fix it in one of three ways: allow the download (`data.download=true`) on a machine with "
        "internet access "
        f"(it fetches {_cifar10().url} and extracts it there); "
        f"put the original python-version files ({', '.join(_ALL_FILES)}) in {folder} yourself; "
        "or train on synthetic CIFAR-shaped data with `data.synthetic=true`."
    )


def _missing_files(folder: Path) -> list[str]:
    return [name for name in _ALL_FILES if not (folder / name).is_file()]


# numpy's array-rebuilding function, reached through a public method instead of a private module.
_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays.

    The CIFAR files are pickles, and a plain ``pickle.load`` would run arbitrary code from a
    tampered download. The real files only reference these globals (Python 2 numpy wrote
    ``numpy.core``; a Python 3 re-save may use ``numpy._core`` and ``_codecs.encode`` for bytes).
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as f:
            # latin1 is what the Python 2 pickles need: it maps their byte strings 1:1.
            entry = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # truncated/corrupt pickles raise a wide variety of exception types
        problem = f"{path.name} could not be read ({type(exc).__name__}: {exc}); it is truncated or corrupt"
        raise DatasetUnavailable(_unavailable_message(path.parent, problem)) from exc
    if not isinstance(entry, dict):
        problem = f"{path.name} holds a {type(entry).__name__}, not a CIFAR batch dict"
        raise DatasetUnavailable(_unavailable_message(path.parent, problem))
    return entry


def _field(entry: dict[Any, Any], key: str) -> Any:
    # Python 2 files give str keys under latin1; a file re-saved by Python 3 keeps bytes keys.
    if key in entry:
        return entry[key]
    return entry.get(key.encode())


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file into ``(n, 3072)`` uint8 rows and ``(n,)`` int64 labels, validated."""
    entry = _unpickle(path)
    data, labels = _field(entry, "data"), _field(entry, "labels")
    problem = None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        problem = f"{path.name} has no uint8 (n, {_PIXELS}) 'data' array"
    elif not isinstance(labels, list) or len(labels) != len(data):
        problem = f"{path.name} has no 'labels' list matching its {len(data)} images"
    elif labels and not all(isinstance(y, int) and 0 <= y < len(CLASSES) for y in labels):
        problem = f"{path.name} has labels outside 0..{len(CLASSES) - 1}"
    if problem is not None:
        raise DatasetUnavailable(_unavailable_message(path.parent, problem))
    return data, np.asarray(labels, dtype=np.int64)


def _check_meta(folder: Path) -> None:
    names = _field(_unpickle(folder / _META_FILE), "label_names")
    if not isinstance(names, list) or len(names) != len(CLASSES):
        problem = f"{_META_FILE} does not list the {len(CLASSES)} class names"
        raise DatasetUnavailable(_unavailable_message(folder, problem))


def load_cifar10(root: str | Path, train: bool) -> ArrayDataset:
    """Load the train (50k) or test (10k) split of CIFAR-10 from ``root / "cifar-10-batches-py"``.

    The folder must hold the standard python-pickle files (data_batch_1..5, test_batch,
    batches.meta). They are read directly rather than through ``torchvision.datasets.CIFAR10``
    because that class rejects any file whose md5 differs from the official release; instead the
    structure of every file is validated. Raises :class:`DatasetUnavailable` (naming the folder,
    the problem and the fixes) when files are missing, truncated or corrupt.
    """
    folder = cifar10_folder(root)
    if not folder.is_dir():
        raise DatasetUnavailable(_unavailable_message(folder, "the folder does not exist"))
    missing = _missing_files(folder)
    if missing:
        raise DatasetUnavailable(_unavailable_message(folder, f"missing {', '.join(missing)}"))
    _check_meta(folder)
    batches = [_read_batch(folder / name) for name in (_TRAIN_FILES if train else _TEST_FILES)]
    data = np.concatenate([rows for rows, _ in batches])
    labels = np.concatenate([ys for _, ys in batches])
    # Each row is already channel-major (1024 R, then G, then B, each row-major), i.e. CHW
    # flattened, so a reshape gives the CHW layout with no transpose or extra copy.
    images = torch.from_numpy(data).reshape(-1, _CHANNELS, _SIDE, _SIDE)
    return ArrayDataset(images=images, labels=torch.from_numpy(labels))


# ---------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------

# DNS failures, refused connections and timeouts; HTTPError (404 etc.) is a URLError too.
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror, http.client.HTTPException)
# Raised by torchvision on an md5 mismatch (RuntimeError) or while extracting a bad archive.
_ARCHIVE_ERRORS = (RuntimeError, tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error)


def _offline_message(root: Path, exc: BaseException) -> str:
    return (
        f"Could not download CIFAR-10 from {_cifar10().url} ({type(exc).__name__}: {exc}); "
        "this machine appears to be offline or cannot reach the host. "
        "Either train on synthetic CIFAR-shaped data with `data.synthetic=true`, or fetch "
        f"cifar-10-python.tar.gz elsewhere and extract it so that {_FOLDER_NAME} sits under "
        f"data.root (here: {root / _FOLDER_NAME})."
    )


def download_cifar10(root: str | Path, timeout_s: float = 60.0) -> None:
    """Download and extract CIFAR-10 under ``root`` unless ``root/cifar-10-batches-py`` is complete.

    Uses torchvision's downloader (official URL, archive md5 check). Every socket operation is
    bounded by ``timeout_s`` so an offline node fails quickly instead of hanging (DNS lookups are
    governed by the system resolver). Raises :class:`DatasetUnavailable` on network errors, a
    corrupt archive, or an unwritable ``root``.
    """
    root = Path(root).expanduser()
    if not _missing_files(cifar10_folder(root)):
        return
    from torchvision.datasets.utils import download_and_extract_archive

    cifar = _cifar10()
    # torchvision's urlopen calls take no timeout argument, so the process-wide default is the
    # only handle; restore it so the rest of the program is unaffected.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        download_and_extract_archive(cifar.url, str(root), filename=cifar.filename, md5=cifar.tgz_md5)
    except _NETWORK_ERRORS as exc:
        raise DatasetUnavailable(_offline_message(root, exc)) from exc
    except _ARCHIVE_ERRORS as exc:
        problem = f"the downloaded archive was corrupt ({type(exc).__name__}: {exc}); delete {root / cifar.filename}"
        raise DatasetUnavailable(_unavailable_message(cifar10_folder(root), problem)) from exc
    except OSError as exc:
        problem = f"could not write under {root} ({type(exc).__name__}: {exc})"
        raise DatasetUnavailable(_unavailable_message(cifar10_folder(root), problem)) from exc
    finally:
        socket.setdefaulttimeout(previous)
    missing = _missing_files(cifar10_folder(root))
    if missing:
        problem = f"the downloaded archive did not contain {', '.join(missing)}"
        raise DatasetUnavailable(_unavailable_message(cifar10_folder(root), problem))


# ---------------------------------------------------------------------------------------------
# Synthetic stand-in
# ---------------------------------------------------------------------------------------------

_SYN_MAX_SHIFT = 4  # pixels each way; templates are rendered this much larger than the image
_SYN_CHUNK = 8192  # images per vectorised step: bounds peak memory to ~50 MB of int16
# The levels below were tuned so the task is neither trivial nor hopeless: nearest-class-mean
# scores ~80% on the test split and a 3-layer CNN ~90% after a few epochs on 10k images.
_SYN_COLOUR_SPREAD = 24  # class base colours lie within 128 +- this, per channel
_SYN_CONTRAST = 20  # std of each class's spatial pattern, in pixel levels
_SYN_JITTER = 40  # per-sample, per-channel colour cast in [-J, J]: mean colour alone is ambiguous
_SYN_NOISE_SHIFT = 1  # pixel noise is uniform in [-128, 127] >> this, i.e. +-64


def _generator(seed: int, stream: int) -> torch.Generator:
    # SeedSequence mixes (seed, stream) into well-separated states, so the template stream and
    # the train/test sample streams never overlap for any pair of user seeds.
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _shifted_templates(seed: int) -> torch.Tensor:
    """Every class template at every shift: ``(10 * 81, 3, 32, 32)`` int16 pixel levels.

    Each class gets one smooth random colour pattern. Pre-cropping all 9x9 shifts turns the
    per-sample random shift into a row lookup, far faster than a per-pixel gather.
    """
    g = _generator(seed, 0)
    shifts = 2 * _SYN_MAX_SHIFT + 1
    side = _SIDE + shifts - 1
    coarse = torch.randn(len(CLASSES), _CHANNELS, 4, 4, generator=g)
    # Upsampling a 4x4 grid gives low-frequency blobs: structure a CNN can pick up under shifts.
    pattern = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    pattern = pattern / pattern.std(dim=(1, 2, 3), keepdim=True)
    colour = 128 + _SYN_COLOUR_SPREAD * (2 * torch.rand(len(CLASSES), _CHANNELS, 1, 1, generator=g) - 1)
    full = (colour + _SYN_CONTRAST * pattern).round().to(torch.int16)
    crops = full.unfold(2, _SIDE, 1).unfold(3, _SIDE, 1)  # (10, 3, dy, dx, 32, 32)
    return crops.permute(0, 2, 3, 1, 4, 5).reshape(-1, _CHANNELS, _SIDE, _SIDE).contiguous()


def _pixel_noise(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Uniform int16 noise centred on zero, drawn 8 bytes per RNG call."""
    count = int(np.prod(shape))
    # One 64-bit draw yields 8 noise bytes; drawing one number per pixel dominated generation time.
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 7) // 8,), generator=g, dtype=torch.int64)
    noise = words.view(torch.uint8)[:count].view(shape).to(torch.int16)
    return (noise - 128) >> _SYN_NOISE_SHIFT


def _render(crops: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Pick each sample's class template at a random shift and add colour jitter and pixel noise."""
    n = len(labels)
    shifts_per_class = len(crops) // len(CLASSES)
    shift = torch.randint(0, shifts_per_class, (n,), generator=g)
    images = crops.index_select(0, labels * shifts_per_class + shift)
    images += torch.randint(-_SYN_JITTER, _SYN_JITTER + 1, (n, _CHANNELS, 1, 1), generator=g, dtype=torch.int16)
    images += _pixel_noise(tuple(images.shape), g)
    return images.clamp_(0, 255).to(torch.uint8)


def synthetic_cifar10(n: int, seed: int, train: bool = True) -> ArrayDataset:
    """A learnable CIFAR-shaped dataset: ``n`` images of shape (3, 32, 32), uint8, 10 classes.

    Each class has a fixed smooth colour template derived from ``seed``; an image is its class
    template, randomly shifted by up to 4 pixels, plus a random colour cast and pixel noise.
    Train and test share the templates but draw different samples, so a model fitted on one
    generalises to the other. Labels are balanced (counts differ by at most one).
    Deterministic in (n, seed, train) on a given platform and torch version.
    """
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be non-negative, got n={n}, seed={seed}")
    crops = _shifted_templates(seed)
    g = _generator(seed, 1 if train else 2)
    labels = (torch.arange(n) % len(CLASSES))[torch.randperm(n, generator=g)]
    images = torch.empty(n, _CHANNELS, _SIDE, _SIDE, dtype=torch.uint8)
    for start in range(0, n, _SYN_CHUNK):
        stop = min(start + _SYN_CHUNK, n)
        images[start:stop] = _render(crops, labels[start:stop], g)
    return ArrayDataset(images=images, labels=labels)
