"""The study roster: who takes part in one run of a study, with which ledger key and budget.

Why: an auditor used to trust whatever the run directory held. Whoever can write that directory
(the coordinator, or anyone with its files) could remove a whole site, add one that never took
part, or re-sign a site's ledger with a key of their own, and the audit passed. The roster is
fixed before round 1 and every site signs it with its ledger key, so none of that can be done
without the sites' private keys:

- every site on the roster must have a ledger in the run, verified with the key the roster names;
- a ledger of a site that is not on the roster is foreign to the run;
- changing the roster (a site, a key, a budget) invalidates every site's signature of it.

Each site keeps its own signed copy (`SITE/state/<study>/rosters/<run>.json`), so an auditor can
cross-check a run against a hospital's own records, or pin the roster's digest given out of band.
What the roster cannot vouch for on its own is that its keys are the sites' real keys: a forger who
replaces every key and re-signs everything produces a consistent fake, which only such an anchor
outside the run directory exposes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pm_common.records.signing import (
    public_key_fingerprint,
    public_key_from_text,
    sign_statement,
    statement_valid,
)

ROSTER_DOMAIN = b"pmfl-roster-v1\n"
"""Domain tag of a site's signature over a roster's digest."""

RUN_ID_HEX = 32
"""A run id is 128 random bits, hex: chosen by the coordinator when a run starts."""


class RosterError(ValueError):
    """A roster is malformed, or does not say what a site declared."""


@dataclass(frozen=True)
class RosterEntry:
    """One site of a run, as the site itself declared it before round 1."""

    site: str
    ledger_key: str  # base64 of the raw Ed25519 key that signs the site's ledger
    key_fingerprint: str  # SHA-256 (hex) of that key (pm_common.records.signing.public_key_fingerprint)
    dp: bool
    epsilon_budget: float | None  # None: the site trains without DP
    delta: float
    accountant: str
    max_rounds: int | None

    def public_key(self) -> Ed25519PublicKey:
        """The site's ledger key.

        Raises:
            RosterError: the entry's key is not an Ed25519 key, or not the one its fingerprint names.
        """
        try:
            key = public_key_from_text(self.ledger_key)
        except ValueError as exc:
            raise RosterError(f"roster entry {self.site!r}: {exc}") from None
        if public_key_fingerprint(key) != self.key_fingerprint:
            raise RosterError(f"roster entry {self.site!r}: the key does not match its fingerprint")
        return key

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RosterEntry:
        """An entry from its JSON form; RosterError when a field is missing or of the wrong type."""
        _exact_keys(data, cls.__dataclass_fields__, "roster entry")
        entry = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        checks = {
            "site": isinstance(entry.site, str) and bool(entry.site),
            "ledger_key": isinstance(entry.ledger_key, str),
            "key_fingerprint": isinstance(entry.key_fingerprint, str),
            "dp": isinstance(entry.dp, bool),
            "epsilon_budget": entry.epsilon_budget is None or _finite(entry.epsilon_budget),
            "delta": _finite(entry.delta),
            "accountant": isinstance(entry.accountant, str),
            "max_rounds": entry.max_rounds is None
            or (isinstance(entry.max_rounds, int) and not isinstance(entry.max_rounds, bool)),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise RosterError(f"roster entry {data.get('site')!r}: malformed {bad}")
        return entry


@dataclass(frozen=True)
class Roster:
    """One run of a study: its id, the study it runs (by digest) and the sites taking part."""

    study: str
    run: str
    rounds: int
    study_digest: str  # SHA-256 of the study text the sites received (contract, model, training)
    created: str
    sites: tuple[RosterEntry, ...]

    def __post_init__(self) -> None:
        names = [e.site for e in self.sites]
        if len(set(names)) != len(names):
            raise RosterError(f"roster names a site twice: {names}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sites": [asdict(e) for e in self.sites]}

    def canonical_bytes(self) -> bytes:
        """Sorted-key compact JSON: the bytes every site signs (through `digest`)."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical roster: what sites sign, and what an auditor can pin."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def entry(self, site: str) -> RosterEntry | None:
        return next((e for e in self.sites if e.site == site), None)

    @property
    def site_names(self) -> list[str]:
        return [e.site for e in self.sites]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Roster:
        """A roster from its JSON form; RosterError when it is malformed."""
        if not isinstance(data, Mapping):
            raise RosterError("a roster must be a JSON object")
        _exact_keys(data, cls.__dataclass_fields__, "roster")
        sites = data["sites"]
        if not isinstance(sites, list) or not all(isinstance(s, Mapping) for s in sites):
            raise RosterError("roster: 'sites' must be a list of objects")
        scalars = {"study": str, "run": str, "study_digest": str, "created": str}
        bad = [k for k, kind in scalars.items() if not isinstance(data[k], kind)]
        if not isinstance(data["rounds"], int) or isinstance(data["rounds"], bool):
            bad.append("rounds")
        if bad:
            raise RosterError(f"roster: malformed {bad}")
        return cls(
            study=data["study"],
            run=data["run"],
            rounds=data["rounds"],
            study_digest=data["study_digest"],
            created=data["created"],
            sites=tuple(RosterEntry.from_dict(s) for s in sites),
        )

    @classmethod
    def from_json(cls, text: str) -> Roster:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise RosterError(f"roster: not JSON ({exc})") from None


