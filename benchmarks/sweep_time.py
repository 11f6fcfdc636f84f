"""Wall time of many seeds in one engine start against one seed (issue: 10 seeds in <= 3x one).

Both are `pmfl simulate heart-disease --seeds ...` as a user runs them, timed end to end (imports,
the engine's start, every round of every seed), alternated `--repeats` times so both see the same
machine; the figure is the ratio of the medians.

    python -m benchmarks.sweep_time [--seeds 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import median, print_table, write_results


def wall_time(seeds: str, out: Path) -> float:
    """Seconds `pmfl simulate heart-disease --seeds SEEDS` takes, end to end."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pmfl.cli", "simulate", "heart-disease", "--seeds", seeds,
                    "--out", str(out), "--overwrite"], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    """Time one seed and N seeds, alternately; print the table and write the results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    one: list[float] = []
    many: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            one.append(wall_time("0", Path(tmp) / "one"))
            many.append(wall_time(f"0-{args.seeds - 1}", Path(tmp) / "many"))
    ratio = median(many) / median(one)
    print_table(
        f"pmfl simulate heart-disease: 1 seed vs {args.seeds} seeds in one engine start",
        ["runs", "median wall s", "all"],
        [[1, median(one), one], [args.seeds, median(many), many]],
    )
    extra = (median(many) - median(one)) / (args.seeds - 1)
    print(f"ratio {ratio:.2f}x (target <= 3x); per extra seed {extra:.1f} s")
    write_results("sweep_time", {
        "command": "python -m benchmarks.sweep_time " + " ".join(sys.argv[1:]),
        "seeds": args.seeds, "one_seed_s": one, "many_seeds_s": many, "ratio": ratio, "target": 3.0,
    })


if __name__ == "__main__":
    main()
