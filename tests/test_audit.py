"""The independent auditor: accounting agreement, budget property, run audits, HTML report."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis import rdp as opacus_rdp

from pm_common.audit.directories import run_audit
from pm_common.audit.one_run import epsilon_lower_bound
from pm_common.audit.rules import EXIT_OK, EXIT_UNVERIFIABLE, EXIT_VIOLATION, audit_site
from pm_common.privacy.accountant import check_next_round, cumulative_epsilon, opacus_epsilon, plan_study
from pm_common.privacy.reference import pld_epsilons, rdp_epsilon, rdp_epsilons
from pm_common.records.ledger import CLOSED, DECLINED, ENROLLED, TRAINED, LedgerEntry, append_line, summarize
from pm_common.records.roster import Roster, RosterEntry, SignedRoster, sign_roster
from pm_common.records.signing import (
    chain_head,
    generate_signing_key,
    public_key_fingerprint,
    public_key_text,
    save_private_key,
    save_public_key,
    sign_entry,
)

ARTIFACTS = Path(__file__).parent / "artifacts"


@contextlib.contextmanager
def memoized_opacus() -> Iterator[None]:
    """Memoize Opacus' per-order RDP (a pure function of (q, sigma, alpha)).

    check_next_round recomposes the whole history every round (quadratic in rounds); caching the
    scalar keeps the exact same Opacus arithmetic and makes 30-round studies fast.
    """
    original = opacus_rdp._compute_rdp
    opacus_rdp._compute_rdp = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        opacus_rdp._compute_rdp = original


# --- agreement with Opacus --------------------------------------------------------------------

HISTORIES = {
    "notes-reference": [(1.1, 1 / 32, 640)],
    "heart-like-20-rounds": [(1.3, 32 / 200, 7)] * 20,
    "declined-rounds": [(0.9, 0.1, 10)] * 5 + [(0.9, 0.1, 0)] * 2,
    "changing-mechanism": [(2.0, 0.05, 40), (1.2, 0.1, 10), (0.8, 0.02, 50), (1.5, 0.3, 4)],
    "full-batch": [(4.0, 1.0, 1)] * 30,
    "strong-privacy": [(8.0, 0.25, 8)] * 25,
}


@pytest.mark.parametrize("name", sorted(HISTORIES))
def test_independent_rdp_agrees_with_opacus_every_round(name: str) -> None:
    history = HISTORIES[name]
    delta = 1e-5
    rdp, grid_limited = rdp_epsilons(history, delta)
    pld = pld_epsilons(history, delta)
    assert not grid_limited
    with memoized_opacus():
        for k in range(1, len(history) + 1):
            opacus = cumulative_epsilon(history[:k], delta)
            assert rdp[k - 1] == pytest.approx(opacus, rel=0.01, abs=1e-9), (name, k)
            assert pld[k - 1] <= rdp[k - 1] + 1e-9  # PLD is tight, RDP an upper bound
    assert rdp_epsilon(history, delta) == rdp[-1]


def test_notes_reference_figures() -> None:
    """NOTES.md: q=1/32, sigma=1.1, 640 steps, delta=1e-5: RDP 4.679, PLD 4.236."""
    assert rdp_epsilon([(1.1, 1 / 32, 640)], 1e-5) == pytest.approx(4.679, abs=2e-3)
    assert pld_epsilons([(1.1, 1 / 32, 640)], 1e-5)[-1] == pytest.approx(4.236, abs=2e-3)


def test_declined_round_spends_nothing_and_no_noise_is_infinite() -> None:
    rdp, _ = rdp_epsilons([(1.0, 0.1, 10), (1.0, 0.1, 0)], 1e-5)
    assert rdp[0] == rdp[1] > 0
    assert rdp_epsilons([(0.0, 0.1, 10)], 1e-5)[0] == [float("inf")]
    assert pld_epsilons([(0.0, 0.1, 10)], 1e-5) == [float("inf")]


def test_huge_epsilon_where_dp_accounting_drops_orders_is_not_a_false_alarm() -> None:
    """At epsilon ~100 dp_accounting cannot evaluate the optimal small orders; Opacus can."""
    history = [(0.6, 0.5, 60)] * 3
    rdp, grid_limited = rdp_epsilons(history, 1e-5)
    with memoized_opacus():
        opacus = [opacus_epsilon(history[:k], 1e-5) for k in (1, 2, 3)]
    assert grid_limited and rdp[-1] > opacus[-1] * 1.05  # looser than Opacus here
    assert pld_epsilons(history, 1e-5)[-1] <= opacus[-1]
    rows = sign_all([LedgerEntry(site="site-a", round=k, status=TRAINED, noise_multiplier=0.6,
                                 sample_rate=0.5, steps=60, max_grad_norm=1.0, delta=1e-5,
                                 epsilon=opacus[k - 1], epsilon_budget=1000.0, accountant="rdp")
                     for k in (1, 2, 3)], site_keys()["site-a"])
    result = audit_site("site-a", rows, site_keys()["site-a"].public_key())
    assert result.verdict == "verified", result.findings
    assert "rdp_orders_dropped" in {f.code for f in result.findings}


# --- property: a site that checks before every round never exceeds its budget ---------------


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.floats(0.5, 10.0),
    delta=st.floats(1e-6, 1e-4),
    n=st.integers(20, 500),
    batch=st.integers(1, 64),
    epochs=st.integers(1, 3),
    planned=st.integers(1, 30),
    extra=st.integers(0, 5),
)
def test_budget_is_never_exceeded(budget: float, delta: float, n: int, batch: int, epochs: int,
                                  planned: int, extra: int) -> None:
    with memoized_opacus():
        plan = plan_study(epsilon_budget=budget, delta=delta, num_examples=n, batch_size=batch,
                          local_epochs=epochs, planned_rounds=planned, max_grad_norm=1.0)
        history: list[tuple[float, float, int]] = []
        for _ in range(planned + extra):
            decision = check_next_round(plan, history)
            if decision.allowed:
                history.append((plan.noise_multiplier, plan.sample_rate, plan.steps_per_round))
            spent = cumulative_epsilon(history, delta)
            assert spent <= budget, (plan, len(history), spent)
            assert decision.epsilon_now <= budget
        # the plan spends its budget on the planned rounds, and the site stops after them
        assert len(history) >= 1
    # the auditor's independent figure agrees that the budget holds
    assert rdp_epsilon(history, delta) <= budget * (1 + 1e-3)


# --- synthetic run directories ----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def site_keys() -> dict[str, Any]:
    return {s: generate_signing_key() for s in ("site-a", "site-b", "site-c")}


SITES = {  # (sigma, q, steps per round, budget)
    "site-a": (1.2, 0.1, 10, 6.0),
    "site-b": (1.6, 0.2, 5, 5.0),
    "site-c": (1.0, 0.05, 20, 6.0),
}


@functools.lru_cache(maxsize=64)
def _site_entries(site: str, rounds: int, budget: float | None, declined_after: int | None,
                  dp: bool) -> tuple[LedgerEntry, ...]:
    return tuple(_make_entries(site, rounds, budget, declined_after, dp))


def site_entries(site: str, rounds: int, *, budget: float | None = None,
                 declined_after: int | None = None, dp: bool = True) -> list[LedgerEntry]:
    """A site's honest ledger: epsilon from Opacus as the site computes it (cached per test run)."""
    return list(_site_entries(site, rounds, budget, declined_after, dp))


