"""``python -m bench``: every speed target of the toolkit in one table, measured side by side in one run.

Each row compares two settings on this machine, alternating them over ``--repeats`` rounds (these
machines are noisy) and comparing medians; it prints its target and ``met`` or ``MISSED``, and the last
line counts the targets met. Where a row runs (ranks, each rank's device, the precision of both sides) is
decided up front by ``bench.plan`` from the hardware, and stated in the row. No timing threshold lives in
the unit tests: this is where speed is judged.

    python -m bench [--repeats 3] [--quick] [--json FILE] [--data ../shared/data/cifar10-dev]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.plan import Hardware, RowPlan, plan

REPO = Path(__file__).resolve().parents[1]
#: The real CIFAR-10 sample of this project's machines, for the CPU recipe row when it is there.
DEV_DATA = REPO.parent / "shared" / "data" / "cifar10-dev"
#: How much less accurate than its reference the toolkit may be for a time ratio to count.
ACCURACY_MARGIN = 0.005


@dataclass
class Row:
    name: str
    compared: str  # "a vs b", with where it ran
    value: float  # the measured ratio or fraction (nan when skipped)
    target: str  # e.g. ">= 3.0"
    met: bool | None  # None: skipped here
    detail: str = ""


def interleaved(a: Callable[[], float], b: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Medians of a() and b(), called alternately so both see the same machine state."""
    xs, ys = [], []
    for _ in range(repeats):
        xs.append(a())
        ys.append(b())
    return statistics.median(xs), statistics.median(ys)


def where(rp: RowPlan) -> str:
    return f"{rp.ranks} x {rp.device}, {rp.precision}"


def at_least(rp: RowPlan, compared: str, value: float, bound: float, detail: str = "") -> Row:
    return Row(rp.name, f"{compared} [{where(rp)}]", value, f">= {bound:.3g}", value >= bound, detail)


def at_most(rp: RowPlan, compared: str, value: float, bound: float, detail: str = "") -> Row:
    return Row(rp.name, f"{compared} [{where(rp)}]", value, f"<= {bound:.3g}", value <= bound, detail)


def gated(row: Row, ours: float, reference: float) -> Row:
    """A time ratio counts only if the toolkit's side is at least as accurate as its reference (within
    ACCURACY_MARGIN): a faster run that learns less has not met anything."""
    row.detail += f", test acc {ours:.3f} vs {reference:.3f}"
    if ours < reference - ACCURACY_MARGIN:
        row.met = False
        row.detail += " (less accurate than the reference: MISSED whatever the time)"
    return row


# ------------------------------------------------------------------------------------- the rows

#: The training set of the 2-rank rows under --quick (a smoke run: that they run and report, not their figures).
QUICK_TRAIN = "data.synthetic_train_size=256"


def loader_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """The device-resident loader (uint8 gather, normalise, batched crop+flip) vs torchvision's per-image pipeline
    (PIL crop and flip, ToTensor, Normalize in a DataLoader, best of 0 and 2 workers)."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from bench.loader_throughput import epoch_seconds
    from trainers.cifar_data import CIFAR10_MEAN, CIFAR10_STD, synthetic_cifar10

    samples = 1024 if quick else 20_000
    device = torch.device(rp.device)
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
    return at_least(rp, "device loader vs torchvision per-image", ours / theirs, 20.0 if device.type == "cuda" else 3.0,
                    f"{ours:,.0f} vs {theirs:,.0f} img/s")


def overhead_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """The toolkit's loop vs a hand-written one (same model, batches, optimizer, device, fp32): time, same weights."""
    from bench.trainer_overhead import by_hand, toolkit

    samples, device = (2048 if quick else 10_000), torch.device(rp.device)
    kit, hand, identical = [], [], True
    for _ in range(repeats):  # interleaved
        seconds, w_kit = toolkit(samples, device)
        kit.append(seconds)
        seconds, w_hand = by_hand(samples, device)
        hand.append(seconds)
        identical = identical and torch.equal(w_kit, w_hand)
    row = at_most(rp, "toolkit loop vs hand-written (time)", statistics.median(kit) / statistics.median(hand), 1.05,
                  "identical weights" if identical else "WEIGHTS DIFFER")
    row.met = bool(row.met) and identical
    return row


