"""A forger with write access to a run directory against `pmfl audit` (issue 14, items 5-9).

Every attack starts from a real simulated run (the real apps, DP at every site), copies it, and
forges it the way someone holding the coordinator's files could: with pmfl's own tools to re-sign
lines and to recompute summary.json so that everything the forger touched is self-consistent.
The forger holds none of the hospitals' private keys and cannot touch their own directories.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from pm_common.audit.directories import audit_directory
from pm_common.audit.rules import EXIT_OK, EXIT_UNVERIFIABLE, EXIT_VIOLATION
from pm_common.privacy.accountant import cumulative_epsilon
from pm_common.records.ledger import LedgerEntry, read_ledger, summarize
from pm_common.records.roster import SignedRoster, sign_roster
from pm_common.records.signing import (
    chain_head,
    generate_signing_key,
    public_key_fingerprint,
    public_key_text,
    read_raw_ledger,
    save_public_key,
    sign_entry,
)
from simulations.runner import SITES_DIR, simulate
from tests.conftest import heart_study

VICTIM = "hungary"


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-round DP study of the four built-in hospitals."""
    tmp = tmp_path_factory.mktemp("honest")
    _, study = heart_study(tmp, study={"rounds": 2})
    out = tmp / "run"
    simulate(study, out)
    return out


@pytest.fixture
def run(honest_run: Path, tmp_path: Path) -> Path:
    """A copy of the honest run for one forger; the hospitals' own directories stay where they are."""
    copy = tmp_path / "run"
    shutil.copytree(honest_run, copy, ignore=shutil.ignore_patterns(SITES_DIR, "audit"))
    return copy


def site_dir(honest_run: Path, site: str) -> Path:
    """A hospital's own records (outside the forged copy)."""
    return honest_run / SITES_DIR / site


def codes(result) -> set[str]:  # type: ignore[no-untyped-def]
    return {f.code for f in result.findings if f.severity != "note"}


def privacy(run: Path) -> Path:
    return run / "privacy"


def summary(run: Path) -> dict[str, Any]:
    return json.loads((privacy(run) / "summary.json").read_text())


def write_summary(run: Path, data: dict[str, Any]) -> None:
    (privacy(run) / "summary.json").write_text(json.dumps(data, indent=2))


def recompute_summary(run: Path, site: str) -> None:
    """What a careful forger does after editing a ledger: make summary.json agree with it."""
    data = summary(run)
    path = privacy(run) / f"ledger-{site}.jsonl"
    line = {**summarize(read_ledger(path)), "chain_head": chain_head(read_raw_ledger(path))}
    rows = read_raw_ledger(path)
    line["key_fingerprint"] = rows[-1]["key_fingerprint"]
    data["sites"][site] = line
    write_summary(run, data)


def resign(entries: list[LedgerEntry], key) -> list[str]:  # type: ignore[no-untyped-def]
    rows: list[dict[str, Any]] = []
    for entry in entries:
        rows.append(sign_entry(asdict(entry), chain_head(rows), key))
    return [json.dumps(r, sort_keys=True) for r in rows]


def test_the_honest_run_passes_and_says_what_vouches_for_it(honest_run: Path) -> None:
    """Claim: an honest run audits clean, and its verdict says what it was verified against.
    Attack: none (the control for every attack below)."""
    plain = audit_directory(honest_run)
    assert plain.exit_code == EXIT_OK, plain.findings
    assert "roster, signed by all 4 sites" in plain.verdict and "NOT ANCHORED" in plain.verdict
    anchored = audit_directory(honest_run, site_dirs=[site_dir(honest_run, VICTIM)])
    assert anchored.exit_code == EXIT_OK and "NOT ANCHORED" not in anchored.verdict
    assert f"{VICTIM}'s own records" in anchored.verdict
    pinned = audit_directory(honest_run, roster_digest=plain.roster_digest)
    assert pinned.exit_code == EXIT_OK and "pinned" in pinned.verdict


def test_a_whole_site_removed_is_a_violation(run: Path) -> None:
    """Claim: no site can be made to disappear from a run.
    Attack: delete a hospital's ledger, key and summary entry (issue 14.5)."""
    (privacy(run) / f"ledger-{VICTIM}.jsonl").unlink()
    (privacy(run) / "keys" / f"{VICTIM}.pub").unlink()
    data = summary(run)
    del data["sites"][VICTIM]
    write_summary(run, data)
    result = audit_directory(run)
    assert result.exit_code == EXIT_VIOLATION and "missing_ledger" in codes(result)


