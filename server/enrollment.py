"""The coordinator's part of enrolment: fix the run's roster before round 1, signed by every site on it.

Two exchanges with every connected site: `declare` (each site says who it is: name, ledger key,
budget, delta) and `sign` (each site checks the roster lists it as it declared and signs the
roster's digest; it replies with its whole ledger for the study). A roster is final only when
every site on it signed it: a site that fails to sign is left out and the others sign a roster
without it, under a new run id. So the roster never lists a site that did not vouch for it, and an
auditor can treat a roster site without a ledger as records removed, never as a site that left.

A restarted coordinator (resume) keeps the run's roster: the sites sign the same roster again
(they answer with the signature they gave) and send their ledgers, from which the run's copies
are completed (`RunRecorder.reconcile_ledger`): spend a site recorded while the coordinator was
down is never lost from the run's record.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from pm_common.records.roster import (
    Roster,
    RosterEntry,
    RosterError,
    SignedRoster,
    roster_signature_valid,
    study_digest,
)
from pm_common.study.config import StudyConfig
from pm_common.wire import keys as p
from server.grid import DelegatingGrid
from server.recorder import RunRecorder

log = logging.getLogger("pmfl.server")

ROSTER_FILE = "roster.json"  # under the run's privacy/
MAX_ROSTER_TRIES = 3  # new rosters without the sites that failed to sign, before giving up


class EnrollmentError(RuntimeError):
    """No site could be enrolled: the study cannot start."""


@dataclass(frozen=True)
class EnrolledRun:
    """The run's roster with its signatures, and which node is which site."""

    signed: SignedRoster
    nodes: dict[int, str]  # node id -> site name, for the sites that (re)signed at this start

    @property
    def roster(self) -> Roster:
        return self.signed.roster


def roster_path(run_dir: Path) -> Path:
    """Where a run directory keeps the run's signed roster (privacy/roster.json).

    Its presence is what marks a run directory as holding a run, so a new run is never written over one.

    Args:
        run_dir: The run directory.

    Returns:
        The roster file's path (which need not exist).
    """
    return Path(run_dir) / "privacy" / ROSTER_FILE


def load_signed_roster(run_dir: Path) -> SignedRoster | None:
    """The run's roster, if the run has one (a resumed run); None for a new run.

    Args:
        run_dir: The run directory.

    Returns:
        The signed roster, or None when the run directory holds none.
    """
    path = roster_path(run_dir)
    if not path.exists():
        return None
    return SignedRoster.from_json(path.read_text(encoding="utf-8"))


def enroll_sites(
    grid: Grid,
    study: StudyConfig,
    study_text: str,
    recorder: RunRecorder,
    attempt: int,
    timeout: float,
) -> EnrolledRun:
    """Enrol the connected sites in the run (a new roster, or the run's own when resuming).

    Args:
        grid: the coordinator's grid.
        study: the study.
        study_text: the study as the sites receive it (the roster carries its digest).
        recorder: the run directory's recorder (failures, ledgers, keys).
        attempt: the coordinator's attempt at the run (0, then one more per restart).
        timeout: seconds to wait for the sites' replies.

    Returns:
        The signed roster and the node of each site that signed at this start.

    Raises:
        EnrollmentError: no site enrolled.
    """
    existing = load_signed_roster(recorder.run_dir)
    nodes = sorted(grid.get_node_ids())
    if existing is not None:
        run = existing.roster.run
        declared = _declare(grid, nodes, study, study_text, run, attempt, recorder, timeout)
        listed = {n: e for n, e in declared.items() if existing.roster.entry(e.site) is not None}
        for node in sorted(set(declared) - set(listed)):
            recorder.record_failure(0, f"enrolment: node {node} ({declared[node].site}) is not on the "
                                    "run's roster: it joined after round 1 and takes no part")
        signed, ledgers = _sign(grid, listed, existing.roster, study, study_text, attempt, recorder, timeout)
        merged = SignedRoster(existing.roster, {**existing.signatures, **signed})
        return _finish(merged, listed, signed, ledgers, recorder)

    run = secrets.token_hex(16)
    declared = _declare(grid, nodes, study, study_text, run, attempt, recorder, timeout)
    for _ in range(MAX_ROSTER_TRIES):
        if not declared:
            break
        roster = Roster(
            study=study.name,
            run=run,
            rounds=study.rounds,
            study_digest=study_digest(study_text),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            sites=tuple(sorted(declared.values(), key=lambda e: e.site)),
        )
        signed, ledgers = _sign(grid, declared, roster, study, study_text, attempt, recorder, timeout)
        if len(signed) == len(declared):
            return _finish(SignedRoster(roster, signed), declared, signed, ledgers, recorder)
        declared = {n: e for n, e in declared.items() if e.site in signed}
        run = secrets.token_hex(16)  # a site keeps one roster per run id: the smaller roster is a new run
    raise EnrollmentError("no site enrolled in the study: see the failures recorded for round 0")


