"""Tests for launcher.config: schema defaults, YAML files, overrides, errors, freezing and round-trips."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from launcher import config as base
from launcher.config import ConfigError, replace, to_dict, to_yaml
from trainers.core.config import Precision
from trainers.cifar import CifarConfig as Config


def load_config(path=None, overrides=()):
    """The CIFAR task's schema: the base sections plus the task's own keys."""
    return base.load_config(path, overrides, schema=Config)


def schema_keys():
    return base.schema_keys(Config)

REPO = Path(__file__).resolve().parents[1]


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- loading and merging


def test_defaults_load_and_match_schema_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert cfg.train.epochs == 30
    assert cfg.train.batch_size == 512
    assert cfg.train.precision is Precision.auto
    assert cfg.data.synthetic is False
    assert cfg.model.sync_bn is False


def test_yaml_file_and_overrides_merge_with_overrides_winning(tmp_path):
    path = write_yaml(tmp_path, """
        optim:
          lr: 0.05
        train:
          epochs: 7
        model:
          sync_bn: true
        run:
          name: from-file
    """)
    cfg = load_config(path, ["train.epochs=3", "run.seed=11"])
    assert cfg.train.epochs == 3  # override beats file
    assert cfg.optim.lr == 0.05  # file beats default
    assert cfg.model.sync_bn is True
    assert cfg.run.name == "from-file"
    assert cfg.run.seed == 11  # override of a key the file does not mention
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default


def test_later_override_of_same_key_wins():
    cfg = load_config(None, ["train.epochs=3", "train.epochs=5"])
    assert cfg.train.epochs == 5


def test_shipped_debug_config_loads():
    cfg = load_config(REPO / "configs" / "cifar_debug.yaml")
    assert cfg.data.synthetic is True
    assert cfg.model.name == "tiny"
    assert cfg.train.batch_size == 128
    assert cfg.data.synthetic_test_size == 500


def test_file_floats_in_exponent_form_are_floats(tmp_path):
    # PyYAML reads "1e-3" as a string; the schema must still turn it into a float.
    path = write_yaml(tmp_path, "optim:\n  lr: 1e-3\n")
    cfg = load_config(path)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr == pytest.approx(1e-3)


# --------------------------------------------------------------------------- override parsing


def test_override_values_are_parsed_as_yaml_scalars():
    cfg = load_config(None, ["optim.lr=1e-3", "data.synthetic=true", "train.precision=bf16", "run.seed=42"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.synthetic is True
    assert cfg.train.precision is Precision.bf16
    assert isinstance(cfg.run.seed, int) and cfg.run.seed == 42


def test_int_override_into_float_field_becomes_float():
    cfg = load_config(None, ["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.epoch=3", "train.epochs"),
        ("training.epochs=3", "train.epochs"),
        ("model.syncbn=true", "model.sync_bn"),
        # the section counts: the same leaf exists under train. and checkpoint.
        ("eval.batchsize=8", "eval.batch_size"),
        ("checkpoint.every_epoch=2", "checkpoint.every_epochs"),
    ],
)
def test_unknown_override_key_names_closest_valid_key(override, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    bad_key = override.split("=")[0]
    assert f"'{bad_key}'" in msg
    assert f"did you mean '{suggestion}'?" in msg
    assert "command line" in msg


def test_unknown_key_in_yaml_file_names_file_and_closest_key(tmp_path):
    path = write_yaml(tmp_path, "train:\n  batchsize: 64\n", name="typo.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "'train.batchsize'" in msg
    assert "did you mean 'train.batch_size'?" in msg
    assert str(path) in msg


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("model.sync_bn=maybe", "model.sync_bn"),
        ("train.precision=fp8", "train.precision"),
        ("optim.lr=fast", "optim.lr"),
    ],
)
def test_wrong_type_raises_config_error_naming_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"'{key}'" in str(info.value)


def test_wrong_type_in_file_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  epochs: many\n", name="bad_type.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "'train.epochs'" in str(info.value)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- choices and ranges


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.loader=gpu", "data.loader"),
        ("model.name=vgg", "model.name"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.epochs=-1", "train.epochs"),
        ("dist.timeout_s=-1", "dist.timeout_s"),
        ("optim.lr=-0.1", "optim.lr"),
    ],
)
def test_choice_and_range_validation(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value)


@pytest.mark.parametrize(
    "override, section, leaf, expected",
    [
        ("data.loader=device", "data", "loader", "device"),
        ("train.grad_accum=1", "train", "grad_accum", 1),
        ("train.label_smoothing=1", "train", "label_smoothing", 1.0),  # the upper bound is allowed
        ("optim.betas=[0,0.999]", "optim", "betas", (0.0, 0.999)),
        ("optim.lr=0", "optim", "lr", 0.0),
    ],
)
def test_boundary_values_are_accepted(override, section, leaf, expected):
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, section), leaf) == expected


@pytest.mark.parametrize("override", ["optim.lr=nan", "dist.timeout_s=nan"])
def test_nan_float_is_rejected(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_resume_path_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        load_config(None, [f"checkpoint.resume={tmp_path / 'missing.pt'}"])
    existing = tmp_path / "ckpt.pt"
    existing.write_bytes(b"x")
    assert load_config(None, [f"checkpoint.resume={existing}"]).checkpoint.resume == str(existing)


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("override", ["foo", "=3", "train.epochs"])
def test_malformed_override_raises(override):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, [override])


def test_missing_config_file_raises(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("text", ["- train\n- model\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_raises(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_invalid_yaml_raises(tmp_path):
    path = write_yaml(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_date_value_in_yaml_file_gives_config_error_or_string(tmp_path):
    path = write_yaml(tmp_path, "run:\n  name: 2024-01-01\n")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert "run.name" in str(e)
    else:
        assert cfg.run.name == "2024-01-01"


def test_empty_section_is_not_reported_as_unknown_key(tmp_path):
    path = write_yaml(tmp_path, "train:\n  # epochs: 3\n")
    try:
        load_config(path)
    except ConfigError as e:
        assert "Unknown configuration key 'train'" not in str(e)


# --------------------------------------------------------------------------- the result


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = cfg.train  # type: ignore[misc]
    assert cfg.train.epochs == 30


def test_to_dict_is_plain_builtins():
    cfg = load_config(None, ["train.precision=fp16"])
    d = to_dict(cfg)
    assert type(d) is dict and type(d["train"]) is dict
    assert d["train"]["precision"] == "fp16" and type(d["train"]["precision"]) is str
    assert d["train"]["epochs"] == 30
    assert set(d) == {f.name for f in dataclasses.fields(Config)}


def test_to_yaml_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "cifar_debug.yaml",
                      ["train.precision=bf16", "optim.lr=1e-4", "run.name=123", "run.dir=runs/x y",
                       "model.sync_bn=true", "dist.timeout_s=12.5"])
    assert cfg != Config()
    text = to_yaml(cfg)
    assert yaml.safe_load(text) == to_dict(cfg)
    path = tmp_path / "dumped.yaml"
    path.write_text(text)
    again = load_config(path)
    assert again == cfg
    assert again.run.name == "123" and again.train.precision is Precision.bf16


def test_schema_keys_contains_minimum_keys():
    keys = schema_keys()
    required = {"data.root", "data.synthetic", "train.epochs", "train.batch_size", "optim.lr", "train.precision",
                "train.grad_accum", "model.sync_bn", "run.dir", "run.seed"}
    assert required <= set(keys)
    assert len(keys) == len(set(keys))
    assert all(k.count(".") == 1 for k in keys)
    assert {"optim.name", "sched.name", "data.num_workers", "model.init_from", "train.augment"} <= set(keys)
    # every key is settable from the command line
    assert "data" not in keys and "train" not in keys


def test_replace_changes_only_named_leaves():
    cfg = load_config(None, ["train.epochs=4"])
    new = replace(cfg, run={"dir": "somewhere"}, optim={"lr": 0.5})
    assert new.run.dir == "somewhere"
    assert new.optim.lr == 0.5
    assert new.train.epochs == 4
    assert cfg.run.dir == "" and cfg.optim.lr == 0.2  # original untouched
    old, changed = to_dict(cfg), to_dict(new)
    diffs = {(s, k) for s in old for k in old[s] if old[s][k] != changed[s][k]}
    assert diffs == {("run", "dir"), ("optim", "lr")}


def test_replace_unknown_leaf_raises():
    with pytest.raises(TypeError):
        replace(load_config(), train={"epoch": 3})


@pytest.mark.parametrize("spec", ["common", "trainers.cifar:CifarConfig", "trainers.imagefolder:FolderConfig",
                                  "trainers.lm:LMConfig"])
def test_readme_key_tables_are_generated_from_the_schemas(spec: str) -> None:
    from launcher.keytable import main as keytable

    readme = (REPO / "README.md").read_text()
    marker = f"<!-- keys: {spec} -->\n"
    assert marker in readme, f"README has no key table for {spec}"
    documented = readme.split(marker, 1)[1].split("\n<!-- /keys -->", 1)[0]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        keytable([] if spec == "common" else [spec])
    assert documented == out.getvalue().strip(), (
        f"README's key table for {spec} is stale; regenerate it with python -m launcher.keytable "
        f"{'' if spec == 'common' else spec}")


# --------------------------------------------------------------------------- the run fingerprint

#: Keys that do not change the trained weights: changing them resumes the same run (README, "Resume").
OUTSIDE_THE_FINGERPRINT = {
    "data.loader", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
    "data.download", "data.synthetic_test_size", "eval.batch_size", "eval.every_epochs", "eval.tta",
    "train.nonfinite", "train.nonfinite_skips", "model.shard_units", "model.activation_checkpointing",
    "model.cpu_offload",
    "dist.backend", "dist.device", "dist.timeout_s", "checkpoint.every_epochs", "checkpoint.every_steps",
    "checkpoint.every_minutes", "checkpoint.keep_last", "checkpoint.keep_best", "checkpoint.best_metric",
    "checkpoint.resume", "checkpoint.async", "run.dir", "run.name", "run.log_every", "run.progress",
    "run.tensorboard"}


def test_the_fingerprint_holds_exactly_the_keys_that_change_the_trained_weights() -> None:
    outside = {leaf.key for leaf in base.leaves(Config) if not leaf.meta["changes_run"]}
    assert {k for k in outside if not k.startswith("slurm.")} == OUTSIDE_THE_FINGERPRINT
    cfg = load_config()
    for key, value in [("eval.every_epochs", 5), ("eval.tta", "mirror"), ("data.download", False),
                       ("data.synthetic_test_size", 7), ("checkpoint.every_minutes", 3.0), ("train.nonfinite", "skip")]:
        section, name = key.split(".")
        assert base.fingerprint(replace(cfg, **{section: {name: value}})) == base.fingerprint(cfg), key
    for key, value in [("optim.lr", 0.5), ("train.epochs", 3), ("data.synthetic_train_size", 7), ("run.seed", 3),
                       ("model.width", 16), ("train.augment", False)]:
        section, name = key.split(".")
        assert base.fingerprint(replace(cfg, **{section: {name: value}})) != base.fingerprint(cfg), key


def test_the_image_folder_task_keeps_its_evaluation_resize_out_of_the_fingerprint() -> None:
    from trainers.imagefolder_config import FolderConfig

    outside = {leaf.key for leaf in base.leaves(FolderConfig) if not leaf.meta["changes_run"]}
    assert "data.resize" in outside and not {"data.image_size", "data.mean", "data.std", "data.hflip"} & outside
