"""Secure aggregation (SecAgg+, Bell et al. 2020): the primitives and the maths both sides share.

Each site adds to its quantised update a self mask (from a fresh seed `b`) and one pairwise mask
per neighbour (from an X25519 agreement); pairwise masks cancel in the sum, and the coordinator
removes the rest from Shamir shares the surviving sites hand in: the seeds `b` of sites whose
input arrived, the mask keys of sites that dropped out. It never holds both for one site.

Against a coordinator that deviates from the protocol, what a site may be asked is fixed here too:
`Rules` (from the study's `[secure_aggregation]` settings, whose digest the site signed in the run's
roster, and the roster's size) bound every parameter, and the statements sites sign with their
ledger keys (their round public keys; the set of survivors of a round) authenticate what the
coordinator relays between them.

Every primitive comes from a maintained library: X25519, HKDF-SHA256, AES-GCM and ChaCha20 from
`cryptography`, Shamir sharing over GF(2^128) from pycryptodome, Ed25519 through
`pm_common.records.signing`. Flower's legacy SecAgg+ helpers are not used for the masks: their PRG seeds
NumPy's Mersenne Twister with 32 bits of the key.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pm_common.records.roster import Roster, RosterError
from pm_common.records.signing import sign_statement, statement_valid
from pm_common.study.config import SecureAggregationConfig

MODULUS_BITS = 32  # masked inputs are uint32: as many bytes on the wire as a float32 update
SEED_BYTES = 16  # self-mask and mask-key seeds: one Shamir chunk each
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce, drawn at random for every seal and sent with it
_CHUNK = 16  # pycryptodome's Shamir shares 16-byte secrets
_INDEX_BYTES = 2

KEYS_DOMAIN = b"pmfl-secagg-keys-v1\n"
"""Domain tag of a site's signature over its round public keys (run, round, site, pk-c, pk-s)."""

SURVIVORS_DOMAIN = b"pmfl-secagg-survivors-v1\n"
"""Domain tag of a site's signature over a round's survivor set (run, round, sorted site names)."""


class SecAggError(RuntimeError):
    """A secure-aggregation step cannot go on safely; says which step and why."""


