"""The privacy auditor's rules: what a run's records must show, and the verdict.

Trusts nothing the sites or the coordinator computed, and as little as possible of what the run
directory holds. The maths (Google's dp-accounting) is in pm_common/privacy/reference.py; reading
directories and writing the report is in pm_common/audit/directories.py. Here, pure functions:

- `audit_site`: one site's signed ledger against its key, the independent accounting and its budget;
- `check_run`: the run's roster (every site on it signed it) against the ledgers and summary.json:
  a site removed, a site added, a ledger re-signed with another key, a summary that disagrees with
  the signed ledgers, a ledger that does not close the run;
- `check_site_copy`: the run against a hospital's own records (its ledger and its signed roster);
- `verdict`: the exit code, and a headline that says what was verified against what.

Exit codes (`AuditResult.exit_code`):
  0  every ledger verifies against the run's roster, every reported epsilon is honest and within
     budget;
  1  a violation: tampering, over budget, under-reported epsilon, records removed or added, a
     summary that contradicts the ledgers, a site that trained without DP (even in a run declared
     `--no-dp`: exit 0 promises a privacy guarantee, and such a run has none), or an empirical lower
     bound above the accounted epsilon;
  2  something could not be verified (no roster, a missing key, an unsigned or unclosed ledger, an
     unknown accountant) and no violation was proven. A proven violation takes precedence over 2.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pm_common.privacy.reference import PLD_DISCRETIZATION as PLD_DISCRETIZATION
from pm_common.privacy.reference import RDP_ORDERS, pld_epsilons, rdp_epsilons
from pm_common.records.ledger import (
    CLOSED,
    ENROLLED,
    ROUND_STATUSES,
    TRAINED,
    LedgerEntry,
    summarize,
)
from pm_common.records.roster import Roster, SignedRoster
from pm_common.records.signing import ChainVerification, public_key_fingerprint, verify_chain

EXIT_OK, EXIT_VIOLATION, EXIT_UNVERIFIABLE = 0, 1, 2

VIOLATION = "violation"
UNVERIFIABLE = "unverifiable"
NOTE = "note"

REPORTED_RTOL = 0.01
"""A reported epsilon more than 1% below the independent figure is under-reported."""

BUDGET_RTOL = 1e-3
"""Slack for the independent RDP figure against a budget. Sites plan and report the larger of the
two RDP implementations, so an honest site needs none; it remains for ledgers of older versions."""

ACCOUNTANT_REFERENCE = {"rdp": "rdp", "prv": "pld"}
"""Accountants a site may declare, and which independent figure its epsilon is checked against
(PRV, like PLD, is a tight numerical accountant)."""

PRIVACY_UNIT = "one patient record at one site (add/remove-one adjacency, per site)"

SUMMARY_FIELDS = (
    "epsilon", "delta", "epsilon_budget", "accountant", "rounds_trained", "rounds_declined", "steps",
    "dp", "within_budget", "reason",
)
"""Fields of a site's line in summary.json that must equal what its signed ledger gives (and
`status`, also recomputed from the ledger)."""


# --- results ----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """JSON has no infinity: write non-finite floats as strings, so audit.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class Finding:
    """One thing the auditor found; severity decides the exit code."""

    severity: str  # VIOLATION | UNVERIFIABLE | NOTE
    code: str
    message: str
    site: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "message": self.message,
                "site": self.site}