def _make_entries(site: str, rounds: int, budget: float | None, declined_after: int | None,
                  dp: bool) -> list[LedgerEntry]:
    sigma, q, steps, default_budget = SITES[site]
    budget = default_budget if budget is None else budget
    entries, history = [], []
    for r in range(1, rounds + 1):
        declined = declined_after is not None and r > declined_after
        if dp and not declined:
            history.append((sigma, q, steps))
        with memoized_opacus():
            eps = cumulative_epsilon(history, 1e-5) if dp else None
        entries.append(LedgerEntry(
            site=site, round=r, status=DECLINED if declined else TRAINED,
            noise_multiplier=sigma if dp else 0.0, sample_rate=q, steps=0 if declined else steps,
            max_grad_norm=1.0, delta=1e-5, epsilon=eps, epsilon_budget=budget if dp else None,
            accountant="rdp", dp=dp, reason="privacy budget exhausted" if declined else "",
            timestamp=f"2026-11-26T10:{r:02d}:00+00:00",
        ))
    return entries


def sign_all(entries: list[LedgerEntry], key) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for e in entries:
        rows.append(sign_entry(asdict(e), chain_head(rows), key))
    return rows


RUN_ID = "0123456789abcdef0123456789abcdef"


def synthetic_roster(ledgers: dict[str, list[LedgerEntry]], run: str = RUN_ID) -> Roster:
    """The roster the sites of `ledgers` would have declared and signed."""
    entries = []
    for site, lines in ledgers.items():
        pub = site_keys()[site].public_key()
        first = lines[0]
        entries.append(RosterEntry(
            site=site, ledger_key=public_key_text(pub), key_fingerprint=public_key_fingerprint(pub),
            dp=first.dp, epsilon_budget=first.epsilon_budget, delta=first.delta,
            accountant=first.accountant, max_rounds=None,
        ))
    return Roster(study="synthetic", run=run, rounds=max(len(v) for v in ledgers.values()),
                  study_digest="0" * 64, created="2026-11-26T10:00:00+00:00",
                  sites=tuple(sorted(entries, key=lambda e: e.site)))


