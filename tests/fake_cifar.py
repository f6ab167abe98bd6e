"""Write small CIFAR-10 folders in the exact on-disk format of the real ``cifar-10-batches-py``.

The real files were written by Python 2's cPickle (protocol 2): dict keys and other strings are
Python 2 ``str`` (byte strings), labels are a list of ints, and ``data`` is a numpy uint8 array
of shape (n, 3072) rebuilt via ``numpy.core.multiarray._reconstruct``. Python 3's pickle cannot
emit Python 2 byte strings, so :func:`py2_pickle` writes those opcodes itself. The result loads
the way the real files do: with ``encoding="latin1"`` (torchvision) keys are ``"data"``, with
``encoding="bytes"`` (the snippet on the CIFAR web page) keys are ``b"data"``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from trainers.cifar_data import CLASSES, cifar10_folder, synthetic_cifar10

_PIXELS = 3 * 32 * 32


def _py2_str(data: bytes) -> bytes:
    # SHORT_BINSTRING / BINSTRING: a Python 2 str, which Python 3 decodes per `encoding`.
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<I", len(data)) + data


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _py2_array(array: np.ndarray) -> bytes:
    """A C-contiguous uint8 ndarray, pickled the way numpy under Python 2 did."""
    assert array.dtype == np.uint8 and array.ndim == 2
    # _reconstruct(ndarray, (0,), 'b') then BUILD with (version, shape, dtype, fortran, rawdata).
    out = b"cnumpy.core.multiarray\n_reconstruct\n"
    out += b"cnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
    shape = b"(" + b"".join(_py2_int(dim) for dim in array.shape) + b"t"
    dtype = b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"\x89\x88\x87R"
    dtype += b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + _py2_int(0) + b"tb"
    rawdata = _py2_str(np.ascontiguousarray(array).tobytes())
    return out + b"(" + _py2_int(1) + shape + dtype + b"\x89" + rawdata + b"tb"


def _py2_value(value: Any) -> bytes:
    if isinstance(value, bytes):
        return _py2_str(value)
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        return _py2_int(value)
    if isinstance(value, list):
        return b"](" + b"".join(_py2_value(item) for item in value) + b"e"
    if isinstance(value, dict):
        return b"}(" + b"".join(_py2_value(k) + _py2_value(v) for k, v in value.items()) + b"u"
    if isinstance(value, np.ndarray):
        return _py2_array(value)
    raise TypeError(f"cannot write {type(value).__name__} as a Python 2 pickle")


def py2_pickle(value: Any) -> bytes:
    """Serialise dicts/lists/ints/bytes/uint8 arrays as Python 2 cPickle protocol 2 did (no memo)."""
    return b"\x80\x02" + _py2_value(value) + b"."


def write_batch(path: Path, data: np.ndarray, labels: list[int], batch_label: str) -> None:
    """Write one batch file: ``data`` is (n, 3072) uint8, each row CHW-flattened (R, G, B planes)."""
    assert data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _PIXELS
    assert len(labels) == len(data)
    entry = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(y) for y in labels],
        b"data": data,
        b"filenames": [f"synthetic_{CLASSES[y]}_{i:06d}.png".encode() for i, y in enumerate(labels)],
    }
    path.write_bytes(py2_pickle(entry))


def write_meta(path: Path, num_cases_per_batch: int) -> None:
    """Write ``batches.meta`` with the real keys."""
    meta = {
        b"num_cases_per_batch": num_cases_per_batch,
        b"label_names": [name.encode() for name in CLASSES],
        b"num_vis": _PIXELS,
    }
    path.write_bytes(py2_pickle(meta))


def write_cifar10_batches(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write a real-format ``cifar-10-batches-py`` folder under ``root`` and return the folder.

    Content comes from ``synthetic_cifar10(n, seed, train)`` so it is learnable; ``n_train`` is
    split across data_batch_1..5 in order (sizes differ by at most one).
    """
    folder = cifar10_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    train = synthetic_cifar10(n_train, seed, train=True)
    train_rows = train.images.reshape(n_train, _PIXELS).numpy()
    bounds = [n_train * i // 5 for i in range(6)]
    for number, (start, stop) in enumerate(zip(bounds, bounds[1:]), start=1):
        labels = train.labels[start:stop].tolist()
        write_batch(folder / f"data_batch_{number}", train_rows[start:stop], labels, f"training batch {number} of 5")
    test = synthetic_cifar10(n_test, seed, train=False)
    test_rows = test.images.reshape(n_test, _PIXELS).numpy()
    write_batch(folder / "test_batch", test_rows, test.labels.tolist(), "testing batch 1 of 1")
    write_meta(folder / "batches.meta", -(-n_train // 5))
    return folder