@dataclass(frozen=True)
class RoundCheck:
    """One ledger line next to the auditor's own figures."""

    round: int
    status: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    reported_epsilon: float | None
    rdp_epsilon: float | None
    pld_epsilon: float | None
    epsilon_budget: float | None
    run: str = ""
    attempt: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SiteAudit:
    """Everything the auditor established about one site."""

    site: str
    entries: int = 0
    dp: bool = True
    accountant: str | None = None
    delta: float | None = None
    epsilon_budget: float | None = None
    reported_epsilon: float | None = None
    rdp_epsilon: float | None = None
    pld_epsilon: float | None = None
    key_source: str | None = None
    chain: ChainVerification | None = None
    rounds: list[RoundCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def chain_verified(self) -> bool:
        return self.chain is not None and self.chain.ok

    @property
    def verdict(self) -> str:
        severities = {f.severity for f in self.findings}
        if VIOLATION in severities:
            return "no DP" if not self.dp else "violation"
        if UNVERIFIABLE in severities:
            return "cannot verify"
        return "verified"

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "verdict": self.verdict,
            "entries": self.entries,
            "dp": self.dp,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "reported_epsilon": self.reported_epsilon,
            "rdp_epsilon": self.rdp_epsilon,
            "pld_epsilon": self.pld_epsilon,
            "chain_verified": self.chain_verified,
            "key_source": self.key_source,
            "chain": self.chain.to_dict() if self.chain else None,
            "rounds": [r.to_dict() for r in self.rounds],
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass
class AuditResult:
    """The audit of one directory; `to_dict` is what audit/audit.json holds."""

    path: str
    kind: str  # "run" | "site" | "unknown"
    exit_code: int
    verdict: str
    sites: list[SiteAudit]
    findings: list[Finding]
    dp_declared: bool = True
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    empirical: list[dict[str, Any]] | None = None
    run: str | None = None
    roster_digest: str | None = None
    verified_against: list[str] = field(default_factory=list)  # what vouched for the records
    generated_at: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )

    @property
    def violations(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == VIOLATION]

    def to_dict(self) -> dict[str, Any]:
        as_json: dict[str, Any] = _jsonable({
            "path": self.path,
            "kind": self.kind,
            "exit_code": self.exit_code,
            "verdict": self.verdict,
            "generated_at": self.generated_at,
            "run": self.run,
            "roster_digest": self.roster_digest,
            "verified_against": self.verified_against,
            "dp_declared": self.dp_declared,
            "privacy_unit": PRIVACY_UNIT,
            "method": {
                "independent_accountant": f"dp-accounting {version('dp-accounting')}",
                "rdp_orders": len(RDP_ORDERS),
                "pld_value_discretization": PLD_DISCRETIZATION,
                "reported_rtol": REPORTED_RTOL,
                "budget_rtol": BUDGET_RTOL,
                "event": "PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) composed `steps` "
                         "times per round",
            },
            "sites": [s.to_dict() for s in self.sites],
            "findings": [f.to_dict() for f in self.findings],
            "accuracy": self.accuracy,
            "empirical": self.empirical,
        })
        return as_json


# --- one site's ledger (pure) -----------------------------------------------------------------


def _fmt(x: float | None) -> str:
    if x is None:
        return "none"
    return "inf" if math.isinf(x) else f"{x:.4g}"


def _rounds_text(rounds: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in rounds[:8])
    return shown + (f" and {len(rounds) - 8} more" if len(rounds) > 8 else "")


def _run_text(run: str) -> str:
    return f"run {run[:12]}" if run else "the unnamed run"