def in_run(entries: list[LedgerEntry], roster: Roster, closed: bool = True) -> list[LedgerEntry]:
    """A site's round lines as one run's ledger: its enrolment first, its closing last."""
    first, last = entries[0], entries[-1]
    enrolled = replace(first, round=0, status=ENROLLED, steps=0, epsilon=0.0 if first.dp else None,
                       reason="", roster=roster.digest)
    lines = [enrolled, *entries]
    if closed:
        lines.append(replace(last, status=CLOSED, steps=0, reason=""))
    return [replace(e, run=roster.run) for e in lines]


def write_run(run: Path, ledgers: dict[str, list[LedgerEntry]], *, dp: bool = True,
              rows_override: dict[str, list[dict[str, Any]]] | None = None,
              skip_keys: tuple[str, ...] = (), roster: bool = True) -> Path:
    """A run directory as the coordinator writes it: the roster signed by every site, ledgers
    signed by the sites' keys (each run's lines enrolled and closed), summary and metrics.
    `roster=False`: a run directory of an older version, with neither roster nor run lines."""
    privacy = run / "privacy"
    (privacy / "keys").mkdir(parents=True, exist_ok=True)
    signed = synthetic_roster(ledgers) if roster else None
    summary: dict[str, Any] = {"sites": {}, "dp": dp}
    if signed is not None:
        summary.update(run=signed.run, roster_digest=signed.digest)
        record = SignedRoster(signed, {s: sign_roster(signed, site_keys()[s]) for s in ledgers})
        (privacy / "roster.json").write_text(record.to_json())
    rounds = max(len(v) for v in ledgers.values())
    for site, entries in ledgers.items():
        key = site_keys()[site]
        lines = in_run(entries, signed) if signed is not None else entries
        rows = (rows_override or {}).get(site) or sign_all(lines, key)
        for row in rows:
            append_line(privacy / f"ledger-{site}.jsonl", json.dumps(row, sort_keys=True))
        if site not in skip_keys:
            save_public_key(key.public_key(), privacy / "keys" / f"{site}.pub")
        summary["sites"][site] = {**summarize(lines), "chain_head": chain_head(rows)}
        if signed is not None:
            summary["sites"][site]["key_fingerprint"] = public_key_fingerprint(key.public_key())
    (privacy / "summary.json").write_text(json.dumps(summary, indent=2))
    metrics = {"rounds": [
        {"round": r, "sites": {s: {"loss": 0.6 - 0.01 * r, "accuracy": 0.6 + 0.01 * r + 0.005 * i,
                                   "auc": 0.7, "n": 50} for i, s in enumerate(ledgers)},
         "mean_site_accuracy": 0.6 + 0.01 * r, "pooled_accuracy": 0.61 + 0.01 * r}
        for r in range(1, rounds + 1)
    ]}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.toml").write_text('[study]\nname = "synthetic"\n')
    return run


