"""Several seeds in one engine start (`pmfl simulate --seeds`): separate, honest runs and their summary."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from pm_common.audit.directories import run_audit
from pm_common.study.config import StudyConfigError, load_study
from simulations.sweep import SUMMARY, parse_seeds, seed_dir, simulate_seeds
from tests.conftest import heart_study


@pytest.mark.parametrize(
    ("text", "seeds"),
    [("0-3", (0, 1, 2, 3)), ("7", (7,)), ("1,4,7", (1, 4, 7)), ("0-2,10, 1", (0, 1, 2, 10))],
)
def test_seeds_as_written(text: str, seeds: tuple[int, ...]) -> None:
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    ("text", "refusal"),
    [("3-1", "runs backwards"), ("a", "is not a seed or a range"), ("0-1000", "at most 100"),
     ("-1", "not a seed")],
)
def test_bad_seeds_are_refused_in_one_line(text: str, refusal: str) -> None:
    with pytest.raises(StudyConfigError, match=refusal) as refused:
        parse_seeds(text)
    assert "\n" not in str(refused.value)


def test_a_sweep_is_one_honest_run_per_seed(tmp_path: Path) -> None:
    """Two seeds of a 2-site, 2-round study in one engine start: each seed has its own run directory,
    simulated hospitals, ledgers and roster, and each audits clean on its own; the seeds really
    differ (the initial model), and sweep.json's medians are those of the runs."""
    sites = [dict(s) for s in load_study(Path("simulations/scenarios/heart_disease.toml")).raw["sites"][:2]]
    _, study = heart_study(tmp_path, sites=sites, study={"rounds": 2})
    told: list[int] = []
    summary = simulate_seeds(study, tmp_path / "sweep", [3, 5], on_run=lambda seed, _: told.append(seed))
    assert told == [3, 5]
    rosters = set()
    first_round = []
    finals = []
    for seed in (3, 5):
        run = seed_dir(tmp_path / "sweep", seed)
        assert load_study(run / "config.toml").seed == seed
        result = run_audit(run)
        assert result.exit_code == 0, result.verdict
        assert sorted(p.name for p in (run / "simulated-sites").iterdir()) == sorted(s["name"] for s in sites)
        metrics = json.loads((run / "metrics.json").read_text())
        rosters.add(json.loads((run / "privacy" / "summary.json").read_text())["run"])
        first_round.append(metrics["rounds"][0]["sites"])
        finals.append(metrics["rounds"][-1]["mean_site_accuracy"])
    assert len(rosters) == 2  # two runs, two rosters: nothing shared between seeds
    assert first_round[0] != first_round[1]  # another seed, another initial model
    written = json.loads((tmp_path / "sweep" / SUMMARY).read_text())
    assert written == summary
    assert summary["final"]["mean_site_accuracy"]["median"] == pytest.approx(statistics.median(finals))
    assert summary["final"]["mean_site_accuracy"]["n"] == 2