def structure_problems(entries: Sequence[LedgerEntry]) -> list[tuple[str, str]]:
    """(code, message) for every way the lines break the ledger's grammar, run by run.

    A named run's lines open with its `enrolled` line and nothing of it follows its `closed` line;
    within one attempt of a run, rounds go up; one delta and one budget per run; lines without
    mechanism (enrolment, closing, declines) record no steps. Ledgers written before runs were
    named (no `run`) keep their old rule: consecutive rounds from 1.

    Args:
        entries: One site's ledger entries, oldest first.

    Returns:
        One (code, message) pair per problem found, in no particular priority; empty when the ledger
        is well formed.
    """
    problems: list[tuple[str, str]] = []
    runs: dict[str, list[LedgerEntry]] = {}
    for e in entries:
        runs.setdefault(e.run, []).append(e)
    for run, lines in runs.items():
        rounds = [e for e in lines if e.status in ROUND_STATUSES]
        if not run:
            for a, b in itertools.pairwise(rounds):
                if b.round != a.round + 1:
                    problems.append(("rounds_not_consecutive", f"round {b.round} follows round {a.round}: "
                                     "rounds must be consecutive"))
        else:
            if lines[0].status != ENROLLED:
                problems.append(("not_enrolled", f"{_run_text(run)}: its lines do not start with the "
                                 "site's enrolment"))
            closed = [i for i, e in enumerate(lines) if e.status == CLOSED]
            if closed and closed[0] != len(lines) - 1:
                problems.append(("after_close", f"{_run_text(run)}: lines after the site closed the run"))
            by_attempt: dict[int, list[LedgerEntry]] = {}
            for e in rounds:
                by_attempt.setdefault(e.attempt, []).append(e)
            for attempt, answered in by_attempt.items():
                for a, b in itertools.pairwise(answered):
                    if b.round <= a.round:
                        problems.append(("rounds_out_of_order", f"{_run_text(run)} attempt {attempt}: "
                                         f"round {b.round} follows round {a.round}"))
        if rounds and min(e.round for e in rounds) < 1:
            problems.append(("bad_round", f"{_run_text(run)}: a round below 1; rounds start at 1"))
        if len({e.delta for e in lines}) > 1:
            problems.append(("delta_changed", f"{_run_text(run)}: delta changes within the run: "
                             f"{sorted({e.delta for e in lines})}"))
        budgets = [e.epsilon_budget for e in lines]
        if len(set(budgets)) > 1:
            problems.append(("budget_changed", f"{_run_text(run)}: the budget changes within the run: "
                             f"{budgets}"))
    for e in entries:
        if e.status not in (*ROUND_STATUSES, ENROLLED, CLOSED):
            problems.append(("bad_status", f"round {e.round} has unknown status {e.status!r}"))
        elif e.status != TRAINED and e.steps != 0:
            problems.append(("steps_without_training", f"a {e.status} line (round {e.round}) records "
                             f"{e.steps} steps"))
        if e.dp and e.steps > 0 and not (e.noise_multiplier > 0 and 0 < e.sample_rate <= 1):
            problems.append(("bad_mechanism", f"round {e.round}: noise_multiplier "
                             f"{e.noise_multiplier} and sample_rate {e.sample_rate} give no DP"))
        if e.steps < 0:
            problems.append(("bad_mechanism", f"round {e.round}: negative steps"))
    return problems