@dataclass(frozen=True)
class Quantiser:
    """Fixed-point map of [-clip_range, clip_range] onto 0..levels-1 with unbiased stochastic
    rounding; `levels` leaves room for the sum of `max_sites` inputs below 2**32 (no wrap-around)."""

    clip_range: float
    levels: int

    @classmethod
    def for_sites(cls, clip_range: float, max_sites: int) -> Quantiser:
        bits = MODULUS_BITS - max(1, math.ceil(math.log2(max(2, max_sites))))
        return cls(clip_range, 1 << bits)

    @property
    def step(self) -> float:
        return 2 * self.clip_range / (self.levels - 1)

    def quantise(self, values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Quantised `values` (uint32) and how many of them were clipped to the range."""
        clipped = np.clip(values, -self.clip_range, self.clip_range)
        scaled = (clipped + self.clip_range) / self.step
        rounded = np.floor(scaled + rng.random(scaled.shape))
        return np.minimum(rounded, self.levels - 1).astype(np.uint32), int(np.sum(clipped != values))

    def dequantise_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum of `count` inputs from the sum of their quantised values."""
        return total.astype(np.float64) * self.step - count * self.clip_range


@dataclass(frozen=True)
class Rules:
    """What a run's secure aggregation may look like, fixed by the study and its roster.

    Both sides derive them from the same two things: the study's `[secure_aggregation]` settings
    (whose text every site signed, by digest, in the roster) and the roster's size. The coordinator
    plans rounds with them; a site refuses a request that does not match them, so a coordinator
    cannot pick a weaker threshold, a smaller neighbourhood, a clip range or quantisation that
    wraps, or another weighting than the study's.
    """

    degree: int  # the study's `neighbours`: 0 (or >= the roster) means every site
    fraction: float  # the study's `threshold`
    clip_range: float
    max_weight: float
    roster_size: int

    @classmethod
    def of(cls, config: SecureAggregationConfig, roster_size: int) -> Rules:
        """The rules of a study's secure aggregation for a roster of `roster_size` sites."""
        if roster_size < 1:
            raise SecAggError("secure aggregation needs the run's roster: no site is enrolled")
        return cls(int(config.neighbours), float(config.threshold), float(config.clip_range),
                   float(config.max_weight), int(roster_size))

    @property
    def quantiser(self) -> Quantiser:
        """Levels for the sum of at most every roster site: the sum can never wrap modulo 2**32."""
        return Quantiser.for_sites(self.clip_range, self.roster_size)

    def threshold(self, holders: int) -> int:
        return reconstruction_threshold(self.fraction, holders)

    @property
    def quorum(self) -> int:
        """Signatures of one survivor set needed before any site unmasks: a strict majority of the
        roster, so that two different survivor sets can never both gather them (every site signs
        one set per round)."""
        return self.roster_size // 2 + 1

    def neighbourhood_sizes(self) -> tuple[int, int]:
        """The fewest and most share holders (the site itself included) an honest round gives a
        site: every participant, or SecAgg+'s ring; never fewer than the quorum allows to run."""
        full = self.roster_size
        sparse = 0 < self.degree < full
        ring = min(full, 2 * max(1, self.degree // 2) + 1) if sparse else full
        return min(ring, self.quorum), ring

    def neighbourhood_problem(self, holders: int, threshold: int) -> str:
        """Why a site must refuse a neighbourhood of `holders` with `threshold` ('' if it fits)."""
        low, high = self.neighbourhood_sizes()
        if not low <= holders <= high:
            return (f"a neighbourhood of {holders} sites is outside what the study and its roster of "
                    f"{self.roster_size} allow ({low} to {high})")
        if problem := check_threshold(threshold, holders):
            return problem
        if threshold != self.threshold(holders):
            return (f"reconstruction threshold {threshold} of {holders} is not the study's "
                    f"({self.threshold(holders)}, threshold = {self.fraction:g})")
        return ""

    def relay_problem(self, clip_range: float, levels: int, max_weight: float) -> str:
        """Why a site must refuse the quantisation and weighting a training relay asks for ('' if none)."""
        expected = self.quantiser
        if clip_range != expected.clip_range:
            return f"clip range {clip_range!r} is not the study's {expected.clip_range!r}"
        if levels != expected.levels:
            return (f"{levels!r} quantisation levels are not the {expected.levels} the study's roster "
                    f"of {self.roster_size} sites implies")
        if max_weight != self.max_weight:
            return f"max weight {max_weight!r} is not the study's {self.max_weight!r}"
        return ""


def new_private_key() -> bytes:
    """A fresh X25519 private key, raw: a site's per-round key for agreeing share-sealing keys.

    Fresh every round, so that a key revealed or rebuilt for one round tells nothing about another.

    Returns:
        The 32 raw bytes of the private key.
    """
    return X25519PrivateKey.generate().private_bytes_raw()


def mask_private_key(seed: bytes) -> bytes:
    """The X25519 key that agrees a site's pairwise masks, derived from a 16-byte seed.

    Only the seed is Shamir-shared, half the bytes of sharing the key itself.

    Args:
        seed: The site's mask-key seed (SEED_BYTES bytes).

    Returns:
        The 32 raw bytes of the X25519 private key.
    """
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pmfl-secagg mask key").derive(seed)


def public_key(private_key: bytes) -> bytes:
    """The raw X25519 public key of a raw private key: what a site sends to its neighbours.

    Args:
        private_key: The 32 raw bytes of an X25519 private key.

    Returns:
        The 32 raw bytes of its public key.
    """
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def agree(private_key: bytes, peer_public_key: bytes, info: bytes) -> bytes:
    """A 32-byte key both parties derive: X25519 then HKDF-SHA256 bound to `info`.

    Binding to `info` gives every use (a round, a direction, a purpose) its own key from one agreement.

    Args:
        private_key: One's own raw X25519 private key.
        peer_public_key: The other party's raw X25519 public key.
        info: The HKDF info naming what the key is for.

    Returns:
        The derived 32-byte key.
    """
    shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
        X25519PublicKey.from_public_bytes(peer_public_key)
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask(seed: bytes, length: int, info: bytes) -> np.ndarray:
    """`length` uint32 words of ChaCha20 keystream keyed by HKDF(seed, info): the mask PRG.

    Args:
        seed: The secret the mask is derived from.
        length: How many uint32 words to produce (the length of the quantised update).
        info: The HKDF info naming the mask (its kind and round).

    Returns:
        The mask, a uint32 array of `length` words.
    """
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4").astype(np.uint32)


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """AES-GCM with a fresh random 96-bit nonce, sent in front of the ciphertext; `context` is authenticated
    too.

    A nonce never repeats under one key: besides being random, every sealing key is derived for one
    round, sender and receiver, and a site shares its keys once per round.

    Args:
        key: The 32-byte sealing key (from `agree`).
        plaintext: The bytes to seal.
        context: Associated data the receiver must present to open it (`share_context`).

    Returns:
        The nonce followed by the ciphertext and tag.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, sealed: bytes, context: bytes) -> bytes:
    """Open `seal`'s output.

    Args:
        key: The 32-byte sealing key.
        sealed: The nonce, ciphertext and tag, as `seal` returns them.
        context: The associated data it was sealed with.

    Returns:
        The plaintext.

    Raises:
        SecAggError: the bundle was not sealed with this key for this context (or was altered).
    """
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context)
    except (InvalidTag, ValueError):
        pass
    raise SecAggError("a share bundle does not open: not sealed for this site and round, or altered")


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of `secret` (a multiple of 16 bytes): any `threshold` of them rebuild it.

    Each 16-byte chunk is shared separately (pycryptodome shares 16-byte secrets); a holder's share
    is its index followed by its share of every chunk, so it travels as one value.

    Args:
        secret: The secret; its length must be a multiple of 16 bytes.
        threshold: How many shares rebuild it.
        holders: How many shares to make.

    Returns:
        One share per holder, holder i+1's at position i.
    """
    per_chunk = [
        Shamir.split(threshold, holders, secret[i : i + _CHUNK], ssss=False)
        for i in range(0, len(secret), _CHUNK)
    ]
    return [
        per_chunk[0][h][0].to_bytes(_INDEX_BYTES, "big") + b"".join(chunk[h][1] for chunk in per_chunk)
        for h in range(holders)
    ]


def combine_shares(shares: Sequence[bytes]) -> bytes:
    """Rebuild a secret from its Shamir shares (`split_secret`'s inverse).

    Args:
        shares: At least the threshold number of shares of one secret; not empty.

    Returns:
        The secret. With too few or foreign shares the result is wrong rather than an error, so callers
        count shares first.
    """
    indexed = [(int.from_bytes(s[:_INDEX_BYTES], "big"), s[_INDEX_BYTES:]) for s in shares]
    chunks = len(indexed[0][1]) // _CHUNK
    return b"".join(
        Shamir.combine([(x, s[c * _CHUNK : (c + 1) * _CHUNK]) for x, s in indexed], ssss=False)
        for c in range(chunks)
    )


def share_context(run: str, round_: int, sender: str, receiver: str) -> bytes:
    """HKDF info (and AES-GCM associated data) of the bundle `sender` sends `receiver` in a round.

    A bundle opens only for its run, round and direction, between the sites the roster names.

    Args:
        run: The run's id.
        round_: The round.
        sender: The sending site's name.
        receiver: The receiving site's name.

    Returns:
        The context bytes.
    """
    return json.dumps(["pmfl-secagg shares", run, round_, sender, receiver]).encode()


def self_mask(seed: bytes, round_: int, length: int) -> np.ndarray:
    """A site's self mask for one round, from its seed `b`.

    The self mask hides a site's input even when its pairwise masks are removed because its neighbours
    think it dropped out; the coordinator learns the seed only for sites whose input arrived.

    Args:
        seed: The site's self-mask seed for the round.
        round_: The round, so that a seed never yields the same mask twice.
        length: The number of uint32 words.

    Returns:
        The mask, a uint32 array.
    """
    return mask(seed, length, f"pmfl-secagg self mask r{round_}".encode())


def pairwise_mask(mask_seed: bytes, peer_public_key: bytes, round_: int, length: int) -> np.ndarray:
    """The mask a pair of sites shares this round; either side's mask-key seed derives it.

    Args:
        mask_seed: One's own mask-key seed (see `mask_private_key`).
        peer_public_key: The peer's mask public key (pk-s) for the round.
        round_: The round.
        length: The number of uint32 words.

    Returns:
        The mask, a uint32 array.
    """
    info = f"pmfl-secagg pairwise mask r{round_}".encode()
    return mask(agree(mask_private_key(mask_seed), peer_public_key, info), length, info)


def pairwise_sign(own: str, peer: str) -> int:
    """Which of a pair adds their mask and which subtracts it, so that they cancel in the sum.

    The site whose name sorts first adds the pair's mask, the other subtracts it. Names, not the
    coordinator's numbering: both sides agree whatever the coordinator says.

    Args:
        own: One's own site name.
        peer: The neighbour's site name.

    Returns:
        1 when `own` adds the mask, -1 when it subtracts it.
    """
    return 1 if own < peer else -1


def keys_statement(run: str, round_: int, site: str, pk_c: bytes, pk_s: bytes) -> bytes:
    """What a site signs about its round public keys: whose they are, for which run and round.

    Args:
        run: The run's id.
        round_: The round.
        site: The site's name.
        pk_c: Its round public key for sealing shares.
        pk_s: Its round public key for pairwise masks.

    Returns:
        The canonical JSON of the statement.
    """
    return json.dumps(
        {"run": run, "round": round_, "site": site, "pk-c": pk_c.hex(), "pk-s": pk_s.hex()},
        sort_keys=True, separators=(",", ":"),
    ).encode()


def sign_keys(key: Ed25519PrivateKey, run: str, round_: int, site: str, pk_c: bytes, pk_s: bytes) -> bytes:
    """The site's ledger-key signature (raw, 64 bytes, as it travels) over its round public keys.

    Signed with the ledger key the roster names, so a coordinator cannot substitute keys of its own
    and read the shares sent to a site.

    Args:
        key: The site's ledger key.
        run: The run's id.
        round_: The round.
        site: The site's name.
        pk_c: Its round public key for sealing shares.
        pk_s: Its round public key for pairwise masks.

    Returns:
        The raw 64-byte Ed25519 signature.
    """
    return _raw(sign_statement(key, KEYS_DOMAIN, keys_statement(run, round_, site, pk_c, pk_s)))


def keys_signature_valid(
    roster: Roster, run: str, round_: int, site: str, pk_c: bytes, pk_s: bytes, signature: object
) -> bool:
    """Whether `signature` is `site`'s signature of these round keys, by the key the roster names.

    Args:
        roster: The run's roster.
        run: The run's id.
        round_: The round.
        site: The site the keys claim to be from.
        pk_c: The claimed round public key for sealing shares.
        pk_s: The claimed round public key for pairwise masks.
        signature: The signature as received (raw bytes expected; anything else is invalid).

    Returns:
        True when it verifies, False otherwise.
    """
    return _signed_by(roster, site, KEYS_DOMAIN, keys_statement(run, round_, site, pk_c, pk_s), signature)


def survivors_statement(run: str, round_: int, survivors: Sequence[str]) -> bytes:
    """What a site signs to confirm a round's survivors: the sites whose masked inputs arrived.

    Args:
        run: The run's id.
        round_: The round.
        survivors: The survivors' names, in any order (they are sorted).

    Returns:
        The canonical JSON of the statement.
    """
    return json.dumps({"run": run, "round": round_, "survivors": sorted(survivors)},
                      sort_keys=True, separators=(",", ":")).encode()


def sign_survivors(key: Ed25519PrivateKey, run: str, round_: int, survivors: Sequence[str]) -> bytes:
    """The site's ledger-key signature (raw, 64 bytes) confirming a round's survivor set.

    Args:
        key: The site's ledger key.
        run: The run's id.
        round_: The round.
        survivors: The survivors' names.

    Returns:
        The raw 64-byte Ed25519 signature.
    """
    return _raw(sign_statement(key, SURVIVORS_DOMAIN, survivors_statement(run, round_, survivors)))


def survivors_signature_valid(
    roster: Roster, run: str, round_: int, survivors: Sequence[str], site: str, signature: object
) -> bool:
    """Whether `signature` is `site`'s confirmation of this survivor set, by the key the roster names.

    Lets a site check that its neighbours saw the same survivors before it hands in shares: a
    coordinator that tells sites different survivor sets could otherwise get both a site's self-mask
    seed and its mask key.

    Args:
        roster: The run's roster.
        run: The run's id.
        round_: The round.
        survivors: The survivor set the signature should confirm.
        site: The site that supposedly signed it.
        signature: The signature as received (raw bytes expected; anything else is invalid).

    Returns:
        True when it verifies, False otherwise.
    """
    return _signed_by(roster, site, SURVIVORS_DOMAIN, survivors_statement(run, round_, survivors), signature)


def _raw(signature: str) -> bytes:
    return base64.b64decode(signature)


def _signed_by(roster: Roster, site: str, domain: bytes, payload: bytes, signature: object) -> bool:
    entry = roster.entry(site)
    if entry is None or not isinstance(signature, bytes):
        return False
    try:
        return statement_valid(entry.public_key(), domain, payload, base64.b64encode(signature).decode())
    except RosterError:
        return False


def neighbourhoods(count: int, degree: int, rng: random.Random) -> dict[int, list[int]]:
    """Each participant's neighbours (itself included), participants numbered 1..count.

    `degree` <= 0 or >= count: everyone (SecAgg). Otherwise SecAgg+'s sparse graph: a ring over a
    random order, `degree // 2` neighbours each side, so the relation is symmetric.

    Args:
        count: The number of participants.
        degree: The study's neighbourhood size.
        rng: The source of the random order.

    Returns:
        Each participant's number mapped to the sorted numbers of its neighbours.
    """
    everyone = list(range(1, count + 1))
    if degree <= 0 or degree >= count:
        return {i: everyone for i in everyone}
    order = everyone[:]
    rng.shuffle(order)
    half = max(1, degree // 2)
    graph: dict[int, list[int]] = {}
    for pos, node in enumerate(order):
        graph[node] = sorted({order[(pos + d) % count] for d in range(-half, half + 1)})
    return graph


def reconstruction_threshold(fraction: float, holders: int) -> int:
    """Shares needed to rebuild a secret: a strict majority of its holders, and at least 2.

    Args:
        fraction: The study's threshold, as a fraction of the holders.
        holders: How many sites hold shares of the secret.

    Returns:
        The larger of 2, a strict majority and `fraction` of the holders (rounded up).
    """
    return max(2, holders // 2 + 1, math.ceil(fraction * holders))


def check_threshold(threshold: int, holders: int) -> str:
    """Why a site must refuse these parameters ('' if safe).

    A threshold of 1 or a minority would let the coordinator alone, or with a minority of sites,
    rebuild a site's secrets.

    Args:
        threshold: The threshold asked for.
        holders: How many share holders there are.

    Returns:
        The reason to refuse, or '' when the threshold is a strict majority of at least 2 and no more
        than the holders.
    """
    if threshold < 2 or 2 * threshold <= holders:
        return f"reconstruction threshold {threshold} of {holders} shares is not a strict majority (>= 2)"
    if threshold > holders:
        return f"reconstruction threshold {threshold} exceeds the {holders} share holders"
    return ""


def recover_sum(
    round_: int,
    masked: Mapping[str, np.ndarray],
    seed_shares: Mapping[str, Sequence[bytes]],
    key_shares: Mapping[str, Sequence[bytes]],
    pk_s: Mapping[str, bytes],
    graph: Mapping[str, Sequence[str]],
    threshold: int,
) -> np.ndarray:
    """The sum of the quantised inputs in `masked` (site -> masked vector), mod 2**32.

    `seed_shares` holds shares of each contributor's self-mask seed; `key_shares` shares of the
    mask key of each site that shared keys but sent no input (its pairwise masks stay in its
    neighbours' inputs and are removed here).

    Args:
        round_: The round.
        masked: Each contributing site's masked input.
        seed_shares: Shares of each contributor's self-mask seed.
        key_shares: Shares of the mask-key seed of each site that dropped out.
        pk_s: Each site's round mask public key.
        graph: Each site's neighbours.
        threshold: How many shares rebuild a secret.

    Returns:
        The sum of the unmasked quantised inputs, uint32 (mod 2**32).

    Raises:
        SecAggError: fewer than `threshold` shares of a needed secret.
    """
    length = len(next(iter(masked.values())))
    total = np.zeros(length, dtype=np.uint32)
    for vector in masked.values():
        total += vector
    for site in masked:
        shares = _enough(seed_shares.get(site, ()), threshold, f"self-mask seed of {site}")
        total -= self_mask(combine_shares(shares), round_, length)
    for gone, shares in key_shares.items():
        key = combine_shares(_enough(shares, threshold, f"mask-key seed of dropped site {gone}"))
        for site in masked:
            if gone in graph[site]:
                pair = pairwise_mask(key, pk_s[site], round_, length)
                # the surviving site added sign(site, gone) * pair: take it out again
                total = total - pair if pairwise_sign(site, gone) > 0 else total + pair
    return total


def _enough(shares: Sequence[bytes], threshold: int, what: str) -> Sequence[bytes]:
    """`threshold` of the shares: any that many rebuild the secret, and Lagrange interpolation
    costs the square of the number used."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares of the {what}, {threshold} needed: too many drop-outs")
    return shares[:threshold]
