"""Language modelling: ``python -m trainers.lm [--config FILE] [key=value ...]``, and
``python -m trainers.lm sample RUN_DIR [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S]``.

A decoder-only transformer (trainers/gpt.py) learns the bytes of any UTF-8 text file (``data.path``; no tokenizer to
download) or the ids of a pre-tokenized uint16 ``.bin`` file. The end of the corpus (``data.val_fraction``) is held
out. Training samples are windows of ``data.seq_len`` tokens at random offsets, drawn on the device from
``(seed, epoch, sample index)``, so that a resumed run and any world size see the same windows; evaluation covers the
held-out tokens with fixed, non-overlapping windows (the last one shorter), each window once at any world size and
every token weighted the same. Metrics are exact sums: the mean loss in nats per token, bits per byte (text) and
perplexity. At the end (and at evaluations with ``sample.every_eval``) rank 0 prints a sample of generated text and
appends it to ``RUN_DIR/samples.txt``.
"""

from __future__ import annotations

import sys

from trainers.core.cli import begin_main
from trainers.lm_config import LMConfig

if __name__ == "__main__" and sys.argv[1:2] != ["sample"]:
    begin_main(LMConfig, "python -m trainers.lm", "lm")  # --help and config errors: before torch

# The heavy imports come after the --help check on purpose.
import argparse
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from launcher.config import load_config
from launcher.errors import USAGE_EXIT_CODE, DatasetUnavailable, UserError
from launcher.runtime import Runtime
from trainers.core import BatchInfo, Metric, Task, TensorSplit, run_task
from trainers.gpt import GPT
from trainers.lm_data import BYTES, Corpus, download_text, read_corpus, synthetic_corpus


