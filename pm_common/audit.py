"""Independent privacy auditor of a run (or a single site) directory.

Trusts nothing the sites or the coordinator computed. It checks each site's signed ledger against
the site's public key from the study record, recomputes every cumulative epsilon from the ledger's
own mechanism lines with Google's ``dp_accounting`` (a second implementation, not Opacus), and
checks each site against its budget.

Exit codes (``AuditResult.exit_code``):
  0  every ledger verifies, every reported epsilon is honest and within budget;
  1  a violation: tampering, over budget, under-reported epsilon, inconsistent ledger, a site that
     trained without DP (even in a run declared ``--no-dp``: exit 0 promises a privacy guarantee,
     and such a run has none), or an empirical lower bound above the accounted epsilon;
  2  something could not be verified (missing key, unreadable or unsigned ledger, unknown
     accountant) and no violation was proven. A proven violation takes precedence over 2.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from pm_common.ledger import DECLINED, TRAINED, LedgerEntry
from pm_common.signing import ChainVerification, load_public_key, read_raw_ledger, verify_chain

EXIT_OK, EXIT_VIOLATION, EXIT_UNVERIFIABLE = 0, 1, 2

VIOLATION = "violation"
UNVERIFIABLE = "unverifiable"
NOTE = "note"

REPORTED_RTOL = 0.01
"""A reported epsilon more than 1% below the independent figure is under-reported."""

BUDGET_RTOL = 1e-3
"""Slack for the independent RDP figure against a budget: the two RDP implementations agree to
~1e-4 relative, and Opacus calibrates sigma to land just under the budget."""

PLD_DISCRETIZATION = 1e-3
"""PLD value discretization. dp_accounting's PLD is pessimistic, so a coarser grid still gives an
upper bound; 1e-3 is ~10x faster than the default 1e-4 and changes epsilon by ~1e-4 relative."""

RDP_ORDERS: tuple[float, ...] = tuple(sorted(
    {1 + x / 10.0 for x in range(1, 100)} | set(range(12, 64)) | set(rdp_lib.DEFAULT_RDP_ORDERS)
))
"""Opacus' order grid plus dp_accounting's: minimising over a superset of Opacus' orders means an
honest Opacus figure is never flagged because of the grid."""

ACCOUNTANT_REFERENCE = {"rdp": "rdp", "prv": "pld"}
"""Accountants a site may declare, and which independent figure its epsilon is checked against
(PRV, like PLD, is a tight numerical accountant)."""

PRIVACY_UNIT = "one patient record at one site (add/remove-one adjacency, per site)"


# --- accounting (pure) ------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp_accounting logs one warning per RDP order it drops; we record the fact instead."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@lru_cache(maxsize=256)
def _one_step_rdp(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """RDP of one step of the Poisson-subsampled Gaussian at every order in RDP_ORDERS."""
    acc = RdpAccountant(orders=list(RDP_ORDERS))
    event = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
    with _quiet_absl():
        acc.compose(event, 1)
    return tuple(float(x) for x in acc.rdp)


def _mechanism(history: Sequence[Sequence[float]]) -> list[tuple[float, float, int]]:
    return [(float(s), float(q), int(n)) for s, q, n in history]


def rdp_epsilons(history: Sequence[Sequence[float]], delta: float) -> tuple[list[float], bool]:
    """Cumulative RDP epsilon after each (noise_multiplier, sample_rate, steps) entry.

    RDP composes additively, so one step is computed once per mechanism and scaled by its steps.
    Also returns whether the figure is limited by the order grid: dp_accounting gives up on some
    small fractional orders (Opacus evaluates them), and when the optimum lands on the smallest
    order it could evaluate, the dropped ones might have given a lower epsilon.
    """
    total = np.zeros(len(RDP_ORDERS))
    out: list[float] = []
    limited = False
    for sigma, q, steps in _mechanism(history):
        if steps > 0:
            total = total + (np.inf if sigma <= 0 else steps * np.asarray(_one_step_rdp(q, sigma)))
        finite = np.isfinite(total)
        if not total.any():
            out.append(0.0)
        elif not finite.any():
            out.append(math.inf)
        else:
            eps, order = rdp_lib.compute_epsilon(RDP_ORDERS, total.tolist(), delta)
            first = RDP_ORDERS[int(np.argmax(finite))]
            limited = limited or (not finite[0] and order == first)
            out.append(float(eps))
    return out, limited


PLD_MIN_SIGMA = 0.3


def pld_epsilons(
    history: Sequence[Sequence[float]], delta: float, discretization: float = PLD_DISCRETIZATION
) -> list[float]:
    """Cumulative epsilon after each entry by privacy loss distributions (tight, dp_accounting).

    Below PLD_MIN_SIGMA the discretised distribution grows past any memory (epsilon is huge
    anyway): from such an entry on the tight figure is not computed (NaN) and RDP stands alone.
    """
    acc = PLDAccountant(value_discretization_interval=discretization)
    out: list[float] = []
    composed = False
    for sigma, q, steps in _mechanism(history):
        if 0 < sigma < PLD_MIN_SIGMA or (out and math.isnan(out[-1])):
            out.append(float("nan"))
            continue
        if steps > 0:
            if sigma <= 0:
                acc.compose(dp_event.NonPrivateDpEvent())
            else:
                acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
            composed = True
        out.append(float(acc.get_epsilon(delta)) if composed else 0.0)
    return out


def rdp_epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """Cumulative RDP epsilon of a whole history (the independent twin of Opacus' figure)."""
    values, _ = rdp_epsilons(history, delta)
    return values[-1] if values else 0.0


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
    generated_at: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )

    @property
    def violations(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == VIOLATION]

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "path": self.path,
            "kind": self.kind,
            "exit_code": self.exit_code,
            "verdict": self.verdict,
            "generated_at": self.generated_at,
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


