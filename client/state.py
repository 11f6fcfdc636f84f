"""Where a site keeps its privacy state between rounds: the plan, the accountant and the ledger.

Every site, simulated or deployed, keeps it in a directory of its own, written atomically so that a
crash or restart never loses a step that ran. Spend is saved before the update is sent: if anything
fails after training, the site has over-counted, never under-counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pm_common.privacy.accountant import PrivacyPlan
from pm_common.records.ledger import CLOSED, ENROLLED, ROUND_STATUSES, LedgerEntry, append_line
from pm_common.records.signing import load_or_create_signing_key
from pm_common.study.config import PrivacySettings


@dataclass
class SiteState:
    """Everything a site must remember to keep its cumulative epsilon honest."""

    study: str
    plan: PrivacyPlan | None = None
    accountant: dict[str, Any] = field(default_factory=dict)  # Opacus accountant.state_dict()
    rounds: list[int] = field(default_factory=list)  # server rounds answered (trained or declined)
    ledger: list[str] = field(default_factory=list)  # ledger lines, as sent
    rosters: dict[str, dict[str, Any]] = field(default_factory=dict)  # run -> {"roster", "signature"}

    def to_json(self) -> str:
        return json.dumps(
            {
                "study": self.study,
                "plan": self.plan.to_dict() if self.plan else None,
                "accountant": self.accountant,
                "rounds": self.rounds,
                "ledger": self.ledger,
                "rosters": self.rosters,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SiteState:
        data = json.loads(text)
        plan = PrivacyPlan.from_dict(data["plan"]) if data.get("plan") else None
        return cls(
            data["study"],
            plan,
            data.get("accountant", {}),
            data.get("rounds", []),
            data.get("ledger", []),
            data.get("rosters", {}),
        )

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self.accountant.get("history", [])]  # type: ignore[misc]

    def entries(self) -> list[LedgerEntry]:
        """The site's ledger lines for this study, parsed (signature fields aside)."""
        return [LedgerEntry.from_json(line) for line in self.ledger]

    def refusal(self, run: str, server_round: int, attempt: int) -> str:
        """Why this site will not answer round `server_round` of `run`'s attempt `attempt` ('' if
        it will): it never enrolled in the run, the run is closed here, or it answered already.

        Answering the same round of the same attempt twice would spend the budget twice for one
        aggregate; a coordinator that really re-runs a round after a crash asks under a new attempt.
        """
        if run not in self.rosters:
            return f"this site is not enrolled in run {run[:12]} of study {self.study!r}"
        for entry in self.entries():
            if entry.run != run:
                continue
            if entry.status == CLOSED:
                return f"run {run[:12]} of study {self.study!r} is closed at this site"
            if entry.status in ROUND_STATUSES and (entry.round, entry.attempt) == (server_round, attempt):
                return (
                    f"round {server_round} of run {run[:12]} (attempt {attempt}) was already answered "
                    "by this site: a repeated request is refused, never trained twice"
                )
        return ""

    def closed(self, run: str) -> bool:
        return any(e.run == run and e.status == CLOSED for e in self.entries())

    def enrolled_line(self, run: str) -> bool:
        return any(e.run == run and e.status == ENROLLED for e in self.entries())


def site_entry(privacy: PrivacySettings, site: str, plan: PrivacyPlan | None, **fields: Any) -> LedgerEntry:
    """A ledger line of this site under its plan: the mechanism's parameters (none without DP), its
    budget, δ and accountant filled in one place, so no line can state them differently.

    Args:
        privacy: the site's privacy settings.
        site: the site's name.
        plan: its DP plan (None without DP, or before one is fixed).
        **fields: the line's own fields (round, status, steps, epsilon, reason, run, attempt, ...).

    Returns:
        The entry, not yet signed.
    """
    mechanism = {"noise_multiplier": plan.noise_multiplier if plan else 0.0,
                 "sample_rate": plan.sample_rate if plan else 0.0,
                 "max_grad_norm": plan.max_grad_norm if plan else 0.0}
    defaults = {"steps": 0, "epsilon": None}
    return LedgerEntry(
        site=site,
        delta=privacy.delta,
        epsilon_budget=privacy.epsilon if privacy.dp else None,
        accountant=privacy.accountant if privacy.dp else "none",
        dp=privacy.dp,
        **{**mechanism, **defaults, **fields},
    )


class StateStore(Protocol):
    def load(self) -> SiteState | None: ...

    def save(self, state: SiteState) -> None: ...

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the site's state for one read-modify-write: two tasks of a deployed site (a
        restarted coordinator's and a stale one's) must not both load, spend and save."""
        ...

    def signing_key(self) -> Ed25519PrivateKey:
        """The site's Ed25519 ledger key: created once, the same for every line it signs."""
        ...

    def personal_model_path(self, run: str) -> Path:
        """Where the site keeps its personal model of `run` (in its own directory, never sent)."""
        ...


class DirectoryStateStore:
    """A site directory (deployed, and simulated sites too): `state.json` (atomic replace),
    `ledger.jsonl` (append + fsync) and `rosters/<run>.json` (the site's signed copy of each run's
    roster) in `directory`; the ledger key in `key_dir` (`ledger_ed25519.pem`, never sent, and
    `ledger_ed25519.pub`). These copies are the hospital's own record, against which an auditor
    can check a run directory (`pmfl audit RUN --site SITE_DIR`)."""

    def __init__(self, directory: Path, key_dir: Path) -> None:
        self.directory = Path(directory)
        self.key_dir = Path(key_dir)
        self.state_path = self.directory / "state.json"
        self.ledger_path = self.directory / "ledger.jsonl"
        self.roster_dir = self.directory / "rosters"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def load(self) -> SiteState | None:
        if not self.state_path.exists():
            return None
        return SiteState.from_json(self.state_path.read_text(encoding="utf-8"))

    def save(self, state: SiteState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".state-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(state.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)
        # The state file is the truth; the ledger file catches up with it (idempotent on retry).
        written = 0
        if self.ledger_path.exists():
            written = sum(1 for line in self.ledger_path.open(encoding="utf-8") if line.strip())
        for line in state.ledger[written:]:
            append_line(self.ledger_path, line)
        for run, signed in state.rosters.items():
            path = self.roster_dir / f"{run}.json"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(signed, indent=2, sort_keys=True), encoding="utf-8")

    def personal_model_path(self, run: str) -> Path:
        return self.directory / "personal" / f"{run}.pt"

    def signing_key(self) -> Ed25519PrivateKey:
        pem, pub = self.key_dir / "ledger_ed25519.pem", self.key_dir / "ledger_ed25519.pub"
        return load_or_create_signing_key(pem, pub)
