"""Tamper-evident privacy ledgers: each site signs its own lines and chains them by hash.

Why: the coordinator stores the sites' ledgers and could edit, drop or reorder lines (so could
anyone with write access to the run directory). Each line carries

- ``prev_hash``: the ``entry_hash`` of the line before it (a fixed genesis value for line 1);
- ``entry_hash``: SHA-256 over a domain tag, ``prev_hash``, the signer's key fingerprint and the
  canonical JSON of the entry's own fields;
- ``signature``: Ed25519 signature (base64) of the 32 bytes of ``entry_hash``, by the site's key;
- ``key_fingerprint``: SHA-256 (hex) of the site's raw Ed25519 public key.

An auditor holding the site's public key (the study record keeps it) detects an edited line (bad
signature), a deleted, inserted or reordered line (broken chain), a replayed line (duplicate hash
or round) and a line spliced in from another site's ledger (another key). What a hash chain cannot
show on its own is a truncated tail: compare the last ``entry_hash`` with a copy held elsewhere
(``chain_head`` in privacy/summary.json). Only ``cryptography`` primitives are used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pm_common.records.ledger import append_line

SIGNATURE_FIELDS: tuple[str, ...] = ("prev_hash", "entry_hash", "signature", "key_fingerprint")
"""Fields added by `sign_entry`; everything else in a line is the signed content."""

DOMAIN = b"pmfl-ledger-v1\n"
"""Domain tag, so that a ledger signature can never be replayed as a signature of anything else."""

GENESIS_HASH = hashlib.sha256(b"pmfl-ledger-genesis-v1").hexdigest()
"""What the first line of every ledger chains to."""

# Problem kinds reported by `verify_chain`.
BAD_SIGNATURE = "bad_signature"
BROKEN_CHAIN = "broken_chain"
DUPLICATE = "duplicate_entry"
REPLAYED_ROUND = "replayed_round"
WRONG_KEY = "wrong_key"
FOREIGN_SITE = "foreign_site"
UNSIGNED = "unsigned"
MALFORMED = "malformed"


# --- keys -------------------------------------------------------------------------------------


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 key for one site; its private half never leaves the site.

    Returns:
        A new Ed25519 private key.
    """
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM, the form `save_private_key` writes.

    Unencrypted because the site's services must sign unattended; the file's permissions protect it.

    Args:
        key: The site's ledger key.

    Returns:
        The PEM bytes.
    """
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(pub: Ed25519PublicKey) -> bytes:
    """Serialise a public key as SubjectPublicKeyInfo PEM, a form any tool (e.g. openssl) can read.

    Args:
        pub: The public key.

    Returns:
        The PEM bytes.
    """
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the private key as PKCS#8 PEM, readable by its owner only.

    The file is created with mode 0600 (and chmod'ed again, in case it already existed), so the key is
    never readable by others, not even for a moment.

    Args:
        key: The site's ledger key.
        path: Where to write it; parent directories are created when missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_pem(key))
    os.chmod(path, 0o600)


def save_public_key(pub: Ed25519PublicKey, path: Path) -> None:
    """Write the public key as PEM, so that it can be handed to the coordinator and to auditors.

    Args:
        pub: The public key.
        path: Where to write it; parent directories are created when missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(public_key_pem(pub))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a private key written by `save_private_key`.

    Checks the key type, so that a key of another kind is refused here rather than failing later
    with a confusing error when it signs.

    Args:
        path: The PEM file.

    Returns:
        The Ed25519 private key.

    Raises:
        ValueError: When the file holds a key that is not an Ed25519 private key.
    """
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a public key from a PEM file (as written by `save_public_key`).

    Args:
        path: The PEM file; its name is used in error messages.

    Returns:
        The Ed25519 public key.
    """
    return public_key_from_pem(path.read_bytes(), source=str(path))


def public_key_from_pem(pem: bytes, source: str = "PEM data") -> Ed25519PublicKey:
    """Parse a PEM public key and make sure it is an Ed25519 key, the only kind ledgers are signed with.

    Args:
        pem: The PEM bytes.
        source: Where the bytes came from, for the error message.

    Returns:
        The Ed25519 public key.

    Raises:
        ValueError: When the PEM holds a public key of another type.
    """
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{source}: not an Ed25519 public key")
    return key


