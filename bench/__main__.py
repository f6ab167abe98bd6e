"""``python -m bench``: every speed target of the toolkit in one table, measured side by side in one run.

Each row compares two settings on this machine, alternating them over ``--repeats`` rounds (these
machines are noisy) and comparing medians; it prints its target and ``met`` or ``MISSED``, and the last
line counts the targets met. No timing threshold lives in the unit tests: this is where speed is judged.

    python -m bench [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Row:
    name: str
    compared: str  # "a vs b"
    value: float  # the measured ratio or fraction
    target: str  # e.g. ">= 3.0"
    met: bool
    detail: str = ""


def interleaved(a: Callable[[], float], b: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Medians of a() and b(), called alternately so both see the same machine state."""
    xs, ys = [], []
    for _ in range(repeats):
        xs.append(a())
        ys.append(b())
    return statistics.median(xs), statistics.median(ys)


def at_least(name: str, compared: str, value: float, bound: float, detail: str = "") -> Row:
    return Row(name, compared, value, f">= {bound:g}", value >= bound, detail)


def at_most(name: str, compared: str, value: float, bound: float, detail: str = "") -> Row:
    return Row(name, compared, value, f"<= {bound:g}", value <= bound, detail)


# ------------------------------------------------------------------------------------- the rows


def loader_row(repeats: int, samples: int) -> Row:
    """1. The device-resident loader (uint8 gather, normalise, batched crop+flip) vs torchvision's per-image
    PIL pipeline in a DataLoader (best of 0 and 2 workers), both producing augmented float batches."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from bench.loader_throughput import epoch_seconds
    from trainers.cifar_data import CIFAR10_MEAN, CIFAR10_STD, synthetic_cifar10

    split = synthetic_cifar10(samples, seed=0)
    images = split.tensors[0].permute(0, 2, 3, 1).contiguous().numpy()  # HWC uint8, as the pickles hold
    labels = split.tensors[1].numpy()
    pipeline = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])

    class PerImage(Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return pipeline(Image.fromarray(images[i])), int(labels[i])

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def torchvision_rate() -> float:
        best = 0.0
        for workers in (0, 2):
            loader = DataLoader(PerImage(), batch_size=512, shuffle=True, num_workers=workers,
                                pin_memory=device.type == "cuda")
            start = time.perf_counter()
            for x, _ in loader:
                x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, samples / (time.perf_counter() - start))
        return best

    def device_rate() -> float:
        return samples / epoch_seconds("device", split, device, 512, 0)

    ours, theirs = interleaved(device_rate, torchvision_rate, repeats)
    bound = 20.0 if device.type == "cuda" else 3.0
    return at_least("loader", "device loader vs torchvision per-image", ours / theirs, bound,
                    f"{ours:,.0f} vs {theirs:,.0f} img/s")


def overhead_row(repeats: int, samples: int) -> Row:
    """2. The toolkit's loop vs a hand-written one (same model, batches, optimizer): time ratio, same weights."""
    from bench.trainer_overhead import by_hand, toolkit

    kit, hand, identical = [], [], True
    for _ in range(repeats):  # interleaved
        seconds, w_kit = toolkit(samples)
        kit.append(seconds)
        seconds, w_hand = by_hand(samples)
        hand.append(seconds)
        identical = identical and torch.equal(w_kit, w_hand)
    row = at_most("trainer overhead", "toolkit loop vs hand-written (time)",
                  statistics.median(kit) / statistics.median(hand), 1.05,
                  "identical weights" if identical else "WEIGHTS DIFFER")
    row.met = row.met and identical
    return row


def data_parallel_row(repeats: int) -> Row:
    """3. 2 gloo ranks x 1 thread vs 1 process x 2 threads, same global batch: throughput ratio."""
    from bench.runs import DEBUG_STEPS, samples_per_second

    two, one = interleaved(lambda: samples_per_second(2, 1, DEBUG_STEPS),
                           lambda: samples_per_second(1, 2, DEBUG_STEPS), repeats)
    return at_least("data parallel", "2 ranks x 1 thread vs 1 x 2 threads", two / one, 0.8,
                    f"{two:,.0f} vs {one:,.0f} samples/s")


def logging_row(repeats: int) -> Row:
    """4. Logging and metrics as by default (a line and a record every 50 steps) vs none."""
    from bench.runs import FAST_STEPS, samples_per_second

    on, off = interleaved(lambda: samples_per_second(2, 1, FAST_STEPS, "logging-on"),
                          lambda: samples_per_second(2, 1, FAST_STEPS), repeats)
    return at_least("logging", "defaults vs off (samples/s)", on / off, 0.97, f"{on:,.0f} vs {off:,.0f} samples/s")