# --- one site (pure) --------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    if x is None:
        return "none"
    return "inf" if math.isinf(x) else f"{x:.4g}"


def _rounds_text(rounds: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in rounds[:8])
    return shown + (f" and {len(rounds) - 8} more" if len(rounds) > 8 else "")


def audit_site(
    site: str,
    rows: Sequence[Mapping[str, Any]],
    public_key: Ed25519PublicKey | None,
    *,
    summary: Mapping[str, Any] | None = None,
    declared_no_dp: bool = False,
    key_source: str | None = None,
) -> SiteAudit:
    """Audit one site's ledger lines against its key, the accounting and its budget."""
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

    # 3. Structure: consecutive rounds, constant delta and budget, sane mechanisms.
    for a, b in itertools.pairwise(entries):
        if b.round != a.round + 1:
            violation("rounds_not_consecutive",
                      f"round {b.round} follows round {a.round}: rounds must be consecutive")
    if entries[0].round < 1:
        violation("bad_round", f"first round is {entries[0].round}; rounds start at 1")
    if len({e.delta for e in entries}) > 1:
        violation("delta_changed", f"delta changes within the study: {sorted({e.delta for e in entries})}")
    if len({e.epsilon_budget for e in entries}) > 1:
        violation("budget_changed", "the budget changes within the study: "
                  f"{[e.epsilon_budget for e in entries]}")

    if not result.dp:
        no_dp_rounds = [e.round for e in entries if not e.dp]
        if declared_no_dp:
            violation("no_dp", "NO PRIVACY GUARANTEE: trained without differential privacy "
                      "(the run was declared --no-dp)")
        else:
            violation("no_dp", "NO PRIVACY GUARANTEE: trained without differential privacy in "
                      f"round(s) {_rounds_text(no_dp_rounds)} of a DP run")
        result.rounds = [RoundCheck(e.round, e.status, e.noise_multiplier, e.sample_rate, e.steps,
                                    e.epsilon, None, None, e.epsilon_budget) for e in entries]
        return result

    for e in entries:
        if e.status == DECLINED and e.steps != 0:
            violation("declined_with_steps",
                      f"round {e.round} is declined but records {e.steps} steps")
        if e.status not in (TRAINED, DECLINED):
            violation("bad_status", f"round {e.round} has unknown status {e.status!r}")
        if e.steps > 0 and not (e.noise_multiplier > 0 and 0 < e.sample_rate <= 1):
            violation("bad_mechanism", f"round {e.round}: noise_multiplier "
                      f"{e.noise_multiplier} and sample_rate {e.sample_rate} give no DP")
        if e.steps < 0:
            violation("bad_mechanism", f"round {e.round}: negative steps")

    unknown = sorted({e.accountant for e in entries} - set(ACCOUNTANT_REFERENCE))
    if unknown:
        unverifiable("unknown_accountant", f"unknown accountant {unknown}: cannot recompute it")
        return result
    if not 0 < last.delta < 1:
        unverifiable("bad_delta", f"delta {last.delta} is not in (0, 1)")
        return result

    # 4. Independent accounting, round by round.
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
                                        e.steps, e.epsilon, r_eps, p_eps, e.epsilon_budget))
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

    # 5. The coordinator's summary must agree with the ledger.
    if summary is not None:
        s_eps = summary.get("epsilon")
        if s_eps is not None and last.epsilon is not None and not math.isclose(
            float(s_eps), last.epsilon, rel_tol=1e-9, abs_tol=1e-12
        ):
            violation("summary_mismatch", f"summary.json reports epsilon {_fmt(float(s_eps))} "
                      f"but the ledger's last entry says {_fmt(last.epsilon)}")
        head = summary.get("chain_head")
        if head is not None and result.chain is not None and head != result.chain.head:
            violation("truncated", "the ledger's last entry is not the chain head recorded in "
                      "summary.json (lines removed from the end, or a stale summary)")
    return result