def audit_site(
    site: str,
    rows: Sequence[Mapping[str, Any]],
    public_key: Ed25519PublicKey | None,
    *,
    declared_no_dp: bool = False,
    key_source: str | None = None,
) -> SiteAudit:
    """Audit one site's ledger lines against its key, the grammar of a ledger, the independent
    accounting and its budget.

    Args:
        site: the site the ledger belongs to.
        rows: its lines as dicts, signature fields included.
        public_key: the key the site's lines must be signed with (None: cannot verify them).
        declared_no_dp: the run was declared `--no-dp` (the finding then says so).
        key_source: where the key came from, for the report.

    Returns:
        The site's audit: its figures, per-line checks and findings.
    """
    result = SiteAudit(site=site, entries=len(rows), key_source=key_source)
    add = result.findings.append

    def violation(code: str, message: str) -> None:
        add(Finding(VIOLATION, code, f"{site}: {message}", site))

    def unverifiable(code: str, message: str) -> None:
        add(Finding(UNVERIFIABLE, code, f"{site}: {message}", site))

    if not rows:
        unverifiable("empty_ledger", "the ledger has no entries")
        return result

    # 1. Signatures and chain.
    if public_key is None:
        unverifiable("missing_key", "no public key for this site: its ledger cannot be verified")
    else:
        result.chain = verify_chain(rows, public_key, site)
        if result.chain.unsigned_only:
            unverifiable("unsigned", "the ledger is not signed: it cannot be verified")
        else:
            for problem in result.chain.problems:
                violation(f"tampered:{problem.kind}", problem.message)

    # 2. Parse the lines as ledger entries.
    try:
        entries = [LedgerEntry.from_dict(dict(row)) for row in rows]
    except (ValueError, TypeError) as exc:
        unverifiable("malformed", f"not a valid ledger: {exc}")
        return result
    last = entries[-1]
    result.dp = all(e.dp for e in entries)
    result.accountant = last.accountant
    result.delta = last.delta
    result.epsilon_budget = last.epsilon_budget
    result.reported_epsilon = last.epsilon
    if public_key is None:  # no chain check, but a foreign line is still visible
        for i, e in enumerate(entries, start=1):
            if e.site != site:
                violation("foreign_site", f"line {i} belongs to site {e.site!r}")

    # 3. The grammar of a ledger.
    for code, message in structure_problems(entries):
        violation(code, message)

    if not result.dp:
        no_dp_rounds = [e.round for e in entries if not e.dp and e.status in ROUND_STATUSES]
        if declared_no_dp:
            violation("no_dp", "NO PRIVACY GUARANTEE: trained without differential privacy "
                      "(the run was declared --no-dp)")
        else:
            violation("no_dp", "NO PRIVACY GUARANTEE: trained without differential privacy in "
                      f"round(s) {_rounds_text(no_dp_rounds)} of a DP run")
        result.rounds = [RoundCheck(e.round, e.status, e.noise_multiplier, e.sample_rate, e.steps,
                                    e.epsilon, None, None, e.epsilon_budget, e.run, e.attempt)
                         for e in entries]
        return result

    unknown = sorted({e.accountant for e in entries} - set(ACCOUNTANT_REFERENCE))
    if unknown:
        unverifiable("unknown_accountant", f"unknown accountant {unknown}: cannot recompute it")
        return result
    if not 0 < last.delta < 1:
        unverifiable("bad_delta", f"delta {last.delta} is not in (0, 1)")
        return result

    # 4. Independent accounting, line by line, over everything the site ever ran for the study.
    history = [(e.noise_multiplier, e.sample_rate, max(e.steps, 0)) for e in entries]
    rdp, grid_limited = rdp_epsilons(history, last.delta)
    pld = pld_epsilons(history, last.delta)
    result.rdp_epsilon, result.pld_epsilon = rdp[-1], pld[-1]
    reference_name = ACCOUNTANT_REFERENCE[last.accountant]
    if grid_limited and reference_name == "rdp":
        reference_name = "pld"
        add(Finding(NOTE, "rdp_orders_dropped", f"{site}: dp_accounting could not evaluate some "
                    "small RDP orders for this mechanism (epsilon far above usual budgets); the "
                    "tight PLD figure is the reference for under-reporting", site))
    reference = pld if reference_name == "pld" else rdp

    under, over_reported, over_budget, missing = [], [], [], []
    for e, r_eps, p_eps, ref in zip(entries, rdp, pld, reference, strict=True):
        result.rounds.append(RoundCheck(e.round, e.status, e.noise_multiplier, e.sample_rate,
                                        e.steps, e.epsilon, r_eps, p_eps, e.epsilon_budget,
                                        e.run, e.attempt))
        if e.epsilon is None:
            missing.append(e.round)
            continue
        if e.epsilon < ref * (1 - REPORTED_RTOL):
            under.append((e.round, e.epsilon, ref))
        elif e.epsilon > r_eps * (1 + REPORTED_RTOL):
            over_reported.append(e.round)
        budget = e.epsilon_budget
        if budget is not None and (ref > budget * (1 + BUDGET_RTOL) or e.epsilon > budget):
            over_budget.append((e.round, max(ref, e.epsilon), p_eps))

    if missing:
        violation("epsilon_missing", f"no epsilon reported for DP round(s) {_rounds_text(missing)}")
    if under:
        rnd, rep, ref = under[0]
        violation("under_reported",
                  f"under-reported epsilon in {len(under)} round(s): after round {rnd} it reports "
                  f"{_fmt(rep)} but the independent {reference_name.upper()} figure is "
                  f"{_fmt(ref)} (delta {last.delta:g})")
    if over_reported:
        add(Finding(NOTE, "over_reported", f"{site}: reports a higher epsilon than the "
                    f"independent RDP figure in round(s) {_rounds_text(over_reported)} "
                    "(conservative, not a violation)", site))
    if last.epsilon_budget is None:
        unverifiable("no_budget", "no epsilon budget recorded: compliance cannot be checked")
    elif over_budget:
        rnd, eps, p_eps = over_budget[0]
        violation("over_budget",
                  f"over budget: epsilon {_fmt(eps)} after round {rnd} exceeds the budget "
                  f"{last.epsilon_budget:g} at delta {last.delta:g} (tight PLD figure "
                  f"{_fmt(p_eps)}); {len(over_budget)} round(s) over budget")
    return result