def study_digest(study_text: str) -> str:
    """SHA-256 (hex) of the study text sent to the sites: binds a roster to the settings they ran.

    Args:
        study_text: The study file's text, exactly as sent to the sites.

    Returns:
        The digest, 64 hex digits.
    """
    return hashlib.sha256(study_text.encode("utf-8")).hexdigest()


def sign_roster(roster: Roster, key: Ed25519PrivateKey) -> str:
    """A site's signature (base64) over the roster's digest.

    Signing the digest (which covers every site, key and budget) means any change to the roster
    invalidates the signature.

    Args:
        roster: The run's roster.
        key: The site's ledger key.

    Returns:
        The Ed25519 signature, base64, under the roster domain tag.
    """
    return sign_statement(key, ROSTER_DOMAIN, bytes.fromhex(roster.digest))


def roster_signature_valid(roster: Roster, site: str, signature: str) -> bool:
    """Whether `signature` is `site`'s signature of `roster`, by the key the roster names for it.

    Never raises: a site not on the roster, an unreadable key or a malformed signature all count as
    an invalid signature.

    Args:
        roster: The run's roster.
        site: The site whose signature it claims to be.
        signature: The signature, base64.

    Returns:
        True when the signature verifies with the roster's key for `site`, False otherwise.
    """
    entry = roster.entry(site)
    if entry is None or not isinstance(signature, str):
        return False
    try:
        key = entry.public_key()
    except RosterError:
        return False
    return statement_valid(key, ROSTER_DOMAIN, bytes.fromhex(roster.digest), signature)


@dataclass
class SignedRoster:
    """A roster and the signatures the sites gave it: `privacy/roster.json` of a run."""

    roster: Roster
    signatures: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"roster": self.roster.to_dict(), "digest": self.roster.digest, "signatures": self.signatures},
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> SignedRoster:
        """Read `privacy/roster.json`; RosterError when it is malformed. The stored `digest` is
        only a convenience for readers: the digest is always recomputed from the roster."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RosterError(f"roster: not JSON ({exc})") from None
        if not isinstance(data, Mapping) or "roster" not in data:
            raise RosterError("roster file: needs a 'roster' object")
        signatures = data.get("signatures", {})
        if not isinstance(signatures, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in signatures.items()
        ):
            raise RosterError("roster file: 'signatures' must map site names to base64 signatures")
        return cls(Roster.from_dict(data["roster"]), dict(signatures))

    def invalid_signatures(self) -> list[str]:
        """Roster sites whose signature is missing or does not verify."""
        return [
            name
            for name in self.roster.site_names
            if not roster_signature_valid(self.roster, name, self.signatures.get(name, ""))
        ]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _exact_keys(data: Mapping[str, Any], fields: Mapping[str, Any], what: str) -> None:
    missing = sorted(set(fields) - set(data))
    unknown = sorted(set(data) - set(fields))
    if missing or unknown:
        raise RosterError(f"{what}: missing fields {missing}, unknown fields {unknown}")
