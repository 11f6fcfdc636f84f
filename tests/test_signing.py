"""The signed ledger detects every way a stored ledger can be tampered with."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from pm_common.records.ledger import LedgerEntry, read_ledger
from pm_common.records.signing import (
    BAD_SIGNATURE,
    BROKEN_CHAIN,
    DUPLICATE,
    FOREIGN_SITE,
    GENESIS_HASH,
    REPLAYED_ROUND,
    UNSIGNED,
    WRONG_KEY,
    append_signed,
    canonical_bytes,
    chain_head,
    generate_signing_key,
    load_or_create_signing_key,
    load_private_key,
    load_public_key,
    public_key_fingerprint,
    read_raw_ledger,
    save_private_key,
    save_public_key,
    sign_entry,
    verify_chain,
)


def entry(site: str, rnd: int, eps: float) -> dict[str, Any]:
    return asdict(LedgerEntry(
        site=site, round=rnd, status="trained", noise_multiplier=1.1, sample_rate=0.05,
        steps=20, max_grad_norm=1.0, delta=1e-5, epsilon=eps, epsilon_budget=5.0,
        accountant="rdp", timestamp=f"2026-11-26T10:0{rnd % 10}:00+00:00",
    ))


def signed_ledger(site: str, key, rounds: int = 5) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        rows.append(sign_entry(entry(site, r, 0.5 * r), chain_head(rows), key))
    return rows


@pytest.fixture(scope="module")
def keys():
    return {"a": generate_signing_key(), "b": generate_signing_key()}


def kinds(result) -> list[tuple[int, str]]:
    return [(p.line, p.kind) for p in result.problems]


def test_intact_chain_verifies(keys) -> None:
    rows = signed_ledger("site-a", keys["a"])
    result = verify_chain(rows, keys["a"].public_key())
    assert result.ok and result.problems == [] and result.entries == 5
    assert rows[0]["prev_hash"] == GENESIS_HASH
    assert all(rows[i]["prev_hash"] == rows[i - 1]["entry_hash"] for i in range(1, 5))
    assert result.head == rows[-1]["entry_hash"]


def test_edited_field_is_a_bad_signature_at_that_line(keys) -> None:
    rows = signed_ledger("site-a", keys["a"])
    rows[2]["epsilon"] = 0.1  # under-report round 3
    result = verify_chain(rows, keys["a"].public_key())
    assert not result.ok
    assert kinds(result) == [(3, BAD_SIGNATURE)]
    assert "edited" in result.problems[0].message


def test_edited_field_with_recomputed_hash_still_fails(keys) -> None:
    from pm_common.records.signing import compute_entry_hash

    rows = signed_ledger("site-a", keys["a"])
    rows[1]["steps"] = 1
    rows[1]["entry_hash"] = compute_entry_hash(rows[1], rows[1]["prev_hash"],
                                               rows[1]["key_fingerprint"])
    result = verify_chain(rows, keys["a"].public_key())
    assert (2, BAD_SIGNATURE) in kinds(result)
    assert (3, BROKEN_CHAIN) in kinds(result)


@pytest.mark.parametrize("index", [0, 2, 4])
def test_deleted_line_breaks_the_chain(keys, index: int) -> None:
    rows = signed_ledger("site-a", keys["a"])
    del rows[index]
    result = verify_chain(rows, keys["a"].public_key())
    if index == 4:  # dropping the tail leaves a valid prefix: only an anchored head shows it
        assert result.ok and result.head == rows[-1]["entry_hash"]
    else:
        assert kinds(result) == [(index + 1, BROKEN_CHAIN)]
        assert "deleted, inserted or reordered" in result.problems[0].message


def test_swapped_lines_break_the_chain(keys) -> None:
    rows = signed_ledger("site-a", keys["a"])
    rows[1], rows[2] = rows[2], rows[1]
    result = verify_chain(rows, keys["a"].public_key())
    assert {(2, BROKEN_CHAIN), (3, BROKEN_CHAIN), (4, BROKEN_CHAIN)} <= set(kinds(result))
    assert not any(k == BAD_SIGNATURE for _, k in kinds(result))  # lines themselves are intact


def test_replayed_line_is_a_duplicate(keys) -> None:
    rows = signed_ledger("site-a", keys["a"])
    rows.append(copy.deepcopy(rows[1]))
    result = verify_chain(rows, keys["a"].public_key())
    assert (6, DUPLICATE) in kinds(result) and (6, BROKEN_CHAIN) in kinds(result)
    assert "duplicate of line 2" in " ".join(p.message for p in result.problems)


def test_replayed_round_resigned_is_detected(keys) -> None:
    """Even the site itself cannot record a round twice without the auditor seeing it."""
    rows = signed_ledger("site-a", keys["a"])
    rows.append(sign_entry(entry("site-a", 3, 0.1), chain_head(rows), keys["a"]))
    result = verify_chain(rows, keys["a"].public_key())
    assert kinds(result) == [(6, REPLAYED_ROUND)]


def test_spliced_entry_from_another_site(keys) -> None:
    rows = signed_ledger("site-a", keys["a"])
    other = signed_ledger("site-b", keys["b"])
    rows.insert(2, other[2])
    result = verify_chain(rows, keys["a"].public_key())
    found = kinds(result)
    assert (3, WRONG_KEY) in found and (3, FOREIGN_SITE) in found
    assert (3, BROKEN_CHAIN) in found and (4, BROKEN_CHAIN) in found


def test_entry_resigned_by_another_key_with_correct_chain(keys) -> None:
    rows = signed_ledger("site-a", keys["a"])
    rows[3] = sign_entry(rows[3], rows[3]["prev_hash"], keys["b"])  # same content, other key
    result = verify_chain(rows, keys["a"].public_key())
    assert (4, WRONG_KEY) in kinds(result)


def test_wrong_public_key_rejects_every_line(keys) -> None:
    rows = signed_ledger("site-a", keys["a"])
    result = verify_chain(rows, keys["b"].public_key())
    assert not result.ok
    assert kinds(result) == [(i, WRONG_KEY) for i in range(1, 6)]


def test_forged_fingerprint_does_not_help(keys) -> None:
    rows = signed_ledger("site-b", keys["b"])
    for row in rows:
        row["key_fingerprint"] = public_key_fingerprint(keys["a"].public_key())
    result = verify_chain(rows, keys["a"].public_key())
    assert [k for _, k in kinds(result)] == [BAD_SIGNATURE] * 5


def test_unsigned_lines(keys) -> None:
    rows = [entry("site-a", r, 0.5 * r) for r in (1, 2)]
    result = verify_chain(rows, keys["a"].public_key())
    assert kinds(result) == [(1, UNSIGNED), (2, UNSIGNED)] and result.unsigned_only
    mixed = [*signed_ledger("site-a", keys["a"], 2), entry("site-a", 3, 1.5)]
    assert not verify_chain(mixed, keys["a"].public_key()).unsigned_only


def test_canonical_bytes_ignore_formatting_and_signature_fields(keys) -> None:
    e = entry("site-a", 1, 0.5)
    reordered = dict(reversed(list(e.items())))
    assert canonical_bytes(e) == canonical_bytes(reordered)
    signed = sign_entry(e, GENESIS_HASH, keys["a"])
    assert canonical_bytes(signed) == canonical_bytes(e)
    assert b" " not in canonical_bytes({"a": 1, "b": [1, 2]})
    # a line written with other JSON formatting still verifies after parsing
    reparsed = json.loads(json.dumps(signed, indent=3))
    assert verify_chain([reparsed], keys["a"].public_key()).ok


def test_fingerprint_is_sha256_of_raw_key(keys) -> None:
    pub = keys["a"].public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public_key_fingerprint(pub) == hashlib.sha256(raw).hexdigest()
    assert public_key_fingerprint(pub) != public_key_fingerprint(keys["b"].public_key())


def test_pem_round_trip_and_file_ledger(tmp_path: Path, keys) -> None:
    key_file, pub_file = tmp_path / "k" / "ledger_ed25519.pem", tmp_path / "k" / "ledger.pub"
    save_private_key(keys["a"], key_file)
    save_public_key(keys["a"].public_key(), pub_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    loaded = load_private_key(key_file)
    assert public_key_fingerprint(loaded.public_key()) == public_key_fingerprint(
        load_public_key(pub_file))
    # first use creates; second use returns the same key
    k1 = load_or_create_signing_key(tmp_path / "s" / "p.pem", tmp_path / "s" / "p.pub")
    k2 = load_or_create_signing_key(tmp_path / "s" / "p.pem", tmp_path / "s" / "p.pub")
    assert public_key_fingerprint(k1.public_key()) == public_key_fingerprint(k2.public_key())

    ledger = tmp_path / "state" / "ledger.jsonl"
    for r in (1, 2, 3):
        append_signed(ledger, entry("site-a", r, 0.4 * r), loaded)
    rows = read_raw_ledger(ledger)
    assert verify_chain(rows, load_public_key(pub_file)).ok
    # signed lines stay readable by the plain ledger reader (field names are the contract)
    assert [e.round for e in read_ledger(ledger)] == [1, 2, 3]