def data_parallel_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """2 gloo ranks x 1 thread vs 1 process x 2 threads, same global batch: throughput ratio."""
    from bench.runs import DEBUG_STEPS, samples_per_second

    steps = [*DEBUG_STEPS, *rp.overrides(), *([QUICK_TRAIN] if quick else [])]
    two, one = interleaved(lambda: samples_per_second(2, 1, steps), lambda: samples_per_second(1, 2, steps), repeats)
    return at_least(rp, "2 ranks x 1 thread vs 1 x 2 threads", two / one, 0.8, f"{two:,.0f} vs {one:,.0f} samples/s")


def logging_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """Logging and metrics as by default (a line and a record every 50 steps) vs none."""
    from bench.runs import FAST_STEPS, samples_per_second

    steps = [*FAST_STEPS, *rp.overrides(), *([QUICK_TRAIN] if quick else [])]
    on, off = interleaved(lambda: samples_per_second(2, 1, steps, "logging-on"), lambda: samples_per_second(2, 1, steps),
                          repeats)
    return at_least(rp, "defaults vs off (samples/s)", on / off, 0.97, f"{on:,.0f} vs {off:,.0f} samples/s")


def checkpoint_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """The time training is blocked by one save, as a fraction of an epoch of the debug recipe (1 process),
    written in place or in the background (``checkpoint.async``)."""
    from bench.runs import DEBUG_WIDTH
    from launcher.config import load_config
    from launcher.env import resolve_env
    from launcher.runtime import distributed
    from trainers.cifar import CifarConfig, CifarTask
    from trainers.core.trainer import Trainer

    background = "async" in rp.name
    blocked, epochs = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = load_config(REPO / "configs" / "cifar_debug.yaml", [
                f"run.dir={run_dir}", "run.progress=quiet", "checkpoint.resume=never", DEBUG_WIDTH, *rp.overrides(),
                f"checkpoint.async={str(background).lower()}", *(["data.synthetic_train_size=512"] if quick else [])],
                schema=CifarConfig)
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
                trainer.checkpointer.close()
                trainer.sink.close()
    fraction = statistics.median(blocked) / statistics.median(epochs)
    return at_most(rp, "blocked by one save / epoch", fraction, 0.02,
                   f"{statistics.median(blocked) * 1000:.1f} ms of a {statistics.median(epochs):.2f} s epoch")


def stop_check_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """The stop-signal agreement (amortized, the default) vs none, at a few hundred steps per second: epochs with
    and without it alternate within the same 2-rank run (finer interleaving than separate runs, whose run-to-run
    noise here is larger than the cost being measured)."""
    from bench.runs import stop_check_rates

    with_check, without = stop_check_rates(epochs=2 if quick else 4 * max(repeats, 3),
                                           overrides=[*rp.overrides(), *([QUICK_TRAIN] if quick else [])])
    a, b = statistics.median(with_check), statistics.median(without)
    return at_least(rp, "with vs without (steps/s)", a / b, 0.99, f"{a:,.0f} vs {b:,.0f} steps/s")


#: The fast recipe's workload per device: (training images, test images, batch, epochs). On a GPU it is the
#: recipe itself on CIFAR-shaped data (10 epochs of 50,000).
FAST_WORKLOAD = {"cuda": (50_000, 10_000, 1024, 10), "cpu": (1024, 500, 256, 2)}
QUICK_WORKLOAD = (512, 250, 256, 1)
#: --quick also narrows the network of the fast-recipe rows to a quarter of airbench94's widths (64/256/256), on
#: both sides of each row: a smoke run checks that the rows run and report, and full widths cost most of its time.
QUICK_WIDTHS = (16, 64, 64)


def _narrow(quick: bool) -> tuple[str, ...]:
    """The toolkit's override for QUICK_WIDTHS under --quick (none otherwise)."""
    return (f"model.widths=[{','.join(map(str, QUICK_WIDTHS))}]",) if quick else ()


def _widths(quick: bool) -> tuple[int, int, int]:
    """The reference loops' widths: QUICK_WIDTHS under --quick, airbench94's otherwise."""
    from trainers.models import AIRBENCH_WIDTHS

    return QUICK_WIDTHS if quick else AIRBENCH_WIDTHS


#: Keys that turn every device-aware default off: fp32, NCHW, eager.
ALL_OFF = ("train.precision=fp32", "model.channels_last=false", "model.compile=false")