def honest_run(tmp_path: Path, rounds: int = 4) -> Path:
    return write_run(tmp_path / "run", {s: site_entries(s, rounds) for s in SITES})


def codes(result) -> set[str]:
    return {f.code for f in result.findings if f.severity != "note"}


def test_honest_run_passes(tmp_path: Path) -> None:
    run = honest_run(tmp_path)
    result = run_audit(run, report=False)
    assert result.exit_code == EXIT_OK, result.findings
    assert result.verdict.startswith("PASS")
    data = json.loads((run / "audit" / "audit.json").read_text())
    assert data["exit_code"] == 0 and len(data["sites"]) == 3
    for site in data["sites"]:
        assert site["chain_verified"] and site["verdict"] == "verified"
        for r in site["rounds"]:
            assert r["rdp_epsilon"] == pytest.approx(r["reported_epsilon"], rel=0.01)
            assert r["pld_epsilon"] <= r["rdp_epsilon"]
    assert [a["round"] for a in data["accuracy"]] == [1, 2, 3, 4]


def test_budget_exhausted_site_that_declined_passes(tmp_path: Path) -> None:
    entries = site_entries("site-a", 6, declined_after=4)
    run = write_run(tmp_path / "run", {"site-a": entries})
    result = run_audit(run, report=False)
    assert result.exit_code == EXIT_OK, result.findings
    assert result.sites[0].rounds[-1].steps == 0


def test_over_budget_site_is_a_violation(tmp_path: Path) -> None:
    ledgers = {s: site_entries(s, 4) for s in SITES}
    ledgers["site-b"] = site_entries("site-b", 4, budget=1.0)  # kept training past 1.0
    result = run_audit(write_run(tmp_path / "run", ledgers), report=False)
    assert result.exit_code == EXIT_VIOLATION
    assert codes(result) == {"over_budget"}
    message = next(f.message for f in result.findings if f.code == "over_budget")
    assert message.startswith("site-b: over budget") and "exceeds the budget 1" in message
    assert "FAIL" in result.verdict


def test_under_reported_epsilon_is_a_violation(tmp_path: Path) -> None:
    entries = [replace(e, epsilon=e.epsilon * 0.8) for e in site_entries("site-a", 4)]
    result = run_audit(write_run(tmp_path / "run", {"site-a": entries}), report=False)
    assert result.exit_code == EXIT_VIOLATION
    assert "under_reported" in codes(result)


def test_missing_noise_is_caught_and_audit_json_stays_strict(tmp_path: Path) -> None:
    """A buggy site that trains with sigma = 0 but reports a small epsilon."""
    entries = [replace(e, noise_multiplier=0.0) for e in site_entries("site-a", 2)]
    run = write_run(tmp_path / "run", {"site-a": entries})
    result = run_audit(run, report=False)
    assert result.exit_code == EXIT_VIOLATION
    assert {"bad_mechanism", "under_reported", "over_budget"} <= codes(result)
    data = json.loads((run / "audit" / "audit.json").read_text())  # strict JSON: no Infinity
    assert data["sites"][0]["rdp_epsilon"] == "inf"