# --- directories (thin I/O) -------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def _load_key(path: Path, site: str, findings: list[Finding]) -> Ed25519PublicKey | None:
    if not path.exists():
        return None
    try:
        return load_public_key(path)
    except (ValueError, TypeError, OSError) as exc:
        findings.append(Finding(UNVERIFIABLE, "bad_key", f"{site}: unreadable key {path}: {exc}",
                                site))
        return None


def _load_rows(path: Path, site: str, findings: list[Finding]) -> list[dict[str, Any]] | None:
    try:
        return read_raw_ledger(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        findings.append(Finding(UNVERIFIABLE, "unreadable_ledger",
                                f"{site}: cannot read {path.name}: {exc}", site))
        return None


def accuracy_series(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-round accuracy from metrics.json: mean over sites and pooled."""
    rows = []
    for item in metrics.get("rounds", []):
        if not isinstance(item, Mapping) or "round" not in item:
            continue
        rows.append({
            "round": item["round"],
            "mean_site_accuracy": item.get("mean_site_accuracy"),
            "pooled_accuracy": item.get("pooled_accuracy"),
            "sites": sorted((item.get("sites") or {}).keys()),
        })
    return rows


def _empirical_items(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, Mapping) and isinstance(data.get("audits"), list):
        return [dict(a) for a in data["audits"] if isinstance(a, Mapping)]
    if isinstance(data, Mapping):
        return [dict(data)]
    if isinstance(data, list):
        return [dict(a) for a in data if isinstance(a, Mapping)]
    return []


def check_empirical(items: Sequence[Mapping[str, Any]], sites: Sequence[SiteAudit]) -> list[Finding]:
    """An empirical lower bound above the accounted epsilon proves an implementation bug."""
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


def _verdict(findings: Sequence[Finding], sites: Sequence[SiteAudit]) -> tuple[int, str]:
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
    return EXIT_OK, (f"PASS: {len(sites)} site ledger(s) verified; every reported epsilon "
                     "matches the independent recomputation and stays within its budget")


def _audit_run(path: Path) -> AuditResult:
    privacy = path / "privacy"
    findings: list[Finding] = []
    summary_sites: dict[str, Any] = {}
    dp_declared = True
    summary_path = privacy / "summary.json"
    try:
        summary = _read_json(summary_path)
        summary_sites = dict(summary.get("sites") or {})
        dp_declared = bool(summary.get("dp", True))
    except FileNotFoundError:
        findings.append(Finding(UNVERIFIABLE, "missing_summary", "privacy/summary.json is missing"))
    except (ValueError, OSError, AttributeError) as exc:
        findings.append(Finding(UNVERIFIABLE, "unreadable_summary",
                                f"privacy/summary.json is unreadable: {exc}"))

    ledgers = {p.name[len("ledger-"):-len(".jsonl")]: p for p in privacy.glob("ledger-*.jsonl")}
    keys = {p.stem: p for p in (privacy / "keys").glob("*.pub")}
    sites: list[SiteAudit] = []
    for site in sorted(set(ledgers) | set(summary_sites) | set(keys)):
        if site not in ledgers:
            findings.append(Finding(UNVERIFIABLE, "missing_ledger",
                                    f"{site}: no ledger-{site}.jsonl in privacy/", site))
            continue
        site_findings: list[Finding] = []
        key_path = keys.get(site, privacy / "keys" / f"{site}.pub")
        public_key = _load_key(key_path, site, site_findings)
        rows = _load_rows(ledgers[site], site, site_findings)
        if rows is None:
            findings.extend(site_findings)
            continue
        audit = audit_site(site, rows, public_key, summary=summary_sites.get(site),
                           declared_no_dp=not dp_declared,
                           key_source=f"privacy/keys/{site}.pub (study record)")
        if site not in summary_sites and summary_sites:
            audit.findings.append(Finding(NOTE, "not_in_summary",
                                          f"{site}: has a ledger but no line in summary.json", site))
        audit.findings[:0] = [f for f in site_findings if f.code == "bad_key"]
        if any(f.code == "bad_key" for f in site_findings):
            audit.findings = [f for f in audit.findings if f.code != "missing_key"]
        sites.append(audit)
        findings.extend(audit.findings)

    accuracy: list[dict[str, Any]] = []
    metrics_path = path / "metrics.json"
    if metrics_path.exists():
        try:
            accuracy = accuracy_series(_read_json(metrics_path))
        except (ValueError, OSError, AttributeError) as exc:
            findings.append(Finding(NOTE, "unreadable_metrics", f"metrics.json is unreadable: {exc}"))
        last_round = {s.site: (s.rounds[-1].round if s.rounds else 0) for s in sites}
        for site, last in last_round.items():
            later = [a["round"] for a in accuracy if site in a["sites"] and a["round"] > last]
            if later:
                findings.append(Finding(NOTE, "metrics_after_ledger", f"{site}: metrics.json has "
                                        f"results for round(s) {_rounds_text(later)} after its last "
                                        f"ledger entry (round {last})", site))

    empirical = None
    empirical_path = privacy / "empirical_audit.json"
    if empirical_path.exists():
        try:
            empirical = _empirical_items(_read_json(empirical_path))
            findings.extend(check_empirical(empirical, sites))
        except (ValueError, OSError) as exc:
            findings.append(Finding(UNVERIFIABLE, "unreadable_empirical",
                                    f"privacy/empirical_audit.json is unreadable: {exc}"))

    if not ledgers:
        findings.append(Finding(UNVERIFIABLE, "no_ledgers", "privacy/ holds no ledger-*.jsonl"))
    exit_code, verdict = _verdict(findings, sites)
    return AuditResult(str(path), "run", exit_code, verdict, sites, findings, dp_declared,
                       accuracy, empirical)


def _site_ledgers(path: Path) -> list[Path]:
    """A site keeps one ledger per study it took part in: SITE/state/<study>/ledger.jsonl."""
    return sorted((path / "state").glob("*/ledger.jsonl"))


def _audit_site_dir(path: Path) -> AuditResult:
    findings: list[Finding] = []
    sites: list[SiteAudit] = []
    for ledger in _site_ledgers(path):
        study = ledger.parent.name
        rows = _load_rows(ledger, path.name, findings)
        if rows is None:
            continue
        site = str(rows[0].get("site", path.name)) if rows else path.name
        key = _load_key(path / "keys" / "ledger_ed25519.pub", site, findings)
        audit = audit_site(site, rows, key, declared_no_dp=False,
                           key_source="keys/ledger_ed25519.pub (the site's own copy)")
        audit.findings.append(Finding(NOTE, "local_key", f"{site} (study {study}): verified with the key "
                                      "stored in the site directory; compare its fingerprint "
                                      f"{audit.chain.key_fingerprint if audit.chain else '?'} "
                                      "with the study record", site))
        sites.append(audit)
        findings.extend(audit.findings)
    exit_code, verdict = _verdict(findings, sites)
    return AuditResult(str(path), "site", exit_code, verdict, sites, findings)


def audit_directory(path: Path) -> AuditResult:
    """Audit a run directory (RUN/privacy/...) or a site directory (SITE/state/<study>/ledger.jsonl)."""
    if (path / "privacy").is_dir():
        return _audit_run(path)
    if _site_ledgers(path):
        return _audit_site_dir(path)
    finding = Finding(UNVERIFIABLE, "not_a_run",
                      f"{path} is neither a run directory (privacy/) nor a site directory "
                      "(state/<study>/ledger.jsonl)")
    return AuditResult(str(path), "unknown", EXIT_UNVERIFIABLE, f"CANNOT VERIFY: {finding.message}",
                       [], [finding])


def run_audit(path: Path, *, report: bool = True) -> AuditResult:
    """Audit `path`, write audit/audit.json (and audit/report.html) inside it, return the result."""
    path = Path(path)
    result = audit_directory(path)
    if path.is_dir():
        out = path / "audit"
        out.mkdir(exist_ok=True)
        (out / "audit.json").write_text(
            json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
        if report:
            from pm_common.audit_report import write_report  # matplotlib only when needed

            write_report(result, out / "report.html")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pm_common.audit RUN_OR_SITE_DIR`: print the verdict, exit with its code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pm_common.audit RUN_OR_SITE_DIR", file=sys.stderr)
        return EXIT_UNVERIFIABLE
    result = run_audit(Path(args[0]))
    print(result.verdict)
    for f in result.findings:
        if f.severity != NOTE:
            print(f"  [{f.severity}] {f.message}")
    print(f"wrote {Path(args[0]) / 'audit' / 'audit.json'} and report.html")
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
