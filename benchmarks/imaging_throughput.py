"""Imaging training throughput: DP-SGD (Opacus) against non-private, per model, batch and mode.

For each image model and batch size this times training steps without privacy and with each
Opacus ``grad_sample_mode`` ("hooks", "ew", "functorch", "ghost"), interleaving the runners so
that a machine shared with other work slows them alike, and reports the median over repeats:
images/second, the DP slowdown (DP step time / non-private step time), and peak memory.

Steps run on fixed synthetic batches of exactly the batch size (the model does the same work in
both arms; Poisson sampling's varying batch sizes would only add noise). Wall-clock numbers are
what a site sees; CPU-time numbers (process CPU seconds per step) are also reported because on a
shared CPU they are far less disturbed by other processes. The load average before and after the
run is recorded so contended results can be recognised.

    python -m benchmarks.imaging_throughput                  # CPU: small-cnn + plain-cnn
    python -m benchmarks.imaging_throughput --threads 1      # steadier on a busy shared CPU
    python -m benchmarks.imaging_throughput --quick          # < 60 s smoke run
    python -m benchmarks.imaging_throughput --device cuda    # both models, all modes
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import opacus
import torch
from opacus import PrivacyEngine
from torch import nn

from pm_common.data.synthetic_imaging import generate_site
from pm_common.models.images import build_image_model

MODES = ("hooks", "ew", "functorch", "ghost")
DEFAULT_OUT = Path(__file__).parent / "results" / "imaging_throughput.json"


@dataclass
class Result:
    """One (model, batch, arm) measurement; `mode` is "non-private" or an Opacus mode."""

    model: str
    batch: int
    mode: str
    images_per_s: float | None = None
    step_ms: float | None = None
    cpu_ms_per_step: float | None = None
    slowdown: float | None = None
    slowdown_cpu: float | None = None
    peak_mem_mb: float | None = None
    error: str | None = None


@dataclass
class Runner:
    """A model + optimizer ready to take steps on a fixed batch; `step` runs one."""

    mode: str
    step: Callable[[], None]
    clear: Callable[[], None]


def plain_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """A textbook small CNN, for contrast with SmallCNN's DP-cheap design in the same run:
    plain Conv2d with bias, affine GroupNorm, widths 16/32/64 at 32 px, average-pool head."""
    layers: list[nn.Module] = [nn.AvgPool2d(2)]
    channels = in_channels
    for i, width in enumerate((16, 32, 64)):
        if i > 0:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU()]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def pick_device(choice: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda` without a GPU is an error, not a silent CPU run."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def make_runner(
    model_name: str,
    mode: str,
    x: torch.Tensor,
    y: torch.Tensor,
    image_size: int,
    seed: int,
) -> Runner:
    """Build a fresh model for one arm; DP arms are wrapped by Opacus' `make_private`."""
    torch.manual_seed(seed)
    model = (
        plain_cnn(x.shape[1], 2)
        if model_name == "plain-cnn"
        else build_image_model(model_name, x.shape[1], 2, image_size)
    ).to(x.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion: Any = nn.CrossEntropyLoss()
    if mode != "non-private":
        # The loader only sets the sample rate here; timed steps use the fixed batch below.
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=len(y)
        )
        extra = {"criterion": criterion} if mode == "ghost" else {}
        wrapped = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            **extra,
        )
        model, optimizer = wrapped[0], wrapped[1]
        if mode == "ghost":
            criterion = wrapped[2]
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    def clear() -> None:
        optimizer.zero_grad(set_to_none=True)

    return Runner(mode, step, clear)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(runner: Runner, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step, averaged over `steps` steps."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        runner.step()
    _sync(device)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    """Release freed heap to the OS and reset the kernel's peak-RSS mark (Linux only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb(runner: Runner, device: torch.device) -> float | None:
    """Peak memory added by one training step.

    CUDA: torch.cuda.max_memory_allocated above what was allocated before the step.
    CPU: peak RSS (VmHWM, after resetting it) above RSS before the step; where the peak cannot
    be reset, ru_maxrss growth, which is only a lower bound (the peak never goes down).
    """
    runner.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if _reset_cpu_peak():
        before = _proc_status_kb("VmRSS")
        runner.step()
        peak = _proc_status_kb("VmHWM")
        if before is not None and peak is not None:
            return max(0.0, (peak - before) / 1024)
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.step()
    return max(0.0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_max) / 1024)


def bench_model_batch(
    model_name: str,
    batch: int,
    modes: list[str],
    device: torch.device,
    image_size: int,
    steps: int,
    repeats: int,
    seed: int,
) -> list[Result]:
    """All arms for one (model, batch), timed in interleaved rounds; medians over rounds."""
    images, labels = generate_site(batch, image_size=image_size, seed=seed)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).to(device)
    y = torch.from_numpy(labels).to(device)
    results: dict[str, Result] = {}
    runners: list[Runner] = []
    for mode in ["non-private", *modes]:
        results[mode] = Result(model_name, batch, mode)
        try:
            runner = make_runner(model_name, mode, x, y, image_size, seed)
            runner.step()  # warm-up: allocator, kernels, Opacus hooks
            runner.clear()
            runners.append(runner)
        except Exception as exc:  # a mode that cannot run this model is a result, not a crash
            results[mode].error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    walls: dict[str, list[float]] = {r.mode: [] for r in runners}
    cpus: dict[str, list[float]] = {r.mode: [] for r in runners}
    for _ in range(repeats):
        for runner in runners:
            try:
                wall, cpu = time_steps(runner, steps, device)
            except Exception as exc:
                results[runner.mode].error = f"{type(exc).__name__}: {exc}"[:200]
                continue
            walls[runner.mode].append(wall)
            cpus[runner.mode].append(cpu)
            runner.clear()
    for runner in runners:
        if results[runner.mode].error is None:
            results[runner.mode].peak_mem_mb = peak_memory_mb(runner, device)
        runner.clear()
    base_wall = statistics.median(walls["non-private"]) if walls.get("non-private") else None
    base_cpu = statistics.median(cpus["non-private"]) if cpus.get("non-private") else None
    for mode, times in walls.items():
        res = results[mode]
        if not times or res.error:
            continue
        wall, cpu = statistics.median(times), statistics.median(cpus[mode])
        res.images_per_s = batch / wall
        res.step_ms = wall * 1000
        res.cpu_ms_per_step = cpu * 1000
        if base_wall and base_cpu:
            res.slowdown = wall / base_wall
            res.slowdown_cpu = cpu / base_cpu
    del runners
    gc.collect()
    return list(results.values())


def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: needed to compare numbers across machines honestly."""
    cpu_name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name,
        "cpu": cpu_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def fastest_modes(results: list[Result]) -> dict[str, dict[str, str]]:
    """Per model and batch, the DP mode with the highest images/s."""
    best: dict[str, dict[str, str]] = {}
    for res in results:
        if res.mode == "non-private" or res.images_per_s is None:
            continue
        current = best.setdefault(res.model, {}).get(str(res.batch))
        rival = next(
            (r for r in results if (r.model, r.batch, r.mode) == (res.model, res.batch, current)),
            None,
        )
        if rival is None or (rival.images_per_s or 0) < res.images_per_s:
            best[res.model][str(res.batch)] = res.mode
    return best


def format_table(results: list[Result]) -> str:
    """Fixed-width table of every measurement."""
    head = (
        f"{'model':12} {'batch':>5} {'mode':12} {'img/s':>9} {'ms/step':>9} {'cpu ms':>9} "
        f"{'slowdown':>8} {'(cpu)':>6} {'peak MB':>8}"
    )
    lines = [head, "-" * len(head)]

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in results:
        if r.error:
            lines.append(f"{r.model:12} {r.batch:>5} {r.mode:12} ERROR {r.error}")
            continue
        lines.append(
            f"{r.model:12} {r.batch:>5} {r.mode:12} {num(r.images_per_s, '9.0f')} "
            f"{num(r.step_ms, '9.1f')} {num(r.cpu_ms_per_step, '9.1f')} "
            f"{num(r.slowdown, '7.2f')}x {num(r.slowdown_cpu, '5.2f')}x "
            f"{num(r.peak_mem_mb, '8.1f')}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; `--quick` overrides sizes for a < 60 s smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny run (< 60 s): small-cnn, 1 step")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--models",
        default=None,
        help="comma list of small-cnn, densenet121, plain-cnn (a textbook CNN for contrast); "
        "default: small-cnn,densenet121 on CUDA, small-cnn,plain-cnn on CPU",
    )
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--modes", default=",".join(MODES), help="Opacus grad_sample_modes to try")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 with --quick)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns what it wrote."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and hook warnings: not results
    device = pick_device(args.device)
    # One thread for the smoke run: on a busy shared CPU, OpenMP threads spin-waiting for each
    # other can make a 2-thread run 10x slower than a 1-thread one.
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    models = (
        args.models.split(",")
        if args.models
        else ["small-cnn"]
        if args.quick
        else ["small-cnn", "densenet121"]
        if device.type == "cuda"
        else ["small-cnn", "plain-cnn"]
    )
    steps = args.steps or (1 if args.quick else 3)
    repeats = args.repeats or (3 if args.quick else 7)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    info = machine_info(device)
    started = time.perf_counter()
    results: list[Result] = []
    for model_name in models:
        for batch in batches:
            results += bench_model_batch(
                model_name, batch, modes, device, args.image_size, steps, repeats, args.seed
            )
            print(f"  done {model_name} batch {batch}", file=sys.stderr, flush=True)
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report = {
        "benchmark": "imaging_throughput",
        "machine": info,
        "settings": {
            "models": models,
            "batch_sizes": batches,
            "modes": modes,
            "image_size": args.image_size,
            "steps_per_round": steps,
            "rounds": repeats,
            "statistic": "median over rounds",
            "noise_multiplier": 1.0,
            "max_grad_norm": 1.0,
        },
        "results": [asdict(r) for r in results],
        "fastest_dp_mode": fastest_modes(results),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"\n{info['device_name']} ({info['device']}), torch {info['torch']}, "
        f"opacus {info['opacus']}, {info['cpu_count']} CPUs, {info['torch_threads']} threads, "
        f"load {info.get('load_average_start')} -> {info.get('load_average_end')}"
    )
    print(format_table(results))
    print(f"fastest DP mode: {json.dumps(report['fastest_dp_mode'])}  ({report['seconds']} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=_json_default))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    main()
