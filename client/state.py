"""Where a site keeps its privacy state between rounds: the plan, the accountant and the ledger.

Two stores, one contract. In simulation the state lives in Flower's per-node `Context.state`;
a deployed site keeps it in its own directory, written atomically so that a crash or restart
never loses a step that ran. Spend is saved before the update is sent: if anything fails after
training, the site has over-counted, never under-counted.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from flwr.app import ConfigRecord, RecordDict

from pm_common.ledger import append_line
from pm_common.privacy import PrivacyPlan
from pm_common.signing import generate_signing_key, load_or_create_signing_key, private_key_pem


@dataclass
class SiteState:
    """Everything a site must remember to keep its cumulative epsilon honest."""

    study: str
    plan: PrivacyPlan | None = None
    accountant: dict[str, Any] = field(default_factory=dict)  # Opacus accountant.state_dict()
    rounds: list[int] = field(default_factory=list)  # server rounds answered (trained or declined)
    ledger: list[str] = field(default_factory=list)  # ledger lines, as sent

    def to_json(self) -> str:
        return json.dumps(
            {
                "study": self.study,
                "plan": self.plan.to_dict() if self.plan else None,
                "accountant": self.accountant,
                "rounds": self.rounds,
                "ledger": self.ledger,
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
        )

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self.accountant.get("history", [])]  # type: ignore[misc]


class StateStore(Protocol):
    def load(self) -> SiteState | None: ...

    def save(self, state: SiteState) -> None: ...

    def signing_key(self) -> Ed25519PrivateKey:
        """The site's Ed25519 ledger key: created once, the same for every line it signs."""
        ...


class ContextStateStore:
    """Simulation: the state rides in Flower's Context.state, which persists per node across rounds."""

    KEY = "pmfl-site-state"

    def __init__(self, context_state: RecordDict) -> None:
        self._state = context_state

    def load(self) -> SiteState | None:
        record = self._state.config_records.get(self.KEY)
        return SiteState.from_json(str(record["json"])) if record else None

    def save(self, state: SiteState) -> None:
        self._state[self.KEY] = ConfigRecord({"json": state.to_json()})

    def signing_key(self) -> Ed25519PrivateKey:
        record = self._state.config_records.get("pmfl-ledger-key")
        if record is None:
            record = ConfigRecord({"pem": private_key_pem(generate_signing_key()).decode()})
            self._state["pmfl-ledger-key"] = record
        key = load_pem_private_key(str(record["pem"]).encode(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key


class DirectoryStateStore:
    """Deployment: `state.json` (atomic replace) and `ledger.jsonl` (append + fsync) in the site dir;
    the ledger key in `key_dir` (`ledger_ed25519.pem`, never sent, and `ledger_ed25519.pub`)."""

    def __init__(self, directory: Path, key_dir: Path) -> None:
        self.directory = Path(directory)
        self.key_dir = Path(key_dir)
        self.state_path = self.directory / "state.json"
        self.ledger_path = self.directory / "ledger.jsonl"

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

    def signing_key(self) -> Ed25519PrivateKey:
        pem, pub = self.key_dir / "ledger_ed25519.pem", self.key_dir / "ledger_ed25519.pub"
        return load_or_create_signing_key(pem, pub)
