"""Tests for trainers.cifar_data: real-format loading, failure messages, download, synthetic data."""

from __future__ import annotations

import functools
import hashlib
import http.server
import pickle
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar

from tests.fake_cifar import py2_pickle, write_batch, write_cifar10_batches
from trainers.cifar_data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASSES,
    ArrayDataset,
    DatasetUnavailable,
    cifar10_folder,
    download_cifar10,
    load_cifar10,
    synthetic_cifar10,
)

# --------------------------------------------------------------------------------------------
# Constants and ArrayDataset
# --------------------------------------------------------------------------------------------


def test_constants_describe_cifar10() -> None:
    assert CLASSES[0] == "airplane" and CLASSES[-1] == "truck" and len(set(CLASSES)) == 10
    assert len(CIFAR10_MEAN) == len(CIFAR10_STD) == 3
    assert all(0.4 < m < 0.5 for m in CIFAR10_MEAN) and all(0.2 < s < 0.3 for s in CIFAR10_STD)


def test_array_dataset_items_and_batches() -> None:
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2)
    ds = ArrayDataset(images=images, labels=torch.tensor([3, 1, 4, 1]))
    image, label = ds[2]
    assert len(ds) == 4
    assert torch.equal(image, images[2]) and int(label) == 4
    batch_images, batch_labels = ds.gather(torch.tensor([3, 0]))
    assert torch.equal(batch_images, images[[3, 0]]) and batch_labels.tolist() == [1, 3]


def test_array_dataset_rejects_wrong_dtypes_and_lengths() -> None:
    with pytest.raises(ValueError):
        ArrayDataset(images=torch.zeros(2, 3, 32, 32), labels=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError):
        ArrayDataset(images=torch.zeros(2, 3, 32, 32, dtype=torch.uint8), labels=torch.zeros(3, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# Loading the real on-disk format
# --------------------------------------------------------------------------------------------


def test_load_gives_shapes_dtypes_and_labels_in_batch_order(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path, n_train=53, n_test=17, seed=3)
    assert folder == cifar10_folder(tmp_path) == tmp_path / "cifar-10-batches-py"
    train = load_cifar10(tmp_path, train=True)
    assert train.images.shape == (53, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.images.is_contiguous()
    assert train.labels.shape == (53,) and train.labels.dtype == torch.int64
    expected_labels = []
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "rb") as f:
            expected_labels += pickle.load(f, encoding="latin1")["labels"]
    assert train.labels.tolist() == expected_labels
    # The fake files hold synthetic_cifar10's images, so a round trip must reproduce them exactly.
    assert torch.equal(train.images, synthetic_cifar10(53, 3, train=True).images)


def test_train_and_test_splits_are_distinct(tmp_path: Path) -> None:
    write_cifar10_batches(tmp_path, n_train=40, n_test=12)
    train, test = load_cifar10(tmp_path, train=True), load_cifar10(tmp_path, train=False)
    assert len(train) == 40 and len(test) == 12
    assert torch.equal(test.images, synthetic_cifar10(12, 0, train=False).images)
    assert not torch.equal(train.images[:12], test.images)


def test_known_pixel_lands_at_its_chw_position(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path, n_train=0, n_test=0)
    data = np.zeros((2, 3072), dtype=np.uint8)
    # Real layout: 1024 red values, then green, then blue, each plane row-major.
    channel, row, col = 1, 5, 7
    data[1, channel * 1024 + row * 32 + col] = 200
    write_batch(folder / "data_batch_1", data, [6, 2], "training batch 1 of 5")
    train = load_cifar10(tmp_path, train=True)
    assert train.images[1, channel, row, col] == 200
    assert int(train.images.count_nonzero()) == 1
    assert train.labels.tolist() == [6, 2]


def test_loader_agrees_with_torchvision_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision's own reader (NHWC) is an independent check of both the fake files and our layout;
    # its md5 check is bypassed because fake files can never match the official checksums.
    write_cifar10_batches(tmp_path, n_train=25, n_test=5)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = tv_cifar.CIFAR10(str(tmp_path), train=True, download=False)
    ours = load_cifar10(tmp_path, train=True)
    assert reference.classes == list(CLASSES)
    assert torch.equal(ours.images.permute(0, 2, 3, 1), torch.from_numpy(reference.data))
    assert ours.labels.tolist() == reference.targets


def test_fake_files_load_like_the_real_python2_pickles(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path, n_train=5, n_test=3)
    raw = (folder / "test_batch").read_bytes()
    as_str = pickle.loads(raw, encoding="latin1")
    as_bytes = pickle.loads(raw, encoding="bytes")
    assert set(as_str) == {"batch_label", "labels", "data", "filenames"}
    assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert as_bytes[b"data"].dtype == np.uint8 and as_bytes[b"data"].shape == (3, 3072)
    assert np.array_equal(as_str["data"], as_bytes[b"data"])


def test_python3_pickle_with_bytes_keys_is_accepted(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path, n_train=0, n_test=2)
    data = np.full((2, 3072), 9, dtype=np.uint8)
    entry = {b"batch_label": b"testing batch 1 of 1", b"labels": [0, 9], b"data": data, b"filenames": [b"a", b"b"]}
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    test = load_cifar10(tmp_path, train=False)
    assert test.labels.tolist() == [0, 9] and int(test.images.min()) == 9


def _assert_actionable(exc: DatasetUnavailable, *needles: str) -> None:
    message = str(exc)
    assert "data.synthetic=true" in message
    assert "cifar-10-batches-py" in message
    for needle in needles:
        assert needle in message


def test_missing_folder_names_the_folder_and_fixes(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable) as info:
        load_cifar10(tmp_path / "nowhere", train=True)
    _assert_actionable(info.value, str(tmp_path / "nowhere" / "cifar-10-batches-py"), "does not exist")


def test_missing_file_is_named(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path, n_train=10, n_test=2)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetUnavailable) as info:
        load_cifar10(tmp_path, train=True)
    _assert_actionable(info.value, "data_batch_4")


def test_truncated_batch_is_reported(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path, n_train=50, n_test=2)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetUnavailable) as info:
        load_cifar10(tmp_path, train=True)
    _assert_actionable(info.value, "data_batch_3", "truncated or corrupt")
    # The test split does not read the damaged file, so it still loads.
    assert len(load_cifar10(tmp_path, train=False)) == 2