# --- the run: roster, summary (pure) ----------------------------------------------------------


def check_roster_signatures(signed: SignedRoster) -> list[Finding]:
    """Every site on the roster signed exactly this roster (a changed roster breaks them all).

    Args:
        signed: The run's roster with the sites' signatures.

    Returns:
        One VIOLATION finding per site whose signature does not verify; empty when all do.
    """
    return [
        Finding(VIOLATION, "roster_signature", f"{site}: its signature of the roster does not verify "
                "(the roster was changed after the sites signed it, or the signature was forged)", site)
        for site in signed.invalid_signatures()
    ]


def check_run_lines(site: str, entries: Sequence[LedgerEntry], roster: Roster) -> list[Finding]:
    """The site's lines of this run agree with its roster entry, show its enrolment in this very roster, and
    close the run.

    A ledger that does not close the run cannot show that no line was removed from its end; the
    site's own copy can (`check_site_copy`).

    Args:
        site: The site's name; it must be on the roster.
        entries: The site's ledger entries (all runs), oldest first.
        roster: The run's roster.

    Returns:
        Findings: a VIOLATION when the enrolment in this roster is missing or the lines disagree with
        the roster entry (budget, delta, dp, accountant), UNVERIFIABLE when the run is not closed, and
        a NOTE when lines of a later run follow.
    """
    entry = roster.entry(site)
    assert entry is not None
    findings: list[Finding] = []
    mine = [e for e in entries if e.run == roster.run]
    enrolled = [e for e in mine if e.status == ENROLLED]
    if not enrolled or enrolled[0].roster != roster.digest:
        findings.append(Finding(VIOLATION, "not_enrolled_in_roster", f"{site}: its ledger does not show "
                                f"its enrolment in this run's roster ({roster.digest[:16]}…)", site))
    disagree = sorted({
        name
        for e in mine
        for name, line_value, roster_value in (
            ("epsilon_budget", e.epsilon_budget, entry.epsilon_budget),
            ("delta", e.delta, entry.delta),
            ("dp", e.dp, entry.dp),
            ("accountant", e.accountant, entry.accountant),
        )
        if line_value != roster_value
    })
    if disagree:
        findings.append(Finding(VIOLATION, "ledger_disagrees_with_roster", f"{site}: its ledger lines of "
                                f"this run differ from its roster entry in {disagree}", site))
    if not any(e.status == CLOSED for e in mine):
        answered = [e.round for e in mine if e.status in ROUND_STATUSES]
        last = f"round {max(answered)}" if answered else "its enrolment"
        findings.append(Finding(UNVERIFIABLE, "not_closed", f"{site}: its ledger ends at {last} without "
                                "the site's closing line for this run, so lines may have been removed from "
                                "its end (or the site left before the end): cross-check the site's own "
                                "records with --site", site))
    last_of_run = max((i for i, e in enumerate(entries) if e.run == roster.run), default=len(entries))
    later = entries[last_of_run + 1:]
    if later:
        findings.append(Finding(NOTE, "later_runs", f"{site}: the ledger also holds {len(later)} line(s) of "
                                "a later run of the study", site))
    return findings


