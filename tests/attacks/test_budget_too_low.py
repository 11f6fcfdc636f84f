"""A budget that cannot be met, in a study with sites that can (issue 14, item 12)."""

from __future__ import annotations

import json
from pathlib import Path

from pm_common.audit.directories import audit_directory
from pm_common.audit.rules import EXIT_OK
from pm_common.records.ledger import read_ledger
from simulations.runner import simulate
from tests.conftest import heart_study


def test_a_site_whose_budget_cannot_be_met_declines_visibly_and_the_others_train(
    tmp_path: Path, heart_sites: list
) -> None:
    """Claim: a site whose budget no noise multiplier can meet takes part by declining every round
    with its reason in its signed ledger; it stays in the results, the summary and the audit, and
    the other sites train.
    Fault: one hospital sets epsilon = 0.01 (formerly: thousands of traceback lines at that site,
    no decline recorded, the site silently missing from the results and the audit)."""
    heart_sites[2]["epsilon"] = 0.01
    _, study = heart_study(tmp_path, heart_sites, study={"rounds": 2})
    warnings: list[str] = []
    metrics = simulate(study, tmp_path / "run", on_warning=warnings.append)
    assert any(w.startswith("switzerland: declines every round: privacy budget too low") for w in warnings)
    for server_round in (1, 2):
        item = metrics["rounds"][server_round]
        assert set(item["trained"]) == {"cleveland", "hungary", "va_long_beach"}
        assert "privacy budget too low" in item["declined"]["switzerland"]
    lines = read_ledger(tmp_path / "run" / "privacy" / "ledger-switzerland.jsonl")
    assert [e.status for e in lines] == ["enrolled", "declined", "declined", "closed"]
    assert all(e.steps == 0 and e.epsilon == 0.0 for e in lines)
    summary = json.loads((tmp_path / "run" / "privacy" / "summary.json").read_text())["sites"]["switzerland"]
    assert summary["status"] == "declined" and "too low" in summary["reason"]
    result = audit_directory(tmp_path / "run")
    assert result.exit_code == EXIT_OK, result.findings
    assert "switzerland" in {s.site for s in result.sites}
