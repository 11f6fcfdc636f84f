"""Many seeds of one study in one start of Flower's simulation engine, and their summary.

Why: a benchmark's figure is a median over seeds, and a small study trains in well under a second
per round while starting the engine and importing the apps in its workers costs seconds. A sweep
pays that once: each seed is a run of its own (its own run directory, simulated hospitals,
ledgers and roster, audited like any other run) on simulated nodes of its own, one run after
another (simulations/runner.py `run_engine`). Only `[study] seed` differs between the runs (the
initial model, and the sites' sampling and noise); the data and its split stay the same.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pm_common.study.config import StudyConfig, StudyConfigError, with_overrides
from pm_common.study.run_settings import RunSettings
from pm_common.study.schema import show
from simulations.faults import crash_round
from simulations.runner import finished_metrics, prepare_run_dir, run_engine, run_settings, warn_before_start

SUMMARY = "sweep.json"
MAX_SEEDS = 100
_SEEDS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_seeds(text: str) -> tuple[int, ...]:
    """Seeds as written on the command line: `0-9`, `1,4,7` or a mix (`0-2,10`).

    Args:
        text: the `--seeds` value.

    Returns:
        The seeds, in the order given, without repeats.

    Raises:
        StudyConfigError: not of that form, a range that runs backwards, or more than MAX_SEEDS.
    """
    seeds: list[int] = []
    for part in text.split(","):
        match = _SEEDS.match(part)
        if match is None:
            raise StudyConfigError(f"--seeds: {show(part.strip())} is not a seed or a range; use e.g. 0-9 "
                                   "or 1,4,7")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if last < first:
            raise StudyConfigError(f"--seeds: the range {first}-{last} runs backwards")
        if last - first + 1 > MAX_SEEDS:
            raise StudyConfigError(f"--seeds: at most {MAX_SEEDS} seeds in one sweep")
        seeds.extend(s for s in range(first, last + 1) if s not in seeds)
    if len(seeds) > MAX_SEEDS:
        raise StudyConfigError(f"--seeds: at most {MAX_SEEDS} seeds in one sweep")
    return tuple(seeds)


def seed_dir(out_dir: Path, seed: int) -> Path:
    """The run directory of one seed of a sweep."""
    return Path(out_dir) / f"seed-{seed}"


def simulate_seeds(
    study: StudyConfig,
    out_dir: Path,
    seeds: Sequence[int],
    *,
    overwrite: bool = False,
    verbose: bool = False,
    on_warning: Callable[[str], None] | None = None,
    on_run: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run `study` once per seed, all in one engine start; write and return the sweep's summary.

    Args:
        study: the study, with its simulated [[sites]].
        out_dir: the sweep's directory: `seed-<s>/` per seed (a run directory each) and sweep.json.
        seeds: the seeds (each replaces `[study] seed`).
        overwrite: replace earlier runs in the seeds' directories.
        verbose: show Flower's and Ray's logs.
        on_warning: told, before anything starts, of every site that will decline every round or has
            too little data.
        on_run: told each seed's metrics.json as its run finishes.

    Returns:
        sweep.json's content (see `summarize`).

    Raises:
        StudyConfigError: no seeds, or a study that rehearses a coordinator crash (one run only).
        SiteDataError: a site's data is refused (before anything starts).
        SimulationError: a run did not finish.
    """
    if not seeds:
        raise StudyConfigError("--seeds: no seeds given")
    if crash_round(study):
        raise StudyConfigError("[simulation].crash_coordinator_after rehearses one run's crash: run it "
                               "without --seeds")
    warn_before_start(study, on_warning)
    out_dir = Path(out_dir).resolve()
    replicas: dict[Path, int] = {}
    settings: list[RunSettings] = []
    for seed in seeds:
        run_dir = prepare_run_dir(seed_dir(out_dir, seed), overwrite)
        settings.append(run_settings(with_overrides(study, seed=seed), run_dir))
        replicas[run_dir] = seed

    def finished(run: RunSettings) -> None:
        if on_run is not None:
            on_run(replicas[run.run_dir], finished_metrics(run.run_dir))

    run_engine(study, settings, verbose=verbose, on_run=finished)
    summary = summarize(study.name, {seed: finished_metrics(seed_dir(out_dir, seed)) for seed in seeds})
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def summarize(study: str, runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Medians and ranges over seeds of every number the runs' final evaluation reports.

    The range is the lowest and highest value over the seeds (with five seeds, a 2.5-97.5 %
    interval would be the same two values and claim more than it knows).

    Args:
        study: the study's name.
        runs: each seed's metrics.json.

    Returns:
        `{"study", "seeds", "runs": {seed: run dir name}, "final": {metric: stats},
        "sites": {site: {metric: stats}}}`, stats being `{"median", "min", "max", "n"}`.
    """
    final: dict[str, list[float]] = {}
    sites: dict[str, dict[str, list[float]]] = {}
    for metrics in runs.values():
        last = metrics["rounds"][-1]
        for key, value in last.items():
            if _number(value):
                final.setdefault(key, []).append(float(value))
        for site, values in (last.get("sites") or {}).items():
            for key, value in values.items():
                if _number(value):
                    sites.setdefault(site, {}).setdefault(key, []).append(float(value))
    return {
        "study": study,
        "seeds": list(runs),
        "runs": {str(seed): f"seed-{seed}" for seed in runs},
        "final": {key: stats(values) for key, values in final.items() if key != "round"},
        "sites": {site: {key: stats(v) for key, v in values.items()} for site, values in sites.items()},
    }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def stats(values: Sequence[float]) -> dict[str, float]:
    """A metric over seeds: its median, lowest, highest and count (DP noise makes single runs vary,
    so the spread is part of the figure).

    Args:
        values: one value per seed.

    Returns:
        `{"median", "min", "max", "n"}`.
    """
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