def check_summary(summary: Mapping[str, Any], entries_by_site: Mapping[str, Sequence[LedgerEntry]],
                  heads: Mapping[str, str | None], roster: Roster | None) -> list[Finding]:
    """summary.json against the signed ledgers: every field must be what the ledger gives.

    Args:
        summary: privacy/summary.json as read.
        entries_by_site: each site's verified ledger entries.
        heads: each site's chain head (its last line's hash).
        roster: the run's roster, when it has one.

    Returns:
        One violation per site and field that disagrees, and for sites listed but without a ledger.
    """
    findings: list[Finding] = []
    if roster is not None:
        for key, pinned in (("run", roster.run), ("roster_digest", roster.digest)):
            if key in summary and summary[key] != pinned:
                findings.append(Finding(VIOLATION, "summary_mismatch", f"summary.json names {key} "
                                        f"{str(summary[key])[:16]}…, the roster {pinned[:16]}…"))
    sites = summary.get("sites") or {}
    if not isinstance(sites, Mapping):
        return [*findings, Finding(VIOLATION, "summary_mismatch", "summary.json 'sites' is not a table")]
    for site, line in sites.items():
        entries = entries_by_site.get(site)
        if not entries:
            findings.append(Finding(VIOLATION, "summary_mismatch", f"{site}: summary.json lists the site but "
                                    "the run holds no verified ledger for it", site))
            continue
        if not isinstance(line, Mapping):
            findings.append(Finding(VIOLATION, "summary_mismatch", f"{site}: its summary is not a table",
                                    site))
            continue
        expected = summarize(list(entries))
        expected["chain_head"] = heads.get(site)
        entry = roster.entry(site) if roster else None
        if entry is not None:
            expected["key_fingerprint"] = entry.key_fingerprint
        wrong = [
            k for k in (*SUMMARY_FIELDS, "chain_head", "key_fingerprint")
            if (k in line or k in expected) and not _same(line.get(k), expected.get(k))
        ]
        if line.get("status") != expected["status"]:
            wrong.append("status")
        if wrong:
            detail = ", ".join(f"{k}: summary {_short(line.get(k))} vs ledger {_short(expected.get(k))}"
                               for k in wrong[:4])
            findings.append(Finding(VIOLATION, "summary_mismatch", f"{site}: summary.json disagrees with "
                                    f"the signed ledger ({detail})", site))
    return findings


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def _short(value: Any) -> str:
    text = str(value)
    return text[:16] + "…" if len(text) > 16 else text


# --- a hospital's own records against the run (pure) ------------------------------------------


def check_site_copy(
    site: str,
    run_rows: Sequence[Mapping[str, Any]],
    site_rows: Sequence[Mapping[str, Any]],
    site_key: Ed25519PublicKey,
    site_roster: SignedRoster | None,
    roster: Roster,
) -> list[Finding]:
    """Cross-check the run's record of `site` against the hospital's own directory.

    The hospital's key, its signed copy of the run's roster and its own ledger are outside the run
    directory: a forger who rewrote the run cannot have rewritten them too.

    Args:
        site: the site's name.
        run_rows: the run's copy of its ledger.
        site_rows: the ledger in the site's own directory.
        site_key: the ledger key in the site's own directory.
        site_roster: the site's own copy of this run's roster, if it has one.
        roster: the run's roster.

    Returns:
        Violations for every disagreement.
    """
    findings: list[Finding] = []

    def violation(code: str, message: str) -> None:
        findings.append(Finding(VIOLATION, code, f"{site}: {message}", site))

    entry = roster.entry(site)
    if entry is None:
        violation("site_not_on_roster", "the site's own directory is given, but the run's roster does not "
                  "list it")
        return findings
    if public_key_fingerprint(site_key) != entry.key_fingerprint:
        violation("key_not_the_sites", "the roster names another ledger key than the one in the site's own "
                  "directory (the run's records were re-signed with a key that is not the site's)")
    if site_roster is None:
        violation("roster_not_at_site", f"the site holds no copy of run {roster.run[:12]}'s roster: it never "
                  "signed this roster")
    elif site_roster.roster.digest != roster.digest:
        violation("roster_differs", "the roster the site signed differs from the run's roster")
    own = verify_chain(site_rows, site_key, site)
    if not own.ok:
        violation("site_copy_broken", f"the site's own ledger does not verify: {own.problems[0].message}")
        return findings
    held = [row.get("entry_hash") for row in run_rows]
    theirs = [row.get("entry_hash") for row in site_rows]
    # the site's record up to its last line of this run (its closing line, if it closed the run)
    end = 1 + max((i for i, row in enumerate(site_rows) if row.get("run") == roster.run), default=-1)
    if held != theirs[: len(held)]:
        violation("differs_from_site", "the run's copy of the ledger is not the site's own ledger: lines "
                  "were changed, inserted or reordered")
    elif len(held) < end:
        violation("truncated", f"the run's copy holds {len(held)} line(s), the site's own ledger "
                  f"{end} for this run: lines were removed from the end")
    return findings


