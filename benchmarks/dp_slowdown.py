"""DP-SGD slowdown against non-private training: same model, same batch, same run.

Times one optimiser step (forward, backward, update) of each model at each batch size, plain and
with Opacus in each grad-sample mode, interleaved so machine noise hits all alike; medians.

    python -m benchmarks.dp_slowdown [--repeats 7] [--steps 200]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import median, print_table, write_results
from pm_common.models.tabular import build_tabular_model

NUM_INPUTS = 38  # the heart-disease contract's encoded width
MODES = ("hooks", "ew", "ghost")


def _step_fn(model_name: str, batch: int, mode: str | None):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_tabular_model(model_name, NUM_INPUTS)
    x, y = torch.randn(batch * 8, NUM_INPUTS), (torch.rand(batch * 8) > 0.5).float()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.BCEWithLogitsLoss()
    xb, yb = x[:batch], y[:batch]
    if mode is None:
        def plain() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(xb), yb).backward()
            optimizer.step()
        return plain
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, poisson_sampling=False)
    dp_model, dp_optimizer = private[0], private[1]
    dp_criterion = private[2] if mode == "ghost" else criterion

    def private_step() -> None:
        dp_optimizer.zero_grad(set_to_none=True)
        dp_criterion(dp_model(xb), yb).backward()
        dp_optimizer.step()
    return private_step


def _time(step, steps: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(20):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    """Measure the step time of each model and batch size, plain and per grad-sample mode, print and write it.

    One thread, as each simulated site has; the variants are timed in turn within every repeat so that
    machine noise hits them alike. Reports each mode's slowdown over plain training and the fastest mode.
    Writes benchmarks/results/dp_slowdown.json.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per site, as in the simulation
    rows, results = [], []
    for model_name in ("logreg", "mlp"):
        for batch in (16, 64, 256):
            fns = {"plain": _step_fn(model_name, batch, None)}
            fns.update({mode: _step_fn(model_name, batch, mode) for mode in MODES})
            samples: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(args.repeats):
                for key, fn in fns.items():
                    samples[key].append(_time(fn, args.steps))
            times = {k: median(v) for k, v in samples.items()}
            ratios = {m: times[m] / times["plain"] for m in MODES}
            best = min(ratios, key=ratios.__getitem__)
            rows.append([model_name, batch, times["plain"] * 1e6,
                         *[f"{times[m] * 1e6:.0f} us ({ratios[m]:.1f}x)" for m in MODES], best])
            results.append({"model": model_name, "batch": batch, "seconds_per_step": times,
                            "slowdown": ratios, "fastest_mode": best})
    print_table("DP-SGD step time vs non-private (median of repeats, 1 thread)",
                ["model", "batch", "plain us", *MODES, "fastest"], rows)
    write_results("dp_slowdown", {"repeats": args.repeats, "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