class TokenLoss(Metric):
    """Mean next-token cross-entropy in nats over every held-out token (padding, marked -1, not counted)."""

    size = 2  # loss sum, token count
    higher_is_better = False

    def update(self, sums: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        losses = F.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none")
        sums[0] += losses.double().sum()
        sums[1] += (targets >= 0).sum()

    def compute(self, sums: torch.Tensor) -> float:
        return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")


class BitsPerToken(TokenLoss):
    """The same loss in bits: bits per byte when the tokens are bytes."""

    def compute(self, sums: torch.Tensor) -> float:
        return super().compute(sums) / math.log(2)


class Perplexity(TokenLoss):
    """exp(mean loss): the number of equally likely choices the model is left with, on average."""

    def compute(self, sums: torch.Tensor) -> float:
        return math.exp(super().compute(sums))


def _windows(tokens: torch.Tensor, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``tokens[s : s + length]`` and next-token targets for each start, targets past the end marked -1
    (and their inputs filled with a valid id)."""
    positions = starts[:, None] + torch.arange(length + 1, device=tokens.device)
    inside = positions < len(tokens)
    ids = tokens[positions.clamp(max=len(tokens) - 1)]
    targets = torch.where(inside[:, 1:], ids[:, 1:], -1)
    return torch.where(inside[:, :-1], ids[:, :-1], 0), targets


class LMTask(Task[LMConfig]):
    """Next-token prediction on a text (bytes) or a pre-tokenized corpus."""

    name = "lm"
    config = LMConfig

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__(cfg)
        self.corpus: Corpus | None = None
        self.train_tokens = self.eval_tokens = torch.empty(0, dtype=torch.int64)
        self.rank, self.source = 0, ""
        self._offsets: tuple[tuple[int, int, torch.device], torch.Tensor] | None = None
        self._arange: torch.Tensor | None = None

    # ------------------------------------------------------------------ data
    def build_data(self, rt: Runtime) -> tuple[TensorSplit, TensorSplit]:
        self.rank = rt.rank
        self.corpus = self._corpus(rt)
        seq = self.cfg.data.seq_len
        self.train_tokens, self.eval_tokens = self.corpus.split(self.cfg.data.val_fraction, seq)
        # A sample is an index: windows are cut on the device by transform(); an epoch has about one pass of tokens.
        train = TensorSplit(torch.arange(max(1, (len(self.train_tokens) - 1) // seq)))
        evaluation = TensorSplit(torch.arange(math.ceil((len(self.eval_tokens) - 1) / seq)))
        self.source = (f"{self.corpus.source}: {len(self.train_tokens):,} training / {len(self.eval_tokens):,} "
                       f"held-out tokens, vocabulary {self.corpus.vocab_size}")
        return train, evaluation

    def _corpus(self, rt: Runtime) -> Corpus:
        data = self.cfg.data
        if data.synthetic:
            return synthetic_corpus(data.synthetic_bytes)
        path = Path(data.path)
        problem: str | None = None
        try:
            if not path.exists() and data.download and rt.env.local_rank == 0:
                download_text(data.url, path)  # one download per node; the others read the file after the agreement
        except DatasetUnavailable as e:
            problem = str(e)
        problems = [p for p in rt.gather_objects(problem, "corpus download") if p]
        if not problems:
            try:
                return read_corpus(path, data.vocab_size)
            except DatasetUnavailable as e:
                if not data.synthetic_fallback:
                    raise
                problems = [str(e)]
        if not data.synthetic_fallback:
            raise DatasetUnavailable(problems[0], same_on_every_rank=True)
        if rt.is_main:
            print(f"warning: {problems[0]}\nUsing a generated corpus instead (data.synthetic_fallback=true).",
                  file=sys.stderr)
        return synthetic_corpus(data.synthetic_bytes)

    def describe(self) -> dict[str, str]:
        return {"data": self.source}

    def transform(self, batch: Any, info: BatchInfo) -> Any:
        (index,) = batch
        seq = self.cfg.data.seq_len
        if info.train:
            # Training windows always fit (offsets < len - seq): one gather, no padding.
            starts = self._train_offsets(info.seed, info.epoch, index.device)[index]
            windows = self._on(index.device, "train")[starts[:, None] + self._span(index.device)]
            return windows[:, :-1], windows[:, 1:]
        return _windows(self._on(index.device, "eval"), index * seq, seq)

    def _on(self, device: torch.device, part: str) -> torch.Tensor:
        """The training or held-out tokens on ``device`` (moved once)."""
        name = f"{part}_tokens"
        tokens: torch.Tensor = getattr(self, name)
        if tokens.device != device:
            tokens = tokens.to(device)
            setattr(self, name, tokens)
        return tokens

    def _span(self, device: torch.device) -> torch.Tensor:
        """0 .. seq_len, on ``device`` (made once)."""
        if self._arange is None or self._arange.device != device:
            self._arange = torch.arange(self.cfg.data.seq_len + 1, device=device)
        return self._arange

    def _train_offsets(self, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
        """Every training sample's window start in this epoch: a pure function of (seed, epoch, sample index)."""
        key = (seed, epoch, device)
        if self._offsets is None or self._offsets[0] != key:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            count = max(1, (len(self.train_tokens) - 1) // self.cfg.data.seq_len)
            starts = torch.randint(0, len(self.train_tokens) - self.cfg.data.seq_len, (count,), generator=g)
            self._offsets = key, starts.to(device)
        return self._offsets[1]

    # ------------------------------------------------------------------ model and loss
    def build_model(self) -> nn.Module:
        m = self.cfg.model
        vocab = self.corpus.vocab_size if self.corpus is not None else BYTES
        return GPT(vocab, self.cfg.data.seq_len, m.layers, m.width, m.heads, m.dropout)

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), self.targets(batch).flatten(), ignore_index=-1)

    def metrics(self) -> dict[str, Metric]:
        byte_level = self.corpus is None or self.corpus.byte_level
        return {"loss": TokenLoss(), "bpb" if byte_level else "bits_per_token": BitsPerToken(), "ppl": Perplexity()}

    # ------------------------------------------------------------------ samples of generated text
    def after_evaluation(self, model: nn.Module, results: dict[str, Any], step: int, last: bool) -> None:
        if not (last or self.cfg.sample.every_eval) or not self.cfg.sample.tokens:
            return
        # Every rank generates the same text (the same weights and seed): a sharded model's forward is a collective.
        text = sample_text(model, self.cfg.sample.prompt, self.cfg.sample.tokens, self.cfg.sample.temperature,
                           self.cfg.sample.top_k, self.cfg.sample.seed, self.corpus is None or self.corpus.byte_level)
        if self.rank != 0:
            return
        print(f"sample at step {step}:\n{self.cfg.sample.prompt}{text}", flush=True)
        with open(Path(self.cfg.run.dir) / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"--- step {step} (temperature {self.cfg.sample.temperature:g}, top_k {self.cfg.sample.top_k}, "
                    f"seed {self.cfg.sample.seed})\n{self.cfg.sample.prompt}{text}\n")


def sample_text(model: nn.Module, prompt: str, tokens: int, temperature: float, top_k: int, seed: int,
                byte_level: bool = True) -> str:
    """``tokens`` generated after ``prompt`` (bytes of UTF-8 text; for .bin corpora, comma-separated ids)."""
    device = next(model.parameters()).device
    ids = list(prompt.encode("utf-8")) if byte_level else [int(t) for t in prompt.split(",") if t.strip()]
    was_training = model.training
    model.eval()
    try:
        out = model.generate(torch.tensor(ids or [0], device=device), tokens, temperature, top_k,  # type: ignore[operator]
                             torch.Generator(device=device).manual_seed(seed))
    finally:
        model.train(was_training)
    if byte_level:
        return bytes(out.tolist()).decode("utf-8", errors="replace")
    return ",".join(str(t) for t in out.tolist())


def sample_command(argv: Sequence[str]) -> int:
    """``python -m trainers.lm sample RUN_DIR ...``: text from a run's model.pt, with its own settings."""
    parser = argparse.ArgumentParser(prog="python -m trainers.lm sample",
                                     description="Generate text from a finished (or stopped) run's model.pt.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.run_dir / "config.yaml", [], schema=LMConfig)
        weights_path = args.run_dir / "model.pt"
        if not weights_path.is_file():
            raise UserError(f"{weights_path} does not exist: the run has not finished yet (its checkpoints are in "
                            f"{args.run_dir / 'checkpoints'}); let it finish, or give the directory of a finished run.")
        weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT_CODE
    vocab = weights["embed.weight"].shape[0]
    m = cfg.model
    model = GPT(vocab, cfg.data.seq_len, m.layers, m.width, m.heads, m.dropout)
    model.load_state_dict(weights)
    s = cfg.sample
    prompt = s.prompt if args.prompt is None else args.prompt
    text = sample_text(model, prompt, s.tokens if args.tokens is None else args.tokens,
                       s.temperature if args.temperature is None else args.temperature,
                       s.top_k if args.top_k is None else args.top_k, s.seed if args.seed is None else args.seed,
                       byte_level=vocab == BYTES and not cfg.data.path.endswith(".bin"))
    print(prompt + text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trainers.lm``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["sample"]:
        return sample_command(args[1:])
    return run_task(LMTask, args)


if __name__ == "__main__":
    sys.exit(main())
