"""Tokens per second of the language-model task through the toolkit vs a hand-written nanoGPT-style loop: the same
model, the same windows in the same order, AdamW, one process, fp32; both must end with identical weights. Also
the model's training FLOPs per token and the FLOP/s both achieve, to read against the hardware's peak.

    python bench/lm_overhead.py [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from launcher.config import load_config
from launcher.env import resolve_env
from launcher.runtime import distributed
from trainers.core.rng import seed_everything
from trainers.core.trainer import Trainer
from trainers.gpt import GPT, flops_per_token
from trainers.lm import LMConfig, LMTask

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["data.synthetic_bytes=524288", "train.batch_size=32", "train.grad_clip=0", "optim.weight_decay=0",
            "sched.name=constant", "sched.warmup_epochs=0", "train.epochs=1", "model.dropout=0", "sample.tokens=0",
            "train.precision=fp32", "model.compile=false", "checkpoint.every_epochs=0", "run.progress=quiet",
            "checkpoint.resume=never"]


def _config(run_dir: str, device: torch.device, extra: list[str]) -> LMConfig:
    return load_config(REPO / "configs" / "lm_debug.yaml", [f"run.dir={run_dir}", f"dist.device={device.type}",
                                                            *SETTINGS, *extra], schema=LMConfig)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def toolkit(device: torch.device, extra: list[str] | None = None) -> tuple[float, int, torch.Tensor]:
    """(seconds, tokens, final flat weights) of one epoch of ``Trainer.train_epoch``."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = _config(run_dir, device, extra or [])
        with distributed(cfg.dist, resolve_env({})) as rt:
            trainer = Trainer(LMTask(cfg), rt, Path(run_dir))
            _sync(device)
            start = time.perf_counter()
            trainer.train_epoch(0)
            _sync(device)
            seconds = time.perf_counter() - start
            trainer.sink.close()
            tokens = trainer.steps_per_epoch * cfg.train.batch_size * cfg.data.seq_len
            return seconds, tokens, torch.cat([p.detach().reshape(-1).cpu() for p in trainer.model.parameters()])


def by_hand(device: torch.device, extra: list[str] | None = None) -> tuple[float, int, torch.Tensor]:
    """The same epoch as a nanoGPT-style loop: the sampler's order, windows at the task's offsets, AdamW."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = _config(run_dir, device, extra or [])
        with distributed(cfg.dist, resolve_env({})) as rt:
            task = LMTask(cfg)
            train_split, _ = task.build_data(rt)
    tokens = task.train_tokens.to(device)
    seq, batch, seed = cfg.data.seq_len, cfg.train.batch_size, cfg.run.seed
    starts = task._train_offsets(seed, 0, device)  # the windows of epoch 0: a function of (seed, epoch, index)
    order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed))  # DistributedSampler's
    m = cfg.model
    seed_everything(seed)
    model = GPT(task.corpus.vocab_size, seq, m.layers, m.width, m.heads, m.dropout).to(device)  # type: ignore[union-attr]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),  # type: ignore[arg-type]
                                  eps=cfg.optim.eps, weight_decay=0.0)
    offsets = torch.arange(seq + 1, device=device)
    _sync(device)
    start = time.perf_counter()
    steps = len(order) // batch
    for k in range(steps):
        idx = order[k * batch:(k + 1) * batch].to(device)
        windows = tokens[starts[idx][:, None] + offsets]
        loss = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - start, steps * batch * seq,
            torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]))


def flops(extra: list[str] | None = None) -> int:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = _config(run_dir, torch.device("cpu"), extra or [])
    m = cfg.model
    return flops_per_token(GPT(256, cfg.data.seq_len, m.layers, m.width, m.heads, 0.0), cfg.data.seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    kit, hand = [], []
    for _ in range(args.repeats):
        seconds, tokens, w_kit = toolkit(device)
        kit.append(tokens / seconds)
        seconds, tokens, w_hand = by_hand(device)
        hand.append(tokens / seconds)
    per_token = flops()
    a, b = statistics.median(kit), statistics.median(hand)
    print(f"toolkit {a:,.0f} tokens/s, by hand {b:,.0f} tokens/s: time ratio {b / a:.3f}; identical weights: "
          f"{torch.equal(w_kit, w_hand)}; {per_token / 1e6:.2f} MFLOP per token, {a * per_token / 1e9:.2f} GFLOP/s")


if __name__ == "__main__":
    main()