def checkpoint_rows(repeats: int) -> list[Row]:
    """5. Time training is blocked by one save, as a fraction of an epoch of the debug recipe (1 process)."""
    from launcher.config import load_config
    from launcher.env import resolve_env
    from launcher.runtime import distributed
    from trainers.cifar import CifarConfig, CifarTask
    from trainers.core.trainer import Trainer

    rows = []
    root = Path(__file__).resolve().parents[1]
    for background in (False, True):
        blocked, epochs = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as run_dir:
                cfg = load_config(root / "configs" / "cifar_debug.yaml", [
                    f"run.dir={run_dir}", "run.progress=quiet", "checkpoint.resume=never",
                    f"checkpoint.async={str(background).lower()}"], schema=CifarConfig)
                with distributed(cfg.dist, resolve_env({})) as rt:
                    trainer = Trainer(CifarTask(cfg), rt, Path(run_dir))
                    trainer.train_epoch(0)  # warm-up
                    trainer.state.epoch, trainer.state.step_in_epoch = 1, 0  # as the end of an epoch leaves it
                    start = time.perf_counter()
                    trainer.train_epoch(1)
                    epochs.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    trainer.checkpointer.save(trainer.state.global_step)
                    blocked.append(time.perf_counter() - start)
                    if trainer.checkpointer.writer is not None:
                        trainer.checkpointer.writer.wait()
                    trainer.sink.close()
        fraction = statistics.median(blocked) / statistics.median(epochs)
        kind = "async" if background else "sync"
        rows.append(at_most(f"checkpoint ({kind})", "blocked by one save / epoch", fraction, 0.02,
                            f"{statistics.median(blocked) * 1000:.1f} ms of a {statistics.median(epochs):.2f} s epoch"))
    return rows


def stop_check_row(repeats: int) -> Row:
    """6. The stop-signal agreement (amortized, the default) vs none, at a few hundred steps per second:
    epochs with and without it alternate within the same 2-rank run (finer interleaving than separate runs,
    whose run-to-run noise here is larger than the cost being measured)."""
    from bench.runs import stop_check_rates

    with_check, without = stop_check_rates(epochs=4 * max(repeats, 3))
    a, b = statistics.median(with_check), statistics.median(without)
    return at_least("stop check", "with vs without (steps/s)", a / b, 0.99, f"{a:,.0f} vs {b:,.0f} steps/s")


#: The fast recipe's workload per device: (training images, test images, batch, epochs). On a GPU it is the
#: recipe itself on CIFAR-shaped data (10 epochs of 50,000), so the toolkit's time projects the time to 94%.
FAST_WORKLOAD = {"cuda": (50_000, 10_000, 1024, 10), "cpu": (1024, 500, 256, 2)}
QUICK_WORKLOAD = (512, 250, 256, 1)
#: Keys that turn every device-aware default off: fp32, NCHW, eager.
ALL_OFF = ("train.precision=fp32", "model.channels_last=false", "model.compile=false")


def fast_recipe_rows(repeats: int, quick: bool) -> list[Row]:
    """7. configs/cifar_fast.yaml through the toolkit vs airbench94's own loop (re-implemented in
    bench/airbench_loop.py): same network, data and device, from a built model to a finished TTA evaluation.
    8. The device-aware defaults vs all of them off, on the same recipe."""
    from bench.airbench_loop import reference_run, toolkit_run, toolkit_seconds

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = QUICK_WORKLOAD if quick else FAST_WORKLOAD[device.type]
    accuracy: dict[str, list[float]] = {"kit": [], "ref": []}

    def timed(run: Callable[[], tuple[float, float]], key: str) -> float:
        seconds, acc = run()
        accuracy[key].append(acc)
        return seconds

    # One untimed run each first, as airbench times itself: torch.compile (on by default with CUDA) and
    # cuDNN's autotuning happen once per process, then both sides run warm.
    toolkit_run(*work[:3], 1), reference_run(*work[:3], 1, device)
    kit, ref = interleaved(lambda: timed(lambda: toolkit_run(*work), "kit"),
                           lambda: timed(lambda: reference_run(*work, device), "ref"), repeats)
    projected = f"; projected time to 94%: {kit:.1f} s" if device.type == "cuda" and not quick else ""
    acc = f"test acc {statistics.median(accuracy['kit']):.3f} vs {statistics.median(accuracy['ref']):.3f}"
    # the target on a GPU is "the same or less"; on the CPU the loop-overhead bound of row 2
    loop = at_most("fast recipe", "toolkit vs airbench94 loop (time)", kit / ref, 1.0 if device.type == "cuda" else 1.05,
                   f"{kit:.2f} vs {ref:.2f} s for {work[3]} epoch(s) of {work[0]:,} images, {acc}{projected}")
    auto, off = interleaved(lambda: toolkit_seconds(*work), lambda: toolkit_seconds(*work, overrides=ALL_OFF),
                            repeats)
    defaults = at_least("device defaults", f"auto vs all off on {device.type} (speed)", off / auto, 1.0,
                        f"{auto:.2f} vs {off:.2f} s")
    return [loop, defaults]


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def table(rows: list[Row]) -> str:
    lines = ["| # | benchmark | compared | value | target | |", "| --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r.name} | {r.compared} ({r.detail}) | {r.value:.3f} | {r.target} | "
                     f"{'met' if r.met else 'MISSED'} |")
    lines.append(f"\n{sum(r.met for r in rows)}/{len(rows)} targets met")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per row (medians)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run, not a measurement)")
    args = parser.parse_args()
    samples = 4096 if args.quick else 20_000
    print(f"machine: {machine()}; {args.repeats} interleaved repeats per row, medians", flush=True)
    rows: list[Row] = []
    for make in (lambda: [loader_row(args.repeats, samples)], lambda: [overhead_row(args.repeats, samples // 2)],
                 lambda: [data_parallel_row(args.repeats)], lambda: [logging_row(args.repeats)],
                 lambda: checkpoint_rows(args.repeats), lambda: [stop_check_row(args.repeats)],
                 lambda: fast_recipe_rows(args.repeats, args.quick)):
        for row in make():
            rows.append(row)
            print(f"  {row.name}: {row.value:.3f} ({row.target}) {'met' if row.met else 'MISSED'}", flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