def test_a_site_that_never_took_part_is_a_violation(run: Path) -> None:
    """Claim: no site can be added to a run after the fact.
    Attack: a ledger for a hospital that never took part, signed with a fresh key, with its key file
    and summary entry; then also listed on the roster (issue 14.6)."""
    key = generate_signing_key()
    entries = [replace(e, site="st-elsewhere") for e in read_ledger(privacy(run) / "ledger-cleveland.jsonl")]
    (privacy(run) / "ledger-st-elsewhere.jsonl").write_text("\n".join(resign(entries, key)) + "\n")
    save_public_key(key.public_key(), privacy(run) / "keys" / "st-elsewhere.pub")
    recompute_summary(run, "st-elsewhere")
    result = audit_directory(run)
    assert result.exit_code == EXIT_VIOLATION and "not_on_roster" in codes(result)

    signed = SignedRoster.from_json((privacy(run) / "roster.json").read_text())
    extra = replace(signed.roster.sites[0], site="st-elsewhere", ledger_key=public_key_text(key.public_key()),
                    key_fingerprint=public_key_fingerprint(key.public_key()))
    roster = replace(signed.roster, sites=(*signed.roster.sites, extra))
    forged = SignedRoster(roster, {**signed.signatures, "st-elsewhere": sign_roster(roster, key)})
    (privacy(run) / "roster.json").write_text(forged.to_json())
    result = audit_directory(run)
    assert result.exit_code == EXIT_VIOLATION and "roster_signature" in codes(result)


def test_a_truncated_ledger_cannot_pass(run: Path, honest_run: Path) -> None:
    """Claim: spend cannot be hidden by cutting a ledger's last rounds.
    Attack: drop the last round (and the closing line) of one ledger and edit summary.json to
    agree (issue 14.7). Alone the run can no longer be verified; against the hospital's own
    records the cut is a proven violation."""
    path = privacy(run) / f"ledger-{VICTIM}.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + "\n")
    recompute_summary(run, VICTIM)
    result = audit_directory(run)
    assert result.exit_code == EXIT_UNVERIFIABLE and codes(result) == {"not_closed"}
    result = audit_directory(run, site_dirs=[site_dir(honest_run, VICTIM)])
    assert result.exit_code == EXIT_VIOLATION and "truncated" in codes(result)


def test_a_ledger_resigned_with_another_key_is_a_violation(run: Path, honest_run: Path) -> None:
    """Claim: a site's ledger cannot be replaced by one that claims more noise than was used.
    Attack: double every noise multiplier, recompute every epsilon (now lower) consistently,
    re-sign the chain with a new key, replace the key file and the summary; then swap the key in
    the roster too; then forge a whole new roster with new keys for every site (issue 14.8)."""
    key = generate_signing_key()
    entries, history = [], []
    for e in read_ledger(privacy(run) / f"ledger-{VICTIM}.jsonl"):
        e = replace(e, noise_multiplier=e.noise_multiplier * 2)
        if e.steps:
            history.append((e.noise_multiplier, e.sample_rate, e.steps))
        entries.append(replace(e, epsilon=cumulative_epsilon(history, e.delta)))
    (privacy(run) / f"ledger-{VICTIM}.jsonl").write_text("\n".join(resign(entries, key)) + "\n")
    save_public_key(key.public_key(), privacy(run) / "keys" / f"{VICTIM}.pub")
    recompute_summary(run, VICTIM)
    result = audit_directory(run)
    assert result.exit_code == EXIT_VIOLATION and "tampered:wrong_key" in codes(result)

    signed = SignedRoster.from_json((privacy(run) / "roster.json").read_text())
    rekeyed = tuple(
        replace(s, ledger_key=public_key_text(key.public_key()), key_fingerprint=public_key_fingerprint(
            key.public_key())) if s.site == VICTIM else s
        for s in signed.roster.sites
    )
    roster = replace(signed.roster, sites=rekeyed)
    (privacy(run) / "roster.json").write_text(
        SignedRoster(roster, {**signed.signatures, VICTIM: sign_roster(roster, key)}).to_json())
    result = audit_directory(run)
    assert result.exit_code == EXIT_VIOLATION and "roster_signature" in codes(result)

    # The whole run forged: every site re-keyed, every ledger re-signed, a new roster signed by the
    # new keys. Self-consistent, so only something outside the run directory can expose it.
    honest_digest = signed.roster.digest
    keys = {s.site: generate_signing_key() for s in signed.roster.sites}
    keys[VICTIM] = key
    for site, site_key in keys.items():
        if site != VICTIM:
            ledger = privacy(run) / f"ledger-{site}.jsonl"
            ledger.write_text("\n".join(resign(read_ledger(ledger), site_key)) + "\n")
            save_public_key(site_key.public_key(), privacy(run) / "keys" / f"{site}.pub")
    sites = tuple(replace(s, ledger_key=public_key_text(keys[s.site].public_key()),
                          key_fingerprint=public_key_fingerprint(keys[s.site].public_key()))
                  for s in signed.roster.sites)
    fake = replace(signed.roster, sites=sites)
    for site, site_key in keys.items():  # each enrolment line names the roster it signed
        ledger = privacy(run) / f"ledger-{site}.jsonl"
        lines = [replace(e, roster=fake.digest) if e.status == "enrolled" else e for e in read_ledger(ledger)]
        ledger.write_text("\n".join(resign(lines, site_key)) + "\n")
    (privacy(run) / "roster.json").write_text(
        SignedRoster(fake, {s: sign_roster(fake, k) for s, k in keys.items()}).to_json())
    data = summary(run)
    data["roster_digest"] = fake.digest
    write_summary(run, data)
    for site in keys:
        recompute_summary(run, site)
    alone = audit_directory(run)
    assert alone.exit_code == EXIT_OK and "NOT ANCHORED" in alone.verdict  # said in the headline
    pinned = audit_directory(run, roster_digest=honest_digest)
    assert pinned.exit_code == EXIT_VIOLATION and "roster_not_pinned" in codes(pinned)
    crossed = audit_directory(run, site_dirs=[site_dir(honest_run, VICTIM)])
    assert crossed.exit_code == EXIT_VIOLATION and "key_not_the_sites" in codes(crossed)