def loop_overhead_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """configs/cifar_fast.yaml through ``Trainer.fit()`` (metrics, logging, exact evaluation with TTA, final
    checkpoint) vs the same recipe in a plain loop made of the toolkit's own pieces (bench/airbench_loop.py), both
    fp32 on the same device: what the loop costs, nothing about airbench itself."""
    from bench.airbench_loop import reference_run, toolkit_run

    work, device = (QUICK_WORKLOAD if quick else FAST_WORKLOAD[rp.device]), torch.device(rp.device)
    accuracy: dict[str, list[float]] = {"kit": [], "ref": []}

    def timed(run: Callable[[], tuple[float, float]], key: str) -> float:
        seconds, acc = run()
        accuracy[key].append(acc)
        return seconds

    overrides = (*rp.overrides(), *_narrow(quick))
    if not quick:  # warm-up: allocations, first-step costs
        toolkit_run(*work[:3], 1, overrides), reference_run(*work[:3], 1, device, half=False)
    kit, ref = interleaved(lambda: timed(lambda: toolkit_run(*work, overrides), "kit"),
                           lambda: timed(lambda: reference_run(*work, device, half=False, widths=_widths(quick)),
                                         "ref"), repeats)
    row = at_most(rp, "toolkit vs a plain loop of its pieces (time)", kit / ref, 1.05,
                  f"{kit:.2f} vs {ref:.2f} s for {work[3]} epoch(s) of {work[0]:,} images")
    return gated(row, statistics.median(accuracy["kit"]), statistics.median(accuracy["ref"]))


def reference_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """The fast recipe through the toolkit vs airbench94 as its authors wrote it: on a GPU the published ``airbench``
    package run as published (its ``.cuda().half()`` path); on the CPU an independent hand-written airbench94
    (bench/reference_airbench.py). Same data and device; each side warmed up once, the whitening set-up timed on
    both, compile on neither. The time ratio counts only at the reference's accuracy or better."""
    from bench.airbench_loop import toolkit_run

    work = QUICK_WORKLOAD if quick else FAST_WORKLOAD[rp.device]
    if rp.device == "cuda" and importlib.util.find_spec("airbench") is None:
        return Row(rp.name, f"vs {rp.reference} [{where(rp)}]", float("nan"), "<= 1", None,
                   "the airbench package is not installed: pip install airbench (make gpu-check does)")
    published = rp.device == "cuda"
    overrides = ("model.compile=false",) if published else ("train.precision=fp32", "model.compile=false",
                                                            *_narrow(quick))  # the package's widths are its own
    reference: Callable[[tuple[int, int, int, int]], tuple[float, float]] = (
        _published_airbench if published else lambda w: _independent_airbench(w, _widths(quick)))
    if not quick:  # warm-up, as airbench times itself: compile and autotuning are not timed
        toolkit_run(*work[:3], 1, overrides), reference(work[:3] + (1,))
    accuracy: dict[str, list[float]] = {"kit": [], "ref": []}

    def kit() -> float:
        seconds, acc = toolkit_run(*work, overrides)
        accuracy["kit"].append(acc)
        return seconds

    def ref() -> float:
        seconds, acc = reference(work)
        accuracy["ref"].append(acc)
        return seconds

    ours, theirs = interleaved(kit, ref, repeats)
    ours_acc, ref_acc = statistics.median(accuracy["kit"]), statistics.median(accuracy["ref"])
    projected = f"; time to 94%: {ours:.1f} s" if ours_acc >= 0.94 else ""
    row = at_most(rp, f"toolkit vs {rp.reference} (time)", ours / theirs, 1.0 if rp.device == "cuda" else 1.05,
                  f"{ours:.2f} vs {theirs:.2f} s for {work[3]} epoch(s) of {work[0]:,} images{projected}")
    return gated(row, ours_acc, ref_acc)