def _finish(
    signed: SignedRoster,
    nodes: Mapping[int, RosterEntry],
    fresh: Mapping[str, str],
    ledgers: Mapping[str, list[str]],
    recorder: RunRecorder,
) -> EnrolledRun:
    recorder.record_roster(signed)
    for site, lines in ledgers.items():
        recorder.reconcile_ledger(site, lines)
    log.info("run %s: %d site(s) on the roster (digest %s); %d signed at this start",
             signed.roster.run[:12], len(signed.roster.sites), signed.roster.digest[:16], len(fresh))
    return EnrolledRun(signed, {n: e.site for n, e in nodes.items() if e.site in fresh})


def _request(node: int, study: StudyConfig, study_text: str, run: str, attempt: int,
             stage: str, **extra: str) -> Message:
    config = ConfigRecord({
        p.STAGE: stage,
        p.RUN: run,
        p.ATTEMPT: attempt,
        p.STUDY_TOML: study_text,
        p.NUM_ROUNDS: study.rounds,
        **extra,
    })
    return Message(RecordDict({p.CONFIG: config}), dst_node_id=node, message_type=p.ENROLL_MESSAGE)


def _exchange(grid: Grid, messages: list[Message], stage: str, recorder: RunRecorder,
              timeout: float) -> Iterable[tuple[int, ConfigRecord]]:
    """Send one enrolment stage; the replies of the sites that answered it (failures recorded)."""
    if not messages:
        return []
    sent_to = {}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for message in messages:
        sent_to[message.metadata.message_id] = message.metadata.dst_node_id
    answered = []
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            recorder.record_failure(0, f"enrolment ({stage}): node {node}: {reply.error.reason}")
            continue
        record = reply.content.config_records.get(p.ENROLL)
        if record is None:
            recorder.record_failure(0, f"enrolment ({stage}): node {node} sent no enrolment record")
            continue
        answered.append((node, record))
    return answered


def _declare(grid: Grid, nodes: list[int], study: StudyConfig, study_text: str, run: str,
             attempt: int, recorder: RunRecorder, timeout: float) -> dict[int, RosterEntry]:
    messages = [_request(n, study, study_text, run, attempt, p.DECLARE) for n in nodes]
    declared: dict[int, RosterEntry] = {}
    for node, record in _exchange(grid, messages, p.DECLARE, recorder, timeout):
        try:
            entry = RosterEntry.from_dict(json.loads(str(record[p.ROSTER_ENTRY])))
            entry.public_key()
        except (RosterError, ValueError, KeyError, TypeError) as exc:
            recorder.record_failure(0, f"enrolment (declare): node {node}: unreadable roster entry: {exc}")
            continue
        if any(e.site == entry.site for e in declared.values()):
            recorder.record_failure(0, f"enrolment (declare): node {node} declares site {entry.site!r}, "
                                    "which another node already declared; left out")
            continue
        declared[node] = entry
    return declared


def _sign(grid: Grid, nodes: Mapping[int, RosterEntry], roster: Roster, study: StudyConfig,
          study_text: str, attempt: int, recorder: RunRecorder,
          timeout: float) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The sign stage: valid signatures by site, and each signer's ledger lines."""
    text = json.dumps(roster.to_dict())
    messages = [
        _request(n, study, study_text, roster.run, attempt, p.SIGN, **{p.ROSTER: text}) for n in nodes
    ]
    signatures: dict[str, str] = {}
    ledgers: dict[str, list[str]] = {}
    for node, record in _exchange(grid, messages, p.SIGN, recorder, timeout):
        site = nodes[node].site
        signature = str(record.get(p.ROSTER_SIGNATURE, ""))
        if not roster_signature_valid(roster, site, signature):
            recorder.record_failure(0, f"enrolment (sign): {site}'s signature of the roster does not verify")
            continue
        signatures[site] = signature
        ledgers[site] = [str(line) for line in record.get(p.LEDGER_LINES, [])]
    return signatures, ledgers


class EnrolledGrid(DelegatingGrid):
    """The coordinator's grid as the study's strategy sees it: only the nodes of sites on the roster.

    Why: a node that is connected but not on the roster (a site that refused the study, an app it
    did not approve, a node that joined after round 1) would refuse every round; sampling it only
    fills the run's record with failures and, for a strategy that waits for a number of replies,
    stalls rounds.
    """

    def __init__(self, inner: Grid, nodes: Iterable[int]) -> None:
        super().__init__(inner)
        self.nodes = set(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.inner.get_node_ids() if n in self.nodes]