@pytest.mark.parametrize(
    ("field", "value"),
    [("epsilon_budget", 30.0), ("status", "active"), ("key_fingerprint", "0" * 64), ("dp", False),
     ("epsilon", 0.5), ("rounds_trained", 1)],
)
def test_a_summary_that_contradicts_the_ledger_is_a_violation(run: Path, field: str, value: Any) -> None:
    """Claim: summary.json cannot say something the signed ledgers do not.
    Attack: edit one field of one site's summary line (issue 14.9)."""
    data = summary(run)
    data["sites"][VICTIM][field] = value
    write_summary(run, data)
    result = audit_directory(run)
    assert result.exit_code == EXIT_VIOLATION and codes(result) == {"summary_mismatch"}, result.findings


def test_roster_digest_must_be_the_runs(run: Path) -> None:
    """Claim: summary.json names the run's roster. Attack: point it at another roster."""
    data = summary(run)
    data["roster_digest"] = "0" * 64
    write_summary(run, data)
    result = audit_directory(run)
    assert result.exit_code == EXIT_VIOLATION and "summary_mismatch" in codes(result)


def test_the_digest_a_hospital_shows_pins_the_run(honest_run: Path, run: Path) -> None:
    """Claim: the roster digest a hospital reads from its own records (`pmfl site status`) is what
    an auditor pins; a run with another roster fails against it.
    Attack: the run's roster swapped for one re-signed with fresh keys (as in the whole-run forgery)."""
    from typer.testing import CliRunner

    from pmfl.cli import app

    status = ["site", "status", str(site_dir(honest_run, VICTIM))]
    shown = CliRunner().invoke(app, status, env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    digest = shown.output.split("signed roster ")[1].split()[0]
    assert audit_directory(honest_run, roster_digest=digest).exit_code == EXIT_OK
    signed = SignedRoster.from_json((privacy(run) / "roster.json").read_text())
    key = generate_signing_key()
    sites = tuple(replace(s, ledger_key=public_key_text(key.public_key()),
                          key_fingerprint=public_key_fingerprint(key.public_key())) if s.site == VICTIM else s
                  for s in signed.roster.sites)
    other = replace(signed.roster, sites=sites)
    forged = SignedRoster(other, {VICTIM: sign_roster(other, key)})
    (privacy(run) / "roster.json").write_text(forged.to_json())
    result = audit_directory(run, roster_digest=digest)
    assert result.exit_code == EXIT_VIOLATION and "roster_not_pinned" in codes(result)
