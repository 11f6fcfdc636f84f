"""Faults an honest federation meets: a coordinator killed mid-study, a study submitted twice.

The claim under test is the other half of the audit's promise: it fails forgeries (see
test_forged_run_directory.py) and passes honest runs, including runs that crashed, resumed or ran
again, with every mechanism invocation a site ran on record exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tomli_w

from pm_common.audit.directories import audit_directory
from pm_common.audit.rules import EXIT_OK
from pm_common.records.ledger import LedgerEntry, read_ledger
from pm_common.study.config import load_study
from simulations.runner import SITES_DIR, simulate
from tests.conftest import HEART, heart_study

SITES = ("cleveland", "hungary", "switzerland", "va_long_beach")


def _lines(path: Path) -> list[LedgerEntry]:
    return read_ledger(path)


def _pmfl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`pmfl` in a process group of its own, as a coordinator runs on its own machine."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pmfl.cli", *args], capture_output=True, text=True, timeout=timeout,
        env=env, start_new_session=True,
    )


def test_coordinator_killed_after_the_sites_replied_resumes_with_every_spend_recorded(tmp_path: Path) -> None:
    """Claim: budgets hold through crashes; every DP round a site ran is in its ledger and in the
    run's record once, under a unique attempt, and the audit passes the honest crash and resume.
    Fault: SIGKILL of the simulated coordinator (with its sites) right after round 2's replies
    arrived, before it recorded any of them or checkpointed the round; then `--resume` (issue 14.11)."""
    raw = load_study(HEART).raw
    raw = {**raw, "study": {**raw["study"], "rounds": 3}, "simulation": {"crash_coordinator_after": 2}}
    study_file = tmp_path / "study.toml"
    study_file.write_text(tomli_w.dumps(raw))
    out = tmp_path / "run"

    crashed = _pmfl("simulate", "--config", str(study_file), "--out", str(out))
    assert crashed.returncode == -9, crashed.stdout[-2000:] + crashed.stderr[-2000:]
    for site in SITES:  # the sites trained round 2 and kept it; the coordinator recorded round 1
        at_site = _lines(out / SITES_DIR / site / "state" / "heart-disease" / "ledger.jsonl")
        at_run = _lines(out / "privacy" / f"ledger-{site}.jsonl")
        assert [(e.status, e.round) for e in at_site] == [("enrolled", 0), ("trained", 1), ("trained", 2)]
        assert [(e.status, e.round) for e in at_run] == [("enrolled", 0), ("trained", 1)]

    resumed = _pmfl("simulate", "--config", str(study_file), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for site in SITES:
        at_run = _lines(out / "privacy" / f"ledger-{site}.jsonl")
        at_site = _lines(out / SITES_DIR / site / "state" / "heart-disease" / "ledger.jsonl")
        assert at_run == at_site  # the run's record was completed from the site's own
        assert [(e.status, e.round, e.attempt) for e in at_run] == [
            ("enrolled", 0, 0), ("trained", 1, 0), ("trained", 2, 0), ("trained", 3, 1), ("closed", 3, 1)
        ]  # round 2 was lost with the coordinator but is spent and recorded; round 3 ran after it
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("stopped before aggregating" in f for f in metrics["rounds"][2]["failures"])
    result = audit_directory(out, site_dirs=[out / SITES_DIR / s for s in SITES])
    assert result.exit_code == EXIT_OK, result.findings
    assert audit_directory(out).exit_code == EXIT_OK


def test_a_resubmitted_study_audits_clean_in_the_run_and_at_every_site(tmp_path: Path) -> None:
    """Claim: an honest resubmission is audited clean: the second run's sites decline (their
    budget for the study is spent) and both runs and every site's own ledger verify.
    Fault: the same study submitted again to the same hospitals after it finished (issue 14.10)."""
    _, study = heart_study(tmp_path, study={"rounds": 2})
    sites = tmp_path / "hospitals"
    simulate(study, tmp_path / "first", sites_dir=sites)
    second = simulate(study, tmp_path / "second", sites_dir=sites)
    assert set(second["rounds"][1]["declined"]) == set(SITES)
    assert all("privacy budget" in why for why in second["rounds"][1]["declined"].values())
    for run in ("first", "second"):
        result = audit_directory(tmp_path / run, site_dirs=[sites / s for s in SITES])
        assert result.exit_code == EXIT_OK, (run, result.findings)
    for site in SITES:
        assert audit_directory(sites / site).exit_code == EXIT_OK, site
        statuses = [e.status for e in _lines(sites / site / "state" / "heart-disease" / "ledger.jsonl")]
        assert statuses == ["enrolled", "trained", "trained", "closed", "enrolled", "declined", "declined",
                            "closed"]