def test_over_reported_epsilon_is_only_a_note(tmp_path: Path) -> None:
    entries = [replace(e, epsilon=e.epsilon * 1.1) for e in site_entries("site-c", 3)]
    result = run_audit(write_run(tmp_path / "run", {"site-c": entries}), report=False)
    assert result.exit_code == EXIT_OK
    assert "over_reported" in {f.code for f in result.findings}


def test_tampered_ledger_is_a_violation(tmp_path: Path) -> None:
    run = honest_run(tmp_path)
    path = run / "privacy" / "ledger-site-a.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    row["epsilon"] = 0.01
    lines[1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    result = run_audit(run, report=False)
    assert result.exit_code == EXIT_VIOLATION
    assert "tampered:bad_signature" in codes(result)
    assert any("line 2: bad signature" in f.message for f in result.findings)


def test_deleted_and_truncated_lines_are_violations(tmp_path: Path) -> None:
    run = honest_run(tmp_path)
    path = run / "privacy" / "ledger-site-b.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # drop round 2
    result = run_audit(run, report=False)
    assert result.exit_code == EXIT_VIOLATION and "tampered:broken_chain" in codes(result)

    path.write_text("\n".join(lines[:4]) + "\n")  # drop the last round and the closing line
    result = run_audit(run, report=False)
    assert result.exit_code == EXIT_VIOLATION
    assert {"not_closed", "summary_mismatch"} <= codes(result)  # the summary's chain head is stale


def test_missing_key_cannot_be_verified(tmp_path: Path) -> None:
    """A run directory of an older version: no roster, so only the keys stored beside the ledgers."""
    run = write_run(tmp_path / "run", {s: site_entries(s, 3) for s in SITES},
                    skip_keys=("site-c",), roster=False)
    result = run_audit(run, report=False)
    assert result.exit_code == EXIT_UNVERIFIABLE
    assert codes(result) == {"no_roster", "missing_key"}
    assert result.verdict.startswith("CANNOT VERIFY")


def test_unknown_accountant_and_unreadable_ledger_cannot_be_verified(tmp_path: Path) -> None:
    entries = [replace(e, accountant="magic") for e in site_entries("site-a", 2)]
    result = run_audit(write_run(tmp_path / "r1", {"site-a": entries}), report=False)
    assert result.exit_code == EXIT_UNVERIFIABLE and codes(result) == {"unknown_accountant"}

    run = honest_run(tmp_path)
    (run / "privacy" / "ledger-site-a.jsonl").write_text("{not json\n")
    result = run_audit(run, report=False)
    assert result.exit_code == EXIT_UNVERIFIABLE and "unreadable_ledger" in codes(result)
    assert run_audit(tmp_path / "nothing-here", report=False).exit_code == EXIT_UNVERIFIABLE


def test_violation_takes_precedence_over_unverifiable(tmp_path: Path) -> None:
    ledgers = {"site-a": site_entries("site-a", 3, budget=0.5), "site-c": site_entries("site-c", 3)}
    result = run_audit(write_run(tmp_path / "run", ledgers, skip_keys=("site-c",), roster=False),
                       report=False)
    assert result.exit_code == EXIT_VIOLATION
    assert {"over_budget", "missing_key"} <= codes(result)


def test_no_dp_run_has_no_privacy_guarantee(tmp_path: Path) -> None:
    ledgers = {s: site_entries(s, 2, dp=False) for s in ("site-a", "site-b")}
    result = run_audit(write_run(tmp_path / "run", ledgers, dp=False), report=False)
    assert result.exit_code == EXIT_VIOLATION
    assert result.verdict.startswith("NO PRIVACY GUARANTEE")
    assert all("declared --no-dp" in f.message for f in result.findings if f.code == "no_dp")


def test_empirical_bound_above_accounted_epsilon_is_a_violation(tmp_path: Path) -> None:
    run = honest_run(tmp_path, rounds=2)
    accounted = run_audit(run, report=False).sites[0].rdp_epsilon
    bound = epsilon_lower_bound(1000, 200, 200, 1e-5)
    assert bound > accounted
    items = [{"site": "site-a", "canaries": 1000, "guesses": 200, "correct": 200, "delta": 1e-5,
              "confidence": 0.95, "epsilon_lower_bound": bound},
             {"site": "control", "control": True, "canaries": 1000, "guesses": 200,
              "correct": 200, "delta": 1e-5, "confidence": 0.95, "epsilon_lower_bound": bound}]
    (run / "privacy" / "empirical_audit.json").write_text(json.dumps({"audits": items}))
    result = run_audit(run, report=False)
    assert result.exit_code == EXIT_VIOLATION
    assert [f.site for f in result.findings if f.code == "empirical_exceeds_accounted"] == [
        "site-a"]


def test_site_directory_audit(tmp_path: Path) -> None:
    site_dir = tmp_path / "hospital-a"
    key = site_keys()["site-a"]
    save_private_key(key, site_dir / "keys" / "ledger_ed25519.pem")
    save_public_key(key.public_key(), site_dir / "keys" / "ledger_ed25519.pub")
    for row in sign_all(site_entries("site-a", 3), key):
        append_line(site_dir / "state" / "study" / "ledger.jsonl", json.dumps(row))
    result = run_audit(site_dir, report=False)
    assert result.kind == "site" and result.exit_code == EXIT_OK, result.findings
    assert (site_dir / "audit" / "audit.json").exists()


def test_audit_site_is_pure_and_flags_foreign_lines_without_key() -> None:
    rows = sign_all(site_entries("site-a", 2), site_keys()["site-a"])
    rows.append(sign_all(site_entries("site-b", 3), site_keys()["site-b"])[2])
    result = audit_site("site-a", rows, None)
    assert {f.code for f in result.findings} >= {"missing_key", "foreign_site"}


# --- the HTML report in a real browser --------------------------------------------------------


REQUIRE_CHROMIUM = "PMFL_REQUIRE_CHROMIUM"  # set by .ci/run: CI must render the report


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    reason = ("chromium is not installed: the report test renders the audit report in it "
              "(`apt-get install -y chromium`; .ci/run installs it)")
    if os.environ.get(REQUIRE_CHROMIUM) == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    run = honest_run(tmp_path, rounds=5)
    (run / "privacy" / "empirical_audit.json").write_text(json.dumps({"audits": [
        {"site": "site-a", "canaries": 1000, "guesses": 100, "correct": 58, "delta": 1e-5,
         "confidence": 0.95, "epsilon_lower_bound": epsilon_lower_bound(1000, 100, 58, 1e-5)}]}))
    result = run_audit(run)
    assert result.exit_code == EXIT_OK, result.findings
    report = run / "audit" / "report.html"
    html = report.read_text()
    assert "http://" not in html and "https://" not in html  # no external assets
    assert html.count("data:image/png;base64,") == 2
    for text in ("one patient record at one site", "δ:", "rdp", "not protected by differential "
                 "privacy", "Hospital-level membership is not protected", "empirical-audit"):
        assert text in html, text

    chromium = _chromium()
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
              "--enable-logging=stderr", "--v=0"]
    url = report.resolve().as_uri()
    shot = tmp_path / "report.png"
    proc = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000", url],
                          capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for bad in ("net::ERR_", "Failed to load resource", "Uncaught"):
        assert bad not in proc.stderr, bad
    assert shot.stat().st_size > 20_000  # text, tables and two plots, not a blank page
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "audit_report.png")

    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                         timeout=90, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="verdict"' in dom.stdout and result.verdict in dom.stdout
    assert "Empirical check" in dom.stdout and "58" in dom.stdout