def test_garbage_batch_is_reported(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path, n_train=5, n_test=5)
    (folder / "test_batch").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetUnavailable) as info:
        load_cifar10(tmp_path, train=False)
    _assert_actionable(info.value, "test_batch")


def test_wrong_data_shape_is_reported(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path, n_train=0, n_test=2)
    (folder / "test_batch").write_bytes(py2_pickle({b"labels": [1, 2], b"data": np.zeros((2, 100), dtype=np.uint8)}))
    with pytest.raises(DatasetUnavailable) as info:
        load_cifar10(tmp_path, train=False)
    _assert_actionable(info.value, "test_batch", "3072")


_UNPICKLED: list[str] = []


def _record_call(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record_call, ("ran",))


def test_pickle_cannot_run_code(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path, n_train=0, n_test=1)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _Payload(), "labels": [0]}, protocol=2))
    _UNPICKLED.clear()
    with pytest.raises(DatasetUnavailable) as info:
        load_cifar10(tmp_path, train=False)
    assert _UNPICKLED == []
    _assert_actionable(info.value, "refusing")


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def served_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Serve a real-layout cifar-10-python.tar.gz over local HTTP and point torchvision at it."""
    write_cifar10_batches(tmp_path / "src", n_train=15, n_test=5, seed=4)
    archive = tmp_path / "www" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    handler = functools.partial(_QuietHandler, directory=str(archive.parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
        monkeypatch.setattr(tv_cifar.CIFAR10, "url", url)
        monkeypatch.setattr(tv_cifar.CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
        yield tmp_path / "dst"
        server.shutdown()


def test_download_fetches_and_extracts_the_archive(served_archive: Path) -> None:
    download_cifar10(served_archive, timeout_s=5.0)
    train = load_cifar10(served_archive, train=True)
    assert torch.equal(train.images, synthetic_cifar10(15, 4).images)
    assert len(load_cifar10(served_archive, train=False)) == 5


def test_download_with_wrong_checksum_is_reported(served_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tv_cifar.CIFAR10, "tgz_md5", "0" * 32)
    with pytest.raises(DatasetUnavailable) as info:
        download_cifar10(served_archive, timeout_s=5.0)
    _assert_actionable(info.value, "corrupt")
    assert not cifar10_folder(served_archive).exists()


@pytest.fixture
def sentinel_default_timeout() -> Iterator[float]:
    """A non-default process socket timeout, restored afterwards, to prove download restores it."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(7.0)
    yield 7.0
    socket.setdefaulttimeout(previous)


