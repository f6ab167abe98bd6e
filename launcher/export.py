"""``python -m launcher export RUN_DIR [--step N] [--out PATH]``: the weights of any checkpoint of a run, single-file
(``step-N.pt``, dist.strategy=ddp) or sharded (``step-N/``, dist.strategy=fsdp, written by any number of ranks), as
a plain ``model.pt``: whole tensors under the model's own parameter names, which ``torch.load`` and
``model.load_state_dict`` take directly (and ``model.init_from`` too). Runs in one process, without GPUs or a
process group."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from launcher.errors import CheckpointError, UserError

__all__ = ["export", "find_checkpoint"]

_STEP = re.compile(r"^step-(\d+)(\.pt)?$")


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of ``step`` in ``run_dir/checkpoints`` (a file or a folder), or the newest one."""
    folder = run_dir / "checkpoints"
    found = {int(m.group(1)): p for p in (folder.iterdir() if folder.is_dir() else [])
             if (m := _STEP.match(p.name)) and (p.is_file() or (p / ".metadata").is_file())}
    if not found:
        raise UserError(f"{folder} holds no checkpoint: give the directory of a run that has saved one "
                        "(RUN_DIR/checkpoints/step-*).")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise UserError(f"{folder} has no checkpoint of step {step}; it has steps "
                        f"{', '.join(map(str, sorted(found)))}.")
    return found[step]


def _weights(path: Path) -> dict[str, Any]:
    import torch

    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
            raise CheckpointError(f"Cannot read {path} ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
                                  "export another step with --step N.") from e
        model: dict[str, Any] = state["model"] if isinstance(state, dict) and "model" in state else state
        return model
    # What torch's own dcp_to_torch_save does (an empty state dict rebuilt from the metadata), limited to the model's
    # entries: the optimizer state (twice the weights, for Adam) is never read.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    loaded: dict[str, Any] = {}
    try:
        _load_state_dict(loaded, storage_reader=FileSystemReader(str(path)),
                         planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException with each rank's error
        raise CheckpointError(f"Cannot read the sharded checkpoint {path} ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0]}); export another step with --step N.") from e
    return dict(loaded["model"])


def _plain_key(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):  # wrappers of checkpoints written before keys were made plain
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def export(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write the weights of a checkpoint of ``run_dir`` as a plain state dict; returns the file written."""
    import torch

    source = find_checkpoint(run_dir, step)
    weights = {_plain_key(k): v.contiguous() if isinstance(v, torch.Tensor) else v
               for k, v in _weights(source).items()}
    number = int(_STEP.match(source.name).group(1))  # type: ignore[union-attr]
    target = out or run_dir / f"model-step-{number:08d}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    torch.save(weights, partial)
    partial.replace(target)  # whole or not at all
    print(f"{source} -> {target}: {len(weights)} tensors, "
          f"{sum(v.numel() for v in weights.values() if isinstance(v, torch.Tensor)):,} values")
    return target
