"""The per-site privacy ledger: one JSON line per event, read by auditors' own scripts.

The field names are a contract. `epsilon` is cumulative: the site's whole history composed,
after this line. (noise_multiplier, sample_rate, steps) are this line's mechanism alone, so an
auditor can recompute every cumulative epsilon from the lines themselves.

A site keeps one ledger per study; one study can run more than once (a resubmission), so every
line names its run (`run`: the id of the run's roster, pm_common/records/roster.py) and the coordinator's
attempt at it (`attempt`: 0, then one more for each restart of a crashed coordinator). A run's
lines open with `enrolled` (the site signed the run's roster, whose digest the line carries) and
end with `closed` (the site's last word for the run: nothing after it belongs to that run); in
between, one `trained` or `declined` line per round the site answered, and (with
`[personalization]`) the site's personal training: a `trained` line of `phase` "personal", the
same mechanism fields, so an auditor composes it with the rest unchanged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TRAINED = "trained"
DECLINED = "declined"
ENROLLED = "enrolled"  # the site signed the run's roster; no mechanism ran
CLOSED = "closed"  # the site's last line for the run; no mechanism ran
ROUND_STATUSES = (TRAINED, DECLINED)
PERSONAL = "personal"  # `phase` of a line that trained the site's personal model (never sent)

# Site status in privacy/summary.json.
ACTIVE = "active"
EXHAUSTED = "budget exhausted"
STATUS_DECLINED = "declined"
NO_DP = "no differential privacy"

NO_GUARANTEE = "NO PRIVACY GUARANTEE: this site trained without differential privacy (--no-dp)"


@dataclass(frozen=True)
class LedgerEntry:
    """One round at one site, as the site recorded it."""

    site: str
    round: int
    status: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    epsilon: float | None  # cumulative after this round; None when the site ran without DP
    epsilon_budget: float | None
    accountant: str
    dp: bool = True
    reason: str = ""
    timestamp: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    run: str = ""  # the run's roster id ("" in ledgers written before runs were named)
    attempt: int = 0  # the coordinator's attempt at the run: one more after each restart
    roster: str = ""  # on `enrolled` lines: the digest of the roster the site signed
    phase: str = ""  # "personal": DP-SGD of the site's personal model after the federation's rounds

    def to_json(self) -> str:
        data = asdict(self)
        if not self.phase:  # federated lines keep the format they always had
            del data["phase"]
        return json.dumps(data, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerEntry:
        missing = [
            k
            for k in (
                "site",
                "round",
                "noise_multiplier",
                "sample_rate",
                "steps",
                "max_grad_norm",
                "delta",
                "epsilon",
                "accountant",
            )
            if k not in data
        ]
        if missing:
            raise ValueError(f"ledger entry lacks required fields {missing}: {data}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known.setdefault("status", TRAINED if data["steps"] else DECLINED)
        if not isinstance(known.get("run", ""), str) or not isinstance(known.get("attempt", 0), int):
            raise ValueError(f"ledger entry has a malformed run or attempt: {data}")
        known.setdefault("epsilon_budget", None)
        return cls(**known)

    @classmethod
    def from_json(cls, line: str) -> LedgerEntry:
        return cls.from_dict(json.loads(line))


def ledger_path(privacy_dir: Path, site: str) -> Path:
    """Where a site's ledger lives in a privacy directory.

    One file per site, named after the site, so that every writer and every auditor script finds the
    same ledger without having to agree on anything but the site's name.

    Args:
        privacy_dir: The privacy directory holding the ledgers.
        site: The site's name.

    Returns:
        The path of the site's `ledger-<site>.jsonl` file (which need not exist yet).
    """
    return privacy_dir / f"ledger-{site}.jsonl"


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync: a ledger line, once written, survives a crash.

    Args:
        path: The ledger file; it and its parent directory are created when missing.
        line: The line to append; a trailing newline is added when it lacks one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_ledger(path: Path) -> list[LedgerEntry]:
    """Read a ledger file into its entries, in the order they were written.

    Fails loudly on a line that does not parse, naming the file and line, rather than skipping it:
    a ledger with a damaged line must not be mistaken for a shorter, clean one.

    Args:
        path: The ledger file (JSON lines); blank lines are ignored.

    Returns:
        The ledger's entries, oldest first.

    Raises:
        ValueError: When a non-blank line is not a valid ledger entry.
    """
    entries = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                entries.append(LedgerEntry.from_json(line))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a valid ledger entry: {exc}") from exc
    return entries


def round_entries(entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """The lines that answer a round (trained or declined), without enrolments and closings.

    Args:
        entries: A site's ledger entries.

    Returns:
        The `trained` and `declined` entries, in their original order.
    """
    return [e for e in entries if e.status in ROUND_STATUSES]


def next_round_fits(entries: Iterable[LedgerEntry]) -> bool | None:
    """Whether one more round of the site's own plan keeps it within its budget.

    The plan is the mechanism of the site's last trained round, judged by the figure the site reports.
    Follows from the ledger alone, so an auditor can recompute it.

    Args:
        entries: A site's ledger entries, oldest first.

    Returns:
        True when one more such round stays within the site's epsilon budget, False when it would
        exceed it, and None when there is nothing to judge (no DP, no budget, nothing trained yet, or an
        accountant this version does not know).
    """
    from pm_common.privacy.accountant import (
        cumulative_epsilon,  # accounting maths, only when judging a budget
    )

    entries = list(entries)
    trained = [e for e in entries if e.status == TRAINED and e.steps > 0]
    if not trained or not entries[-1].dp or entries[-1].epsilon_budget is None:
        return None
    last = trained[-1]
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.steps > 0]
    try:
        after = cumulative_epsilon([*history, (last.noise_multiplier, last.sample_rate, last.steps)],
                                   last.delta, last.accountant)
    except ValueError:  # an accountant this version does not know: nothing to judge by
        return None
    return after <= entries[-1].epsilon_budget


def site_status(entries: Iterable[LedgerEntry]) -> str:
    """Summary status of a site from its ledger: whether it declined, ran out of budget or goes on.

    Args:
        entries: A site's ledger entries, oldest first.

    Returns:
        One of ACTIVE, NO_DP, EXHAUSTED or STATUS_DECLINED: EXHAUSTED when the site declined for its
        budget or when one more round of its plan would not fit.
    """
    entries = list(entries)
    fits = next_round_fits(entries)
    entries = round_entries(entries)
    if not entries:
        return ACTIVE
    if not entries[-1].dp:
        return NO_DP
    if entries[-1].status == DECLINED:
        reason = entries[-1].reason
        return EXHAUSTED if "budget" in reason and "too low" not in reason else STATUS_DECLINED
    if fits is False:
        return EXHAUSTED
    return ACTIVE


def summarize(entries: list[LedgerEntry]) -> dict[str, Any]:
    """One site's line in privacy/summary.json.

    Everything in it follows from the ledger alone, so an auditor can recompute it.

    Args:
        entries: A site's ledger entries, oldest first; must not be empty.

    Returns:
        The summary: the site's cumulative epsilon, delta, budget and accountant, counts of rounds
        trained and declined, total steps, status and whether it used DP; plus a warning when it did
        not, `within_budget` when both epsilon and budget are known, and the reason when its last
        round was declined.
    """
    last = entries[-1]
    rounds = round_entries(entries)
    last_round = rounds[-1] if rounds else last
    summary: dict[str, Any] = {
        "site": last.site,
        "epsilon": last.epsilon,
        "delta": last.delta,
        "epsilon_budget": last.epsilon_budget,
        "accountant": last.accountant,
        "rounds_trained": sum(1 for e in entries if e.status == TRAINED and e.phase != PERSONAL),
        "rounds_declined": sum(1 for e in entries if e.status == DECLINED),
        "steps": sum(e.steps for e in entries),
        "status": site_status(entries),
        "dp": last.dp,
    }
    personal = sum(e.steps for e in entries if e.phase == PERSONAL)
    if personal:
        summary["personal_steps"] = personal  # included in `steps` and in `epsilon`
    if not last.dp:
        summary["warning"] = NO_GUARANTEE
    elif last.epsilon is not None and last.epsilon_budget is not None:
        summary["within_budget"] = last.epsilon <= last.epsilon_budget + 1e-9
    if last_round.status == DECLINED:
        summary["reason"] = last_round.reason
    return summary


def finite_or_none(value: float | None) -> float | None:
    """A number fit for JSON: infinities and NaN become None.

    JSON has no infinity or NaN, and an epsilon can be infinite (e.g. no noise); None keeps the file
    readable by any JSON parser.

    Args:
        value: The number, or None.

    Returns:
        The value when it is finite, otherwise None.
    """
    return value if value is not None and math.isfinite(value) else None
