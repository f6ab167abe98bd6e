"""The language-model task's configuration: the common sections plus its own keys (light: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainers.core.config import (Config, ConfigError, DataConfig, ModelConfig, OptimConfig, SchedConfig, TrainConfig,
                                  redefault, setting)

#: A small public-domain text (Shakespeare, about 1.1 MB), the corpus of nanoGPT's character-level model.
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def _fraction(value: float) -> str | None:
    return None if 0 < value < 1 else f"is {value}; give a fraction strictly between 0 and 1, e.g. 0.1"


@dataclass(frozen=True)
class LMData(DataConfig):
    path: str = setting("data/shakespeare.txt", "the corpus: a UTF-8 text file (its bytes are the tokens) or a "
                        "pre-tokenized `.bin` file of uint16 token ids")
    url: str = setting(SHAKESPEARE_URL, "where to download the text from when `path` is missing and `download` is on",
                       changes_run=False)
    download: bool = setting(True, "download `url` to `path` when the file is missing", changes_run=False)
    synthetic: bool = setting(False, "train on a generated corpus (an order-2 Markov source of known entropy rate) "
                              "instead of a file")
    synthetic_fallback: bool = setting(False, "if the file cannot be read or downloaded, use the generated corpus (with "
                                       "a warning)")
    synthetic_bytes: int = setting(262_144, "length of the generated corpus, in bytes", gt=1)
    vocab_size: int = setting(0, "`.bin` files: the tokenizer's vocabulary size (0: the largest id + 1); text: 256",
                              ge=0)
    val_fraction: float = setting(0.1, "the end of the corpus held out for evaluation, as a fraction",
                                  check=_fraction)
    seq_len: int = setting(256, "context: tokens per training window", gt=0)
    loader: str = redefault(DataConfig, "loader", "device")
    num_workers: int = redefault(DataConfig, "num_workers", 0)


@dataclass(frozen=True)
class LMModel(ModelConfig):
    layers: int = setting(6, "transformer blocks", gt=0)
    width: int = setting(384, "embedding width (d_model)", gt=0)
    heads: int = setting(6, "attention heads (each of width / heads)", gt=0)
    dropout: float = setting(0.2, "dropout after attention, in the MLP and on the embeddings", ge=0, lt=1)


@dataclass(frozen=True)
class LMTrain(TrainConfig):
    epochs: int = redefault(TrainConfig, "epochs", 10)
    batch_size: int = redefault(TrainConfig, "batch_size", 64)
    grad_clip: float = redefault(TrainConfig, "grad_clip", 1.0)


@dataclass(frozen=True)
class LMOptim(OptimConfig):
    name: str = redefault(OptimConfig, "name", "adamw")
    lr: float = redefault(OptimConfig, "lr", 1e-3)
    betas: tuple[float, float] = redefault(OptimConfig, "betas", (0.9, 0.99))
    weight_decay: float = redefault(OptimConfig, "weight_decay", 0.1)


@dataclass(frozen=True)
class LMSched(SchedConfig):
    warmup_epochs: float = redefault(SchedConfig, "warmup_epochs", 0.1)
    final_lr: float = redefault(SchedConfig, "final_lr", 0.1)


@dataclass(frozen=True)
class SampleConfig:
    """Text generated from the model: at the end of training (and at evaluations), and by
    ``python -m trainers.lm sample RUN_DIR``."""

    prompt: str = setting("\n", "the text generation starts from", changes_run=False)
    tokens: int = setting(300, "tokens to generate", ge=0, changes_run=False)
    temperature: float = setting(0.8, "softmax temperature (lower: safer, higher: more varied)", gt=0,
                                 changes_run=False)
    top_k: int = setting(200, "sample among the k most likely tokens (0: all)", ge=0, changes_run=False)
    every_eval: bool = setting(False, "also sample at every evaluation, not only at the end", changes_run=False)
    seed: int = setting(0, "seed of the sampling (the same seed and weights give the same text)", ge=0,
                        changes_run=False)


@dataclass(frozen=True)
class LMConfig(Config):
    data: LMData = field(default_factory=LMData)
    model: LMModel = field(default_factory=LMModel)
    train: LMTrain = field(default_factory=LMTrain)
    optim: LMOptim = field(default_factory=LMOptim)
    sched: LMSched = field(default_factory=LMSched)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def check(self) -> None:
        if self.model.width % self.model.heads:
            raise ConfigError(f"model.width={self.model.width} does not divide into model.heads={self.model.heads} "
                              f"heads; choose a width that is a multiple of the heads (e.g. "
                              f"{self.model.heads * max(1, round(self.model.width / self.model.heads))}).")