def load_or_create_signing_key(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """A site's key, created on first use: the same key must sign the whole study.

    Args:
        private_path: The private key's file; read when it exists, otherwise created (mode 0600).
        public_path: The public key's file; written from the private key when missing.

    Returns:
        The site's Ed25519 private key.
    """
    if private_path.exists():
        key = load_private_key(private_path)
    else:
        key = generate_signing_key()
        save_private_key(key, private_path)
    if not public_path.exists():
        save_public_key(key.public_key(), public_path)
    return key


def public_key_fingerprint(pub: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte public key: short enough to read aloud, compare on paper.

    Args:
        pub: The public key.

    Returns:
        The fingerprint, 64 hex digits.
    """
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_text(pub: Ed25519PublicKey) -> str:
    """The raw 32-byte public key as base64: how a roster names a site's ledger key.

    Args:
        pub: The public key.

    Returns:
        The base64 text.
    """
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """`public_key_text`'s inverse.

    Args:
        text: The base64 of a raw 32-byte Ed25519 public key.

    Returns:
        The public key.

    Raises:
        ValueError: the text is not the base64 of a 32-byte Ed25519 public key.
    """
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an Ed25519 public key: {exc}") from None


def sign_statement(key: Ed25519PrivateKey, domain: bytes, payload: bytes) -> str:
    """Sign `payload` under a domain tag (so that no signature can be replayed as another kind).

    Args:
        key: the site's ledger key.
        domain: a tag naming what is signed, e.g. b"pmfl-roster-v1\n".
        payload: the bytes signed after the tag.

    Returns:
        The Ed25519 signature, base64.
    """
    return base64.b64encode(key.sign(domain + payload)).decode("ascii")


def statement_valid(public_key: Ed25519PublicKey, domain: bytes, payload: bytes, signature: str) -> bool:
    """Whether `signature` (base64) is `public_key`'s signature of `payload` under `domain`.

    Never raises on bad input: a malformed signature is simply not a valid one, so callers can treat
    every failure alike.

    Args:
        public_key: The signer's public key.
        domain: The domain tag the statement was signed under (see `sign_statement`).
        payload: The bytes signed after the tag.
        signature: The signature, base64.

    Returns:
        True when the signature verifies, False otherwise (including undecodable base64).
    """
    try:
        public_key.verify(base64.b64decode(signature, validate=True), domain + payload)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# --- signing ----------------------------------------------------------------------------------


def canonical_bytes(entry: Mapping[str, Any]) -> bytes:
    """Sorted-key compact JSON of the entry without the signature fields.

    Canonical so that the bytes signed do not depend on how a line was formatted on disk: a JSON
    float round-trips exactly through Python's repr, so parse-then-serialize is stable.

    Args:
        entry: A ledger line as a mapping, signed or not.

    Returns:
        The UTF-8 bytes of its content fields.
    """
    content = {k: v for k, v in entry.items() if k not in SIGNATURE_FIELDS}
    return json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def compute_entry_hash(entry: Mapping[str, Any], prev_hash: str, key_fingerprint: str) -> str:
    """The hash that links a line to its predecessor and to its signer.

    Args:
        entry: The ledger line; its signature fields are ignored.
        prev_hash: The entry_hash of the line before (GENESIS_HASH for the first line).
        key_fingerprint: The signer's key fingerprint (`public_key_fingerprint`).

    Returns:
        SHA-256 (hex) over the domain tag, prev_hash, the fingerprint and the entry's canonical bytes.
    """
    digest = hashlib.sha256()
    digest.update(DOMAIN)
    digest.update(prev_hash.encode("ascii") + b"\n")
    digest.update(key_fingerprint.encode("ascii") + b"\n")
    digest.update(canonical_bytes(entry))
    return digest.hexdigest()


def sign_entry(entry: Mapping[str, Any], prev_hash: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of `entry` with prev_hash, entry_hash, signature and key_fingerprint.

    Any signature fields already in `entry` are replaced, so re-signing a line is harmless.

    Args:
        entry: The ledger line's content.
        prev_hash: What the line chains to (`chain_head` of the ledger so far).
        key: The site's ledger key.

    Returns:
        The signed line.
    """
    fingerprint = public_key_fingerprint(key.public_key())
    content = {k: v for k, v in entry.items() if k not in SIGNATURE_FIELDS}
    entry_hash = compute_entry_hash(content, prev_hash, fingerprint)
    signature = key.sign(bytes.fromhex(entry_hash))
    return {
        **content,
        "prev_hash": prev_hash,
        "entry_hash": entry_hash,
        "signature": base64.b64encode(signature).decode("ascii"),
        "key_fingerprint": fingerprint,
    }


def chain_head(entries: Sequence[Mapping[str, Any]]) -> str:
    """What the next line must chain to: the last line's entry_hash, or genesis.

    Args:
        entries: The ledger's lines so far (with their signature fields), oldest first.

    Returns:
        The last line's entry_hash, or GENESIS_HASH for an empty ledger.

    Raises:
        ValueError: When the last line is not signed, so the chain cannot be extended.
    """
    if not entries:
        return GENESIS_HASH
    head = entries[-1].get("entry_hash")
    if not isinstance(head, str):
        raise ValueError("the ledger's last line is not signed: cannot extend its chain")
    return head


def read_raw_ledger(path: Path) -> list[dict[str, Any]]:
    """All lines of a ledger as dicts, signature fields included (read_ledger drops them).

    Args:
        path: The ledger file; blank lines are ignored.

    Returns:
        The lines, oldest first.

    Raises:
        ValueError: When a non-blank line is not JSON or not a JSON object.
    """
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: not a JSON object")
            rows.append(row)
    return rows


def append_signed(path: Path, entry: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Sign `entry` onto the end of the ledger at `path` and return the signed line.

    Args:
        path: The ledger file; created when missing.
        entry: The line's content.
        key: The site's ledger key.

    Returns:
        The signed line, as written.
    """
    previous = read_raw_ledger(path) if path.exists() else []
    signed = sign_entry(entry, chain_head(previous), key)
    append_line(path, json.dumps(signed, sort_keys=True, allow_nan=False))
    return signed


# --- verification -----------------------------------------------------------------------------


def entry_slot(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    """What may appear once in a ledger, so that a replayed line can be told from a legitimate one.

    One enrolment and one closing per run of the study, one answer per (run, round, attempt).
    `attempt` numbers a coordinator's restarts of the same run, so a round re-run after a crash is a
    new slot while a replayed line is not. Ledgers written before runs were named have neither field:
    their slot is the round alone, as it always was.

    Args:
        entry: A ledger line.

    Returns:
        `(status, run)` for an enrolment or closing; `("round", run, round, attempt)` otherwise.
    """
    status = entry.get("status")
    run, attempt = entry.get("run", ""), entry.get("attempt", 0)
    if status in ("enrolled", "closed"):
        return (status, run)
    return ("round", run, entry.get("round"), attempt)


def describe_slot(slot: tuple[Any, ...]) -> str:
    """`entry_slot` in words, for a finding.

    Args:
        slot: A slot as returned by `entry_slot`.

    Returns:
        A short description, e.g. "round 3 of run <id> (attempt 1)".
    """
    if slot[0] != "round":
        return f"the {slot[0]} line of run {str(slot[1])[:12] or '(unnamed)'}"
    _, run, rnd, attempt = slot
    if not run:
        return f"round {rnd}"
    return f"round {rnd} of run {str(run)[:12]} (attempt {attempt})"


@dataclass(frozen=True)
class ChainProblem:
    """One precise finding about one line (1-based, counting non-empty lines)."""

    line: int
    kind: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "kind": self.kind, "message": self.message}


@dataclass(frozen=True)
class ChainVerification:
    """Result of checking a ledger against the site's public key."""

    ok: bool
    entries: int
    key_fingerprint: str
    head: str | None = None
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def unsigned_only(self) -> bool:
        """True when nothing is wrong except that no line is signed at all (cannot verify)."""
        return bool(self.problems) and all(p.kind == UNSIGNED for p in self.problems) and len(
            self.problems
        ) == self.entries

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "key_fingerprint": self.key_fingerprint,
            "head": self.head,
            "problems": [p.to_dict() for p in self.problems],
        }


def _signature_valid(public_key: Ed25519PublicKey, signature_b64: str, entry_hash: str) -> bool:
    try:
        public_key.verify(base64.b64decode(signature_b64, validate=True), bytes.fromhex(entry_hash))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def verify_chain(
    entries: Sequence[Mapping[str, Any]],
    public_key: Ed25519PublicKey,
    site: str | None = None,
) -> ChainVerification:
    """Check every signature and link of one site's ledger; report each problem with its line.

    Reports problems rather than stopping at the first, so an auditor sees the whole extent of any
    tampering in one pass.

    Args:
        entries: The ledger's lines with their signature fields (`read_raw_ledger`), oldest first.
        public_key: The site's public key, as the study record keeps it.
        site: The site the ledger belongs to; when None, the first line's site.

    Returns:
        The verification: whether it is clean, the number of lines, the key's fingerprint, the chain's
        head (the last line's entry_hash, to compare with a copy held elsewhere) and every problem
        found (unsigned, malformed, wrong key, bad signature, broken chain, duplicate, replayed round,
        foreign site).
    """
    expected_fp = public_key_fingerprint(public_key)
    problems: list[ChainProblem] = []
    seen_hashes: dict[str, int] = {}
    seen_rounds: dict[Any, int] = {}
    expected_site = site if site is not None else (entries[0].get("site") if entries else None)
    prev_stored: str | None = GENESIS_HASH

    for line, entry in enumerate(entries, start=1):
        missing = [k for k in SIGNATURE_FIELDS if not isinstance(entry.get(k), str)]
        if missing:
            problems.append(ChainProblem(line, UNSIGNED, f"line {line}: not signed (no {missing})"))
            prev_stored = None  # the next line cannot be linked to an unsigned one
            continue

        prev_hash, stored_hash = str(entry["prev_hash"]), str(entry["entry_hash"])
        fingerprint, signature = str(entry["key_fingerprint"]), str(entry["signature"])
        try:
            recomputed = compute_entry_hash(entry, prev_hash, fingerprint)
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            problems.append(ChainProblem(line, MALFORMED, f"line {line}: cannot hash entry: {exc}"))
            prev_stored = stored_hash
            continue

        signed_by_key = _signature_valid(public_key, signature, recomputed)
        if fingerprint != expected_fp:
            problems.append(ChainProblem(
                line, WRONG_KEY,
                f"line {line}: signed by another key (fingerprint {fingerprint[:16]}…), "
                f"not this site's key ({expected_fp[:16]}…)",
            ))
        elif not signed_by_key or recomputed != stored_hash:
            problems.append(ChainProblem(
                line, BAD_SIGNATURE,
                f"line {line}: bad signature: the entry was edited after it was signed",
            ))

        if prev_stored is not None and prev_hash != prev_stored:
            where = "the genesis value" if line == 1 else f"line {line - 1}'s hash"
            problems.append(ChainProblem(
                line, BROKEN_CHAIN,
                f"line {line}: broken chain: prev_hash does not match {where} "
                f"(a line was deleted, inserted or reordered)",
            ))

        if stored_hash in seen_hashes:
            problems.append(ChainProblem(
                line, DUPLICATE,
                f"line {line}: duplicate of line {seen_hashes[stored_hash]} (replayed entry)",
            ))
        else:
            seen_hashes[stored_hash] = line
            slot = entry_slot(entry)
            if slot in seen_rounds:
                problems.append(ChainProblem(
                    line, REPLAYED_ROUND,
                    f"line {line}: {describe_slot(slot)} already recorded at line {seen_rounds[slot]} "
                    f"(replayed round)",
                ))
            else:
                seen_rounds[slot] = line

        if expected_site is not None and entry.get("site") != expected_site:
            problems.append(ChainProblem(
                line, FOREIGN_SITE,
                f"line {line}: entry of site {entry.get('site')!r} in the ledger of "
                f"{expected_site!r} (spliced from another ledger)",
            ))
        prev_stored = stored_hash

    head = entries[-1].get("entry_hash") if entries else GENESIS_HASH
    return ChainVerification(
        ok=not problems,
        entries=len(entries),
        key_fingerprint=expected_fp,
        head=head if isinstance(head, str) else None,
        problems=problems,
    )
