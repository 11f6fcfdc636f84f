"""`pmfl audit`: read a run (or a hospital's site directory), apply the auditor's rules, write the report.

Thin I/O around pm_common/audit/rules.py. What a run's audit verifies against, in increasing strength:
the keys in the run directory itself (no roster: old runs; cannot verify); the run's roster, signed
by every site on it (a partial forgery breaks it); a roster digest the auditor pins (`--roster`,
e.g. from a hospital's `pmfl site status`), and each hospital's own records (`--site SITE_DIR`),
which are outside the run directory altogether.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pm_common.audit.rules import (
    EXIT_UNVERIFIABLE,
    NOTE,
    UNVERIFIABLE,
    VIOLATION,
    AuditResult,
    Finding,
    SiteAudit,
    audit_site,
    check_roster_signatures,
    check_run_lines,
    check_site_copy,
    check_summary,
    empirical_findings,
    verdict,
)
from pm_common.records.ledger import LedgerEntry
from pm_common.records.roster import Roster, RosterError, SignedRoster, roster_signature_valid
from pm_common.records.signing import load_public_key, public_key_fingerprint, read_raw_ledger

SITE_KEY = Path("keys") / "ledger_ed25519.pub"


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def _load_key(path: Path, site: str, findings: list[Finding]) -> Ed25519PublicKey | None:
    if not path.exists():
        return None
    try:
        return load_public_key(path)
    except (ValueError, TypeError, OSError) as exc:
        findings.append(Finding(UNVERIFIABLE, "bad_key", f"{site}: unreadable key {path}: {exc}", site))
        return None


def _load_rows(path: Path, site: str, findings: list[Finding]) -> list[dict[str, Any]] | None:
    try:
        return read_raw_ledger(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        findings.append(Finding(UNVERIFIABLE, "unreadable_ledger", f"{site}: cannot read {path.name}: {exc}",
                                site))
        return None


def _entries(rows: Sequence[Mapping[str, Any]]) -> list[LedgerEntry] | None:
    try:
        return [LedgerEntry.from_dict(dict(row)) for row in rows]
    except (ValueError, TypeError):
        return None


def accuracy_series(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-round accuracy from metrics.json, mean over sites and pooled, and the task's own headline
    metric (`metric`: e.g. r2, c_index) the same two ways.

    Tolerant of malformed items (skipped), since metrics.json is not covered by the ledger's integrity
    and must not stop an audit.

    Args:
        metrics: The parsed metrics.json.

    Returns:
        One dict per round with `round`, `mean_site_accuracy`, `pooled_accuracy`, `metric`,
        `mean_site` and `weighted_site_mean` (None when absent) and the sorted names of the sites reported.
    """
    rows = []
    for item in metrics.get("rounds", []):
        if not isinstance(item, Mapping) or "round" not in item:
            continue
        rows.append({
            "round": item["round"],
            "mean_site_accuracy": item.get("mean_site_accuracy"),
            "pooled_accuracy": item.get("pooled_accuracy"),
            "metric": item.get("metric", "accuracy"),
            "mean_site": item.get("mean_site", item.get("mean_site_accuracy")),
            "weighted_site_mean": item.get("weighted_site_mean", item.get("pooled_accuracy")),
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


def _load_roster(privacy: Path, findings: list[Finding]) -> SignedRoster | None:
    path = privacy / "roster.json"
    if not path.exists():
        findings.append(Finding(UNVERIFIABLE, "no_roster", "privacy/roster.json is missing: nothing in the "
                                "run says which sites took part, or with which keys"))
        return None
    try:
        return SignedRoster.from_json(path.read_text(encoding="utf-8"))
    except (RosterError, OSError, UnicodeDecodeError) as exc:
        findings.append(Finding(UNVERIFIABLE, "unreadable_roster",
                                f"privacy/roster.json is unreadable: {exc}"))
        return None


def _audit_run(path: Path, roster_digest: str | None, site_dirs: Sequence[Path]) -> AuditResult:
    privacy = path / "privacy"
    findings: list[Finding] = []
    summary: Mapping[str, Any] | None = None
    dp_declared = True
    try:
        summary = _read_json(privacy / "summary.json")
        if not isinstance(summary, Mapping):
            raise ValueError("not a JSON object")
        dp_declared = bool(summary.get("dp", True))
    except FileNotFoundError:
        findings.append(Finding(UNVERIFIABLE, "missing_summary", "privacy/summary.json is missing"))
    except (ValueError, OSError) as exc:
        findings.append(Finding(UNVERIFIABLE, "unreadable_summary",
                                f"privacy/summary.json is unreadable: {exc}"))
        summary = None
    signed = _load_roster(privacy, findings)
    roster = signed.roster if signed else None
    if signed is not None:
        findings.extend(check_roster_signatures(signed))

    ledgers = {p.name[len("ledger-"):-len(".jsonl")]: p for p in privacy.glob("ledger-*.jsonl")}
    listed = summary.get("sites") if summary else None
    summary_sites = dict(listed) if isinstance(listed, Mapping) else {}
    names = sorted(set(ledgers) | set(roster.site_names if roster else ()) | set(summary_sites))
    sites: list[SiteAudit] = []
    entries_by_site: dict[str, list[LedgerEntry]] = {}
    heads: dict[str, str | None] = {}
    rows_by_site: dict[str, list[dict[str, Any]]] = {}
    for site in names:
        entry = roster.entry(site) if roster else None
        if site not in ledgers:
            if entry is not None:
                findings.append(Finding(VIOLATION, "missing_ledger", f"{site}: on the run's roster, which it "
                                        "signed, but the run holds no ledger for it: records were removed",
                                        site))
            elif roster is None:
                findings.append(Finding(UNVERIFIABLE, "missing_ledger", f"{site}: no ledger-{site}.jsonl in "
                                        "privacy/", site))
            continue
        site_findings: list[Finding] = []
        if roster is not None and entry is None:
            site_findings.append(Finding(VIOLATION, "not_on_roster", f"{site}: the run holds a ledger for a "
                                         "site that is not on its roster: it did not take part in this run",
                                         site))
        key_file = privacy / "keys" / f"{site}.pub"
        if entry is not None:
            key: Ed25519PublicKey | None = entry.public_key()
            source = f"the run's roster (fingerprint {entry.key_fingerprint[:16]}…)"
            file_key = _load_key(key_file, site, site_findings)
            if file_key is not None and public_key_fingerprint(file_key) != entry.key_fingerprint:
                site_findings.append(Finding(VIOLATION, "key_file_mismatch",
                                             f"{site}: privacy/keys/{site}.pub is not the key the roster "
                                             "names", site))
        else:
            key = _load_key(key_file, site, site_findings)
            source = f"privacy/keys/{site}.pub (the run directory itself)"
        rows = _load_rows(ledgers[site], site, site_findings)
        if rows is None:
            findings.extend(site_findings)
            continue
        audit = audit_site(site, rows, key, declared_no_dp=not dp_declared, key_source=source)
        audit.findings[:0] = site_findings
        parsed = _entries(rows)
        if parsed:
            entries_by_site[site] = parsed
            heads[site] = rows[-1].get("entry_hash") if rows else None
            rows_by_site[site] = rows
            if entry is not None and roster is not None:
                audit.findings.extend(check_run_lines(site, parsed, roster))
        sites.append(audit)
        findings.extend(audit.findings)

    if summary is not None:  # sites whose ledger could not be read are unverifiable already
        unreadable = {site for site in ledgers if site not in entries_by_site}
        listed = summary.get("sites")
        if isinstance(listed, Mapping):
            summary = {**summary, "sites": {k: v for k, v in listed.items() if k not in unreadable}}
        findings.extend(check_summary(summary, entries_by_site, heads, roster))

    verified_against: list[str] = []
    if roster is not None:
        verified_against.append(f"the run's roster, signed by all {len(roster.sites)} sites on it "
                                f"(digest {roster.digest[:16]}…)")
    findings.extend(_pinned(roster, roster_digest, verified_against))
    for site_dir in site_dirs:
        checked = _cross_check(Path(site_dir), roster, rows_by_site, verified_against)
        findings.extend(checked)
        if checked.site and not any(f.severity == VIOLATION for f in checked):
            findings = _tail_vouched_for(findings, sites, checked.site)

    accuracy: list[dict[str, Any]] = []
    metrics_path = path / "metrics.json"
    if metrics_path.exists():
        try:
            accuracy = accuracy_series(_read_json(metrics_path))
        except (ValueError, OSError, AttributeError) as exc:
            findings.append(Finding(NOTE, "unreadable_metrics", f"metrics.json is unreadable: {exc}"))
        last_round = {s.site: max((r.round for r in s.rounds), default=0) for s in sites}
        for site, last in last_round.items():
            later = [a["round"] for a in accuracy if site in a["sites"] and a["round"] > last]
            if later:
                findings.append(Finding(NOTE, "metrics_after_ledger",
                                        f"{site}: metrics.json has results for round(s) {later[:8]} "
                                        f"after its last ledger entry (round {last})", site))

    empirical = None
    empirical_path = privacy / "empirical_audit.json"
    if empirical_path.exists():
        try:
            empirical = _empirical_items(_read_json(empirical_path))
            findings.extend(empirical_findings(empirical, sites))
        except (ValueError, OSError) as exc:
            findings.append(Finding(UNVERIFIABLE, "unreadable_empirical",
                                    f"privacy/empirical_audit.json is unreadable: {exc}"))

    if not ledgers and roster is None:
        findings.append(Finding(UNVERIFIABLE, "no_ledgers", "privacy/ holds no ledger-*.jsonl"))
    caveat = ""
    if not roster_digest and not site_dirs:
        caveat = ("NOT ANCHORED: nothing outside the run directory vouches for the sites' keys (pin the "
                  "roster digest with --roster, or cross-check a hospital's own records with --site)")
    exit_code, text = verdict(findings, sites, verified_against, caveat)
    return AuditResult(str(path), "run", exit_code, text, sites, findings, dp_declared, accuracy, empirical,
                       run=roster.run if roster else None, roster_digest=roster.digest if roster else None,
                       verified_against=verified_against)


def _pinned(roster: Roster | None, pinned: str | None, verified_against: list[str]) -> list[Finding]:
    if not pinned:
        return []
    if roster is None:
        return [Finding(UNVERIFIABLE, "roster_not_pinned", "a roster digest was pinned, but the run has no "
                        "readable roster to compare it with")]
    if roster.digest != pinned.strip().lower():
        return [Finding(VIOLATION, "roster_not_pinned", f"the run's roster (digest {roster.digest[:16]}…) is "
                        f"not the roster pinned ({pinned.strip()[:16]}…)")]
    verified_against.append("the roster digest pinned with --roster")
    return []


class _Checked(list[Finding]):
    """The findings of one cross-check, and which site it was (None if unknown)."""

    site: str | None = None


def _tail_vouched_for(findings: list[Finding], sites: Sequence[SiteAudit], site: str) -> list[Finding]:
    """A ledger that does not close the run, checked against the site's own copy and found whole, is
    verified to its end: its `not_closed` finding becomes a note (in the site's audit too)."""

    def soften(items: list[Finding]) -> list[Finding]:
        return [
            Finding(NOTE, f.code, f"{f.message} [checked: the site's own records end there too]", f.site)
            if f.code == "not_closed" and f.site == site else f
            for f in items
        ]

    for audit in sites:
        if audit.site == site:
            audit.findings = soften(audit.findings)
    return soften(findings)


def _cross_check(site_dir: Path, roster: Roster | None, rows_by_site: Mapping[str, list[dict[str, Any]]],
                 verified_against: list[str]) -> _Checked:
    """The run against one hospital's own directory (`--site SITE_DIR`)."""
    findings = _Checked()
    if roster is None:
        findings.append(Finding(UNVERIFIABLE, "no_roster", f"{site_dir}: the run has no readable roster to "
                                "cross-check the site's records with"))
        return findings
    key = _load_key(site_dir / SITE_KEY, str(site_dir), findings)
    ledger = site_dir / "state" / roster.study / "ledger.jsonl"
    if key is None or not ledger.exists():
        findings.append(Finding(UNVERIFIABLE, "not_a_site_dir", f"{site_dir}: no {SITE_KEY} or no "
                                f"state/{roster.study}/ledger.jsonl: not this study's site directory"))
        return findings
    site_rows = _load_rows(ledger, str(site_dir), findings)
    if site_rows is None:
        return findings
    site = str(site_rows[0].get("site", site_dir.name)) if site_rows else site_dir.name
    findings.site = site
    copy_path = site_dir / "state" / roster.study / "rosters" / f"{roster.run}.json"
    site_roster = None
    if copy_path.exists():
        try:
            data = _read_json(copy_path)
            site_roster = SignedRoster(Roster.from_dict(data["roster"]), {site: str(data["signature"])})
        except (RosterError, ValueError, KeyError, TypeError, OSError) as exc:
            findings.append(Finding(VIOLATION, "roster_differs", f"{site}: its copy of the roster is "
                                    f"unreadable: {exc}", site))
        if site_roster is not None and not roster_signature_valid(site_roster.roster, site,
                                                                 site_roster.signatures[site]):
            findings.append(Finding(VIOLATION, "roster_differs", f"{site}: its copy of the roster does not "
                                    "carry its own valid signature", site))
    findings.extend(check_site_copy(site, rows_by_site.get(site, []), site_rows, key, site_roster, roster))
    if not any(f.severity == VIOLATION for f in findings):
        verified_against.append(f"{site}'s own records ({site_dir})")
    return findings


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
        key = _load_key(path / SITE_KEY, site, findings)
        audit = audit_site(site, rows, key, key_source=f"{SITE_KEY} (the site's own copy)")
        for copy in sorted((ledger.parent / "rosters").glob("*.json")):
            try:
                data = _read_json(copy)
                valid = roster_signature_valid(Roster.from_dict(data["roster"]), site, str(data["signature"]))
            except (RosterError, ValueError, KeyError, TypeError, OSError):
                valid = False
            if not valid:
                audit.findings.append(Finding(VIOLATION, "roster_copy", f"{site} (study {study}): the roster "
                                              f"copy {copy.name} does not carry the site's valid signature",
                                              site))
        audit.findings.append(Finding(NOTE, "local_key", f"{site} (study {study}): verified with the key "
                                      "stored in the site directory; its fingerprint "
                                      f"{audit.chain.key_fingerprint if audit.chain else '?'} is what each "
                                      "run's roster must name", site))
        sites.append(audit)
        findings.extend(audit.findings)
    exit_code, text = verdict(findings, sites, ["the ledger key in the site directory"])
    return AuditResult(str(path), "site", exit_code, text, sites, findings,
                       verified_against=["the ledger key in the site directory"])


def audit_directory(
    path: Path, *, roster_digest: str | None = None, site_dirs: Sequence[Path] = ()
) -> AuditResult:
    """Audit a run directory (RUN/privacy/...) or a site directory (SITE/state/<study>/ledger.jsonl).

    Args:
        path: the directory.
        roster_digest: the run's roster digest as the auditor got it out of band (runs only).
        site_dirs: hospitals' own site directories to cross-check the run with (runs only).

    Returns:
        The audit's result; its `exit_code` is 0, 1 or 2 (pm_common/audit/rules.py).
    """
    path = Path(path)
    if (path / "privacy").is_dir():
        return _audit_run(path, roster_digest, site_dirs)
    if _site_ledgers(path):
        return _audit_site_dir(path)
    finding = Finding(UNVERIFIABLE, "not_a_run", f"{path} is neither a run directory (privacy/) nor a site "
                      "directory (state/<study>/ledger.jsonl)")
    return AuditResult(str(path), "unknown", EXIT_UNVERIFIABLE, f"CANNOT VERIFY: {finding.message}", [],
                       [finding])


def run_audit(
    path: Path, *, report: bool = True, roster_digest: str | None = None, site_dirs: Sequence[Path] = ()
) -> AuditResult:
    """Audit `path`, write audit/audit.json (and audit/report.html) inside it, return the result.

    Args:
        path: A run directory or a site directory.
        report: Whether to write the HTML report too (it needs matplotlib).
        roster_digest: A roster digest given out of band, to pin the run's roster to.
        site_dirs: Site directories whose own records the run is cross-checked against.

    Returns:
        The audit's result. Nothing is written when `path` is not a directory.
    """
    path = Path(path)
    result = audit_directory(path, roster_digest=roster_digest, site_dirs=site_dirs)
    if path.is_dir():
        out = path / "audit"
        out.mkdir(exist_ok=True)
        (out / "audit.json").write_text(
            json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
        if report:
            from pm_common.audit.report import write_report  # matplotlib only when needed

            write_report(result, out / "report.html")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pm_common.audit.directories RUN_OR_SITE_DIR`: print the verdict, exit with its code.

    Args:
        argv: The command-line arguments without the program name; sys.argv[1:] when None.

    Returns:
        The audit's exit code (EXIT_UNVERIFIABLE on a usage error), so scripts can act on the verdict.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pm_common.audit.directories RUN_OR_SITE_DIR", file=sys.stderr)
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
