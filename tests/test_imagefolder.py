"""trainers.imagefolder on real images (scikit-learn's handwritten digits as PNG files), and model.init_from."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.digits_folder import write_digits_folder
from tests.dist_utils import fork_ranks, run_cli, wait_all

# Digits are not mirror-symmetric and fill the frame: no flips, milder crops (task settings, not code changes).
SMALL = ["data.image_size=32", "model.name=tiny", "data.hflip=false", "data.crop_scale_min=0.3", "run.progress=lines"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    assert write_digits_folder(root) == (1437, 360)
    return root


def _imagefolder(*args: str, timeout: float = 300) -> Any:
    return run_cli(["trainers.imagefolder", *args], timeout=timeout)


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


def test_two_ranks_learn_the_digits_to_high_accuracy(digits: Path, tmp_path: Path) -> None:
    # Two ranks forked with torchrun's variables (fork_ranks): the subject is what they learn and how they evaluate;
    # how torchrun itself starts ranks is test_launch's.
    run_dir = tmp_path / "run"
    ranks = fork_ranks(["trainers.imagefolder", f"data.root={digits}", *SMALL, "train.epochs=8", "train.batch_size=64",
                        "optim.lr=0.1", "checkpoint.every_epochs=0", f"run.dir={run_dir}"], 2, tmp_path)
    codes = wait_all(ranks, 300, tmp_path)
    log = (tmp_path / "rank0.log").read_text()
    assert codes == [0, 0], log[-3000:] + (tmp_path / "rank1.log").read_text()[-3000:]
    assert "imagefolder" in log and "2 rank(s)" in log
    final = _evals(run_dir)[-1]
    assert final["test_samples"] == 360, "every validation image exactly once"
    assert final["test_acc"] >= 0.9, f"digits should be learned well, got {final['test_acc']:.3f}"
    assert final["test_top5"] >= final["test_acc"]
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    assert weights["14.weight"].shape == (10, 64), "ten classes, read from the folders"


def test_a_torchvision_model_by_name(digits: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _imagefolder(f"data.root={digits}", "data.image_size=32", "model.name=resnet18", "train.max_steps=2",
                          "train.batch_size=16", "eval.batch_size=120", f"run.dir={run_dir}", "run.progress=quiet")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _evals(run_dir)[-1]["test_samples"] == 360
    assert torch.load(run_dir / "model.pt", weights_only=True)["fc.weight"].shape == (10, 512)


def test_unknown_model_name_suggests_the_closest(digits: Path) -> None:
    result = _imagefolder(f"data.root={digits}", "model.name=resnet19")
    assert result.returncode == 2
    assert "model.name" in result.stderr and "resnet18" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("override, phrase", [("data.std=[0.2,0,0.2]", "above 0"), ("data.mean=[0.5,2,0.5]", "[0, 1]")],
                         ids=["zero-std", "mean-above-1"])
def test_normalisation_values_are_checked_where_declared(tmp_path: Path, override: str, phrase: str) -> None:
    from launcher.config import ConfigError, load_config
    from trainers.imagefolder_config import FolderConfig

    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}'.*{re.escape(phrase)}"):
        load_config(None, [f"data.root={tmp_path}", override], schema=FolderConfig)


def test_missing_or_inconsistent_folders_are_clear_errors(digits: Path, tmp_path: Path) -> None:
    result = _imagefolder(f"data.root={tmp_path}")
    assert result.returncode == 2 and "train/ and val/" in result.stderr and "Traceback" not in result.stderr
    assert _imagefolder().returncode == 2, "data.root is required"
    partial = tmp_path / "partial"
    shutil.copytree(digits / "train", partial / "train")
    shutil.copytree(digits / "val", partial / "val", ignore=lambda d, names: ["7"] if d.endswith("val") else [])
    result = _imagefolder(f"data.root={partial}", *SMALL, f"run.dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "different class folders" in result.stderr and "7" in result.stderr


def test_init_from_into_a_model_with_another_head(digits: Path, tmp_path: Path) -> None:
    source = tmp_path / "ten"
    first = _imagefolder(f"data.root={digits}", *SMALL, "train.max_steps=3", "train.batch_size=32",
                         f"run.dir={source}")
    assert first.returncode == 0, first.stderr[-3000:]
    five = tmp_path / "five"  # a new dataset with five classes: the head must be re-initialised
    for split in ("train", "val"):
        for digit in range(5):
            shutil.copytree(digits / split / str(digit), five / split / str(digit))
    frozen = "0,4,8"  # the three convolutions: they must keep the loaded weights exactly
    target = tmp_path / "fine-tuned"
    result = _imagefolder(f"data.root={five}", *SMALL, "train.max_steps=3", "train.batch_size=32",
                          f"model.init_from={source / 'model.pt'}", f"model.freeze={frozen}", f"run.dir={target}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "shape mismatch" in result.stdout and "14.weight (10, 64)->(5, 64)" in result.stdout
    assert "model.freeze: 3 parameter tensors frozen" in result.stdout
    before = torch.load(source / "model.pt", weights_only=True)
    after = torch.load(target / "model.pt", weights_only=True)
    for key in ("0.weight", "4.weight", "8.weight"):
        assert torch.equal(before[key], after[key]), f"{key} was loaded and frozen"
    assert not torch.equal(before["1.weight"], after["1.weight"]), "unfrozen layers train on"
    assert after["14.weight"].shape == (5, 64)


def test_init_from_a_file_that_matches_nothing_is_a_clear_error(digits: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.w": torch.zeros(3)}, foreign)
    result = _imagefolder(f"data.root={digits}", *SMALL, f"model.init_from={foreign}", f"run.dir={tmp_path / 'r'}")
    assert result.returncode == 2
    assert "none of its 1 tensors matches" in result.stderr and "Traceback" not in result.stderr