def test_download_from_unresolvable_host_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sentinel_default_timeout: float
) -> None:
    # ".invalid" never resolves (RFC 6761), so this is deterministic with or without internet.
    monkeypatch.setattr(tv_cifar.CIFAR10, "url", "http://cifar.invalid/cifar-10-python.tar.gz")
    start = time.monotonic()
    with pytest.raises(DatasetUnavailable) as info:
        download_cifar10(tmp_path, timeout_s=2.0)
    assert time.monotonic() - start < 20
    _assert_actionable(info.value, "offline", "data.root", "cifar.invalid")
    assert socket.getdefaulttimeout() == sentinel_default_timeout


def test_download_from_silent_server_is_bounded_by_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sentinel_default_timeout: float
) -> None:
    # The kernel completes the TCP handshake into the backlog, but nothing ever answers: without
    # a socket timeout urllib would wait forever.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        monkeypatch.setattr(tv_cifar.CIFAR10, "url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
        start = time.monotonic()
        with pytest.raises(DatasetUnavailable) as info:
            download_cifar10(tmp_path, timeout_s=0.5)
        elapsed = time.monotonic() - start
    assert elapsed < 10
    _assert_actionable(info.value, "offline")
    assert socket.getdefaulttimeout() == sentinel_default_timeout


def test_download_is_a_no_op_when_folder_is_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10_batches(tmp_path, n_train=5, n_test=5)
    # Any network attempt would fail on this URL, so returning quietly proves nothing was fetched.
    monkeypatch.setattr(tv_cifar.CIFAR10, "url", "http://cifar.invalid/cifar-10-python.tar.gz")
    download_cifar10(tmp_path, timeout_s=1.0)
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()
    assert len(load_cifar10(tmp_path, train=True)) == 5


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_seed_and_split_dependent() -> None:
    a, b = synthetic_cifar10(300, seed=1), synthetic_cifar10(300, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, synthetic_cifar10(300, seed=2).images)
    assert not torch.equal(a.images, synthetic_cifar10(300, seed=1, train=False).images)


def test_synthetic_shapes_dtypes_and_balance() -> None:
    ds = synthetic_cifar10(1003, seed=0)
    assert ds.images.shape == (1003, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.images.is_contiguous()
    assert ds.labels.dtype == torch.int64
    counts = torch.bincount(ds.labels, minlength=10)
    assert len(counts) == 10 and int(counts.max() - counts.min()) <= 1
    # Not a constant or saturated image: pixels use a broad part of the range.
    assert float(ds.images.float().std()) > 20 and int(ds.images.max()) > int(ds.images.min()) + 128
    assert len(synthetic_cifar10(0, seed=0)) == 0


def _nearest_class_mean_accuracy(train: ArrayDataset, test: ArrayDataset) -> float:
    x_train, x_test = train.images.flatten(1).float(), test.images.flatten(1).float()
    means = torch.stack([x_train[train.labels == c].mean(0) for c in range(len(CLASSES))])
    predictions = torch.cdist(x_test, means).argmin(1)
    return float((predictions == test.labels).float().mean())


def test_synthetic_is_learnable_and_train_test_share_classes() -> None:
    train, test = synthetic_cifar10(5000, seed=0), synthetic_cifar10(2000, seed=0, train=False)
    assert _nearest_class_mean_accuracy(train, test) > 0.5  # chance is 0.1
    # Labels must carry the signal: with shuffled train labels the same classifier is at chance.
    shuffled = ArrayDataset(train.images, train.labels[torch.randperm(5000, generator=torch.Generator().manual_seed(0))])
    assert _nearest_class_mean_accuracy(shuffled, test) < 0.2


def test_synthetic_50k_is_fast() -> None:
    synthetic_cifar10(100, seed=0)  # warm up lazy torch initialisation
    start = time.perf_counter()
    ds = synthetic_cifar10(50_000, seed=0)
    elapsed = time.perf_counter() - start
    assert len(ds) == 50_000
    assert elapsed < 5.0, f"synthetic_cifar10(50_000) took {elapsed:.2f}s"