# --- the verdict --------------------------------------------------------------------------------


def verdict(findings: Sequence[Finding], sites: Sequence[SiteAudit],
            verified_against: Sequence[str], caveat: str = "") -> tuple[int, str]:
    """The exit code and the headline: what was found, and what the records were verified against.

    Args:
        findings: everything the audit found.
        sites: the sites audited.
        verified_against: what vouched for the records (the roster, a pinned digest, sites' records).
        caveat: said at the end of a passing headline, e.g. that nothing outside the run directory
            vouches for the sites' keys.

    Returns:
        (exit code, one-line headline).
    """
    violations = [f for f in findings if f.severity == VIOLATION]
    unverifiable = [f for f in findings if f.severity == UNVERIFIABLE]
    if violations:
        no_dp = [f for f in violations if f.code == "no_dp"]
        if no_dp and len(no_dp) == len(violations):
            return EXIT_VIOLATION, ("NO PRIVACY GUARANTEE: " + ", ".join(
                f.site or "?" for f in no_dp) + " trained without differential privacy")
        return EXIT_VIOLATION, f"FAIL: {len(violations)} violation(s): {violations[0].message}"
    if unverifiable:
        return EXIT_UNVERIFIABLE, (
            f"CANNOT VERIFY: {len(unverifiable)} problem(s): {unverifiable[0].message}")
    against = "; ".join(verified_against) if verified_against else "the keys in the directory"
    text = (f"PASS: {len(sites)} site ledger(s) verified against {against}; every reported epsilon matches "
            "the independent recomputation and stays within its budget")
    return EXIT_OK, f"{text}. {caveat}" if caveat else text


def empirical_findings(items: Sequence[Mapping[str, Any]], sites: Sequence[SiteAudit]) -> list[Finding]:
    """An empirical lower bound above the accounted epsilon proves an implementation bug.

    Accounting gives an upper bound on the leak; a measured lower bound above it cannot happen if the
    mechanism runs as accounted, so it is reported as a violation. Positive controls (trained without
    noise on purpose) are skipped.

    Args:
        items: The entries of privacy/empirical_audit.json, one per audited site (or run).
        sites: The audited sites, whose recomputed RDP epsilon is used when an item claims none.

    Returns:
        One VIOLATION finding per item whose bound exceeds the accounted epsilon beyond the tolerance.
    """
    by_site = {s.site: s for s in sites}
    findings = []
    for item in items:
        if item.get("control"):  # positive controls train without noise on purpose
            continue
        bound = item.get("epsilon_lower_bound")
        if bound is None and item.get("unbounded"):
            bound = math.inf
        site = by_site.get(str(item.get("site")))
        accounted = item.get("epsilon_claimed")
        if accounted is None and site is not None:
            accounted = site.rdp_epsilon
        if bound is None or accounted is None:
            continue
        if float(bound) > float(accounted) * (1 + REPORTED_RTOL):
            findings.append(Finding(
                VIOLATION, "empirical_exceeds_accounted",
                f"{item.get('site', 'run')}: the one-run empirical lower bound {_fmt(float(bound))} "
                f"exceeds the accounted epsilon {_fmt(float(accounted))}: the training leaks more "
                "than its accounting says (e.g. noise missing or a wrong sample rate)",
                site.site if site else None,
            ))
    return findings