def _workload_tensors(train: int, test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The toolkit's synthetic splits (the same images the toolkit's side trains on), as uint8 tensors."""
    from trainers.cifar import SYNTHETIC_SEED
    from trainers.cifar_data import synthetic_cifar10

    fit, held_out = synthetic_cifar10(train, SYNTHETIC_SEED, train=True), synthetic_cifar10(test, SYNTHETIC_SEED,
                                                                                             train=False)
    return fit.images, fit.labels, held_out.images, held_out.labels


def _independent_airbench(work: tuple[int, int, int, int], widths: tuple[int, int, int]) -> tuple[float, float]:
    from bench.reference_airbench import train_and_evaluate

    train, test, batch, epochs = work
    return train_and_evaluate(*_workload_tensors(train, test), epochs=epochs, batch=batch, widths=widths)


def _published_airbench(work: tuple[int, int, int, int]) -> tuple[float, float]:
    from bench.airbench_package import train_and_evaluate

    train, test, batch, epochs = work
    return train_and_evaluate(*_workload_tensors(train, test), epochs=epochs, batch=batch)


def defaults_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """The device-aware defaults (precision, memory format, compile) vs all of them off, on the fast recipe."""
    from bench.airbench_loop import toolkit_seconds

    work = QUICK_WORKLOAD if quick else FAST_WORKLOAD[rp.device]
    pin = (f"dist.device={rp.device}", *_narrow(quick))
    auto, off = interleaved(lambda: toolkit_seconds(*work, overrides=pin),
                            lambda: toolkit_seconds(*work, overrides=pin + ALL_OFF), repeats)
    return at_least(rp, "auto vs all off (speed)", off / auto, 1.0, f"{auto:.2f} vs {off:.2f} s")


def cpu_recipe_row(rp: RowPlan, repeats: int, quick: bool, data: Path | None) -> Row:
    """configs/cifar_fast_cpu.yaml (a quarter of the widths, twice the epochs) vs configs/cifar_fast.yaml at full
    width and 10 epochs, on the CPU: the CPU recipe must reach at least the full-width accuracy in at most a third of
    its time (real CIFAR-10 images when ``--data`` holds some; synthetic ones otherwise, which the row says)."""
    from bench.airbench_loop import toolkit_run

    real = data is not None and (data / "cifar-10-batches-py").is_dir()
    source = [f"data.root={data}", "data.synthetic=false", "data.download=false"] if real else []
    train, test, batch = (128, 100, 64) if quick else (0, 0, 256)  # 0: the whole real split
    full_epochs = 1 if quick else 10
    cpu_epochs = 2 if quick else 20
    common = (*rp.overrides(), *source)
    accuracy: dict[str, list[float]] = {"cpu": [], "full": []}

    def run(config: str, epochs: int, key: str) -> float:
        seconds, acc = toolkit_run(train or 50_000, test or 10_000, batch, epochs, common, config=config)
        accuracy[key].append(acc)
        return seconds

    cpu, full = interleaved(lambda: run("cifar_fast_cpu.yaml", cpu_epochs, "cpu"),
                            lambda: run("cifar_fast.yaml", full_epochs, "full"), repeats)
    what = f"real CIFAR-10 at {data}" if real else "synthetic images (no --data)"
    row = at_most(rp, "cifar_fast_cpu vs cifar_fast (time)", cpu / full, 1 / 3,
                  f"{cpu:.1f} vs {full:.1f} s, {cpu_epochs} vs {full_epochs} epochs, {what}")
    return gated(row, statistics.median(accuracy["cpu"]), statistics.median(accuracy["full"]))


def lm_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """Tokens/s of the language-model task through the toolkit vs a hand-written nanoGPT-style loop (same model,
    windows, order and AdamW, fp32, one device; identical weights), with the model's FLOPs per token and the FLOP/s
    the toolkit achieves (to read against the hardware's peak)."""
    from bench.lm_overhead import by_hand, flops, toolkit

    device, extra = torch.device(rp.device), (["data.synthetic_bytes=32768"] if quick else [])
    kit, hand, identical = [], [], True
    for _ in range(repeats):  # interleaved
        seconds, tokens, w_kit = toolkit(device, extra)
        kit.append(seconds / tokens)
        seconds, tokens, w_hand = by_hand(device, extra)
        hand.append(seconds / tokens)
        identical = identical and torch.equal(w_kit, w_hand)
    per_token = flops(extra)
    rate = 1 / statistics.median(kit)
    row = at_most(rp, "toolkit vs a nanoGPT-style loop (time per token)", statistics.median(kit) /
                  statistics.median(hand), 1.05, f"{rate:,.0f} vs {1 / statistics.median(hand):,.0f} tokens/s, "
                  f"{'identical weights' if identical else 'WEIGHTS DIFFER'}, {per_token / 1e6:.2f} MFLOP/token, "
                  f"{rate * per_token / 1e9:.2f} GFLOP/s")
    row.met = bool(row.met) and identical
    return row


_SHARDED: dict[tuple[str, int, bool], dict[str, dict[str, float]]] = {}


def sharded_row(rp: RowPlan, repeats: int, quick: bool) -> Row:
    """FSDP against DDP on 2 ranks of lm_debug (bench/sharded.py), measured once for the four rows."""
    from bench.sharded import compare

    key = (rp.device, repeats, quick)
    if key not in _SHARDED:
        _SHARDED[key] = compare(repeats, [*rp.overrides(), *(["data.synthetic_bytes=8192"] if quick else [])])
    m = _SHARDED[key]
    ddp, fsdp = m["ddp"], m["fsdp"]
    if rp.name == "FSDP step time":
        ratio = fsdp["step_s"] / ddp["step_s"]
        return Row(rp.name, f"FSDP vs DDP (time per step) [{where(rp)}]", ratio, "reported", True,
                   f"{fsdp['step_s'] * 1000:.1f} vs {ddp['step_s'] * 1000:.1f} ms")
    if rp.name == "FSDP memory":
        return at_most(rp, "FSDP vs DDP (bytes per rank)", fsdp["bytes"] / ddp["bytes"], 0.55,
                       f"{fsdp['bytes']:,.0f} vs {ddp['bytes']:,.0f} bytes in weights, gradients, optimizer state")
    r = m["fsdp-async"] if "async" in rp.name else fsdp
    return at_most(rp, "blocked by one sharded save / epoch", r["blocked_s"] / r["epoch_s"], 0.02,
                   f"{r['blocked_s'] * 1000:.1f} ms of a {r['epoch_s']:.2f} s epoch")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def table(rows: list[Row]) -> str:
    lines = ["| # | benchmark | compared | value | target | |", "| --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(rows, 1):
        verdict = "skipped" if r.met is None else "met" if r.met else "MISSED"
        value = "-" if math.isnan(r.value) else f"{r.value:.3f}"
        lines.append(f"| {i} | {r.name} | {r.compared} ({r.detail}) | {value} | {r.target} | {verdict} |")
    ran = [r for r in rows if r.met is not None]
    lines.append(f"\n{sum(bool(r.met) for r in ran)}/{len(ran)} targets met"
                 + (f" ({len(rows) - len(ran)} skipped here)" if len(ran) < len(rows) else ""))
    return "\n".join(lines)


RUNNERS: dict[str, Callable[[RowPlan, int, bool], Row]] = {
    "loader": loader_row, "trainer overhead": overhead_row, "data parallel": data_parallel_row,
    "logging": logging_row, "checkpoint (sync)": checkpoint_row, "checkpoint (async)": checkpoint_row,
    "stop check": stop_check_row, "loop overhead": loop_overhead_row, "against the reference": reference_row,
    "device defaults": defaults_row, "LM tokens/s": lm_row, "FSDP step time": sharded_row, "FSDP memory": sharded_row,
    "sharded checkpoint (sync)": sharded_row, "sharded checkpoint (async)": sharded_row,
}


def run_row(rp: RowPlan, repeats: int, quick: bool, data: Path | None) -> Row:
    if rp.skipped:
        return Row(rp.name, f"vs {rp.reference} [{where(rp)}]", float("nan"), "-", None, rp.skipped)
    if rp.name == "CPU fast recipe":
        return cpu_recipe_row(rp, repeats, quick, data)
    return RUNNERS[rp.name](rp, repeats, quick)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per row (medians)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run, not a measurement)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--data", type=Path, default=DEV_DATA if DEV_DATA.is_dir() else None,
                        help="a folder with real CIFAR-10 (cifar-10-batches-py) for the CPU recipe row")
    args = parser.parse_args()
    hardware = Hardware.here()
    print(f"machine: {machine()}; {args.repeats} interleaved repeats per row, medians", flush=True)
    rows: list[Row] = []
    for rp in plan(hardware):
        started = time.perf_counter()
        rows.append(run_row(rp, args.repeats, args.quick, args.data))
        verdict = "skipped" if rows[-1].met is None else "met" if rows[-1].met else "MISSED"
        print(f"  {rp.name}: {rows[-1].value:.3f} ({rows[-1].target}) {verdict} "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)
        if args.json:  # after every row: a cut-short run still leaves what it measured
            args.json.write_text(json.dumps({"machine": machine(), "rows": [asdict(r) for r in rows]}, indent=1))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
