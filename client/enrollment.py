"""A site's enrolment in a run: it declares who it is, then signs the run's roster.

Why the site checks before it signs: its signature vouches, to any auditor, that this roster is the
run it took part in, with its own key, budget and delta. So it signs only a roster that lists it
exactly as it declared itself, for the study it received, and at most one roster per run: a
coordinator that comes back with another roster under the same run id is refused. Signing appends
the run's `enrolled` line to the site's ledger, so the ledger shows the run from its first line.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord

from client.state import SiteState, StateStore, site_entry
from pm_common.privacy.accountant import cumulative_epsilon
from pm_common.records.ledger import ENROLLED, LedgerEntry
from pm_common.records.roster import Roster, RosterEntry, RosterError, sign_roster, study_digest
from pm_common.records.signing import chain_head, public_key_fingerprint, public_key_text, sign_entry
from pm_common.study.config import SiteSpec
from pm_common.wire import keys as p

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class SiteRefusal(RuntimeError):
    """The site refuses a request of the coordinator. The message names the request and the rule
    it breaks, never the site's data: it is what the coordinator records."""


def declared_entry(site: SiteSpec, key: Ed25519PrivateKey) -> RosterEntry:
    """The roster entry this site declares: its name, its ledger key and its own budget.

    Args:
        site: the site's settings (the hospital's, never the coordinator's).
        key: the site's ledger key.

    Returns:
        What the site expects to find about itself on the run's roster.
    """
    privacy = site.privacy
    public = key.public_key()
    return RosterEntry(
        site=site.name,
        ledger_key=public_key_text(public),
        key_fingerprint=public_key_fingerprint(public),
        dp=privacy.dp,
        epsilon_budget=privacy.epsilon if privacy.dp else None,
        delta=privacy.delta,
        accountant=privacy.accountant if privacy.dp else "none",
        max_rounds=privacy.max_rounds,
    )


def check_run_id(run: str) -> None:
    """Refuse a run id that is not 128 random bits in hex (it names files at the site).

    Raises:
        SiteRefusal: the id is malformed.
    """
    if not _RUN_ID.match(run):
        raise SiteRefusal(f"malformed run id {run[:40]!r}: expected 32 hex digits")


def roster_problem(roster: Roster, declared: RosterEntry, run: str, study_name: str,
                   study_text: str, rounds: int) -> str:
    """Why this site must not sign `roster` ('' when it may).

    Args:
        roster: the roster the coordinator asks the site to sign.
        declared: the site's own entry, as it declared it.
        run: the run id of the request.
        study_name: the study the site received.
        study_text: the study text the site received (its digest must be the roster's).
        rounds: the rounds the coordinator announced.

    Returns:
        A one-line reason, or '' when the roster is what the site agreed to.
    """
    if roster.run != run:
        return f"the roster is for run {roster.run[:12]}, the request for run {run[:12]}"
    if roster.study != study_name or roster.study_digest != study_digest(study_text):
        return "the roster names another study, or other study settings, than the site received"
    if roster.rounds != rounds:
        return f"the roster plans {roster.rounds} rounds, the request {rounds}"
    own = roster.entry(declared.site)
    if own is None:
        return f"the roster does not list site {declared.site!r}"
    if own != declared:
        differs = [k for k in declared.__dataclass_fields__ if getattr(own, k) != getattr(declared, k)]
        return f"the roster's entry for {declared.site!r} differs from what the site declared: {differs}"
    return ""


def sign(store: StateStore, site: SiteSpec, request: ConfigRecord, study_name: str,
         study_text: str) -> ConfigRecord:
    """Sign the run's roster once, append the `enrolled` line, and reply with the site's ledger.

    A repeated request for the same roster (a restarted coordinator resuming the run) gets the same
    signature back and appends nothing; a different roster under the same run id is refused.

    Raises:
        SiteRefusal: the roster is not one this site may sign.
    """
    run = str(request[p.RUN])
    check_run_id(run)
    try:
        roster = Roster.from_json(str(request[p.ROSTER]))
    except RosterError as exc:
        raise SiteRefusal(f"unreadable roster: {exc}") from None
    key = store.signing_key()
    declared = declared_entry(site, key)
    if problem := roster_problem(roster, declared, run, study_name, study_text, int(request[p.NUM_ROUNDS])):
        raise SiteRefusal(f"site {site.name!r} refuses to sign the roster of run {run[:12]}: {problem}")
    with store.locked():
        state = store.load() or SiteState(study=study_name)
        earlier = state.rosters.get(run)
        if earlier is not None and Roster.from_dict(earlier["roster"]).digest != roster.digest:
            raise SiteRefusal(
                f"site {site.name!r} already signed another roster for run {run[:12]}: a run has one roster"
            )
        if earlier is None:
            signature = sign_roster(roster, key)
            state.rosters[run] = {"roster": roster.to_dict(), "signature": signature}
            append_signed_line(state, key, _enrolled_entry(site, state, run, roster.digest))
            store.save(state)
        signature = str(state.rosters[run]["signature"])
    return ConfigRecord({
        p.SITE_NAME: site.name,
        p.ROSTER_SIGNATURE: signature,
        p.LEDGER_LINES: list(state.ledger),
    })


def declare(store: StateStore, site: SiteSpec, run: str) -> ConfigRecord:
    """The site's answer to the first enrolment stage: its roster entry, as JSON.

    Raises:
        SiteRefusal: the run id is malformed.
    """
    check_run_id(run)
    entry = declared_entry(site, store.signing_key())
    return ConfigRecord({p.SITE_NAME: site.name, p.ROSTER_ENTRY: json.dumps(asdict(entry))})


def _enrolled_entry(site: SiteSpec, state: SiteState, run: str, digest: str) -> LedgerEntry:
    privacy = site.privacy
    return site_entry(
        privacy, site.name, state.plan,
        round=0,
        status=ENROLLED,
        epsilon=cumulative_epsilon(state.history, privacy.delta, privacy.accountant) if privacy.dp else None,
        reason=f"signed the roster of run {run[:12]}",
        run=run,
        roster=digest,
    )


def append_signed_line(state: SiteState, key: Ed25519PrivateKey, entry: LedgerEntry) -> str:
    """Sign `entry` onto the site's hash chain in `state` (the caller saves the state).

    Returns:
        The signed line, as the site stores and sends it.
    """
    signed = sign_entry(asdict(entry), chain_head([json.loads(line) for line in state.ledger]), key)
    line = json.dumps(signed, sort_keys=True, allow_nan=False)
    state.ledger.append(line)
    return line
