"""Secure aggregation (SecAgg+, Bell et al. 2020): the primitives and the maths both sides share.

Each site adds to its quantised update a self mask (from a fresh seed `b`) and one pairwise mask
per neighbour (from an X25519 agreement); pairwise masks cancel in the sum, and the coordinator
removes the rest from Shamir shares the surviving sites hand in: the seeds `b` of sites whose
input arrived, the mask keys of sites that dropped out. It never holds both for one site.

Every primitive comes from a maintained library: X25519, HKDF-SHA256, AES-GCM and ChaCha20 from
`cryptography`, Shamir sharing over GF(2^128) from pycryptodome. Flower's legacy SecAgg+ helpers
are not used for the masks: their PRG seeds NumPy's Mersenne Twister with 32 bits of the key.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MODULUS_BITS = 32  # masked inputs are uint32: as many bytes on the wire as a float32 update
SEED_BYTES = 16  # self-mask and mask-key seeds: one Shamir chunk each
_CHUNK = 16  # pycryptodome's Shamir shares 16-byte secrets
_INDEX_BYTES = 2
_ONE_USE_NONCE = bytes(12)  # every sealing key seals exactly one message


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


def new_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def mask_private_key(seed: bytes) -> bytes:
    """The X25519 key that agrees a site's pairwise masks, derived from a 16-byte seed: only the
    seed is Shamir-shared, half the bytes of sharing the key itself."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pmfl-secagg mask key").derive(seed)


def public_key(private_key: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def agree(private_key: bytes, peer_public_key: bytes, info: bytes) -> bytes:
    """A 32-byte key both parties derive: X25519 then HKDF-SHA256 bound to `info`."""
    shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
        X25519PublicKey.from_public_bytes(peer_public_key)
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask(seed: bytes, length: int, info: bytes) -> np.ndarray:
    """`length` uint32 words of ChaCha20 keystream keyed by HKDF(seed, info): the mask PRG."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4").astype(np.uint32)


def seal(key: bytes, plaintext: bytes) -> bytes:
    """AES-GCM under a key used for this one message (`share_context` is in its derivation, so a
    fixed nonce never repeats under one key and a bundle opens only for its round and direction)."""
    return AESGCM(key).encrypt(_ONE_USE_NONCE, plaintext, None)


def unseal(key: bytes, sealed: bytes) -> bytes:
    return AESGCM(key).decrypt(_ONE_USE_NONCE, sealed, None)


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of `secret` (a multiple of 16 bytes): any `threshold` of them rebuild it."""
    per_chunk = [
        Shamir.split(threshold, holders, secret[i : i + _CHUNK], ssss=False)
        for i in range(0, len(secret), _CHUNK)
    ]
    return [
        per_chunk[0][h][0].to_bytes(_INDEX_BYTES, "big") + b"".join(chunk[h][1] for chunk in per_chunk)
        for h in range(holders)
    ]


def combine_shares(shares: Sequence[bytes]) -> bytes:
    indexed = [(int.from_bytes(s[:_INDEX_BYTES], "big"), s[_INDEX_BYTES:]) for s in shares]
    chunks = len(indexed[0][1]) // _CHUNK
    return b"".join(
        Shamir.combine([(x, s[c * _CHUNK : (c + 1) * _CHUNK]) for x, s in indexed], ssss=False)
        for c in range(chunks)
    )


def share_context(round_: int, sender: int, receiver: int) -> bytes:
    """HKDF info of the key that seals the share bundle `sender` sends `receiver` in a round."""
    return f"pmfl-secagg shares r{round_} {sender}->{receiver}".encode()


def self_mask(seed: bytes, round_: int, length: int) -> np.ndarray:
    return mask(seed, length, f"pmfl-secagg self mask r{round_}".encode())


def pairwise_mask(mask_seed: bytes, peer_public_key: bytes, round_: int, length: int) -> np.ndarray:
    """The mask a pair of sites shares this round; either side's mask-key seed derives it."""
    info = f"pmfl-secagg pairwise mask r{round_}".encode()
    return mask(agree(mask_private_key(mask_seed), peer_public_key, info), length, info)


def pairwise_sign(own: int, peer: int) -> int:
    """The lower-indexed site adds the pair's mask, the other subtracts it: they cancel in the sum."""
    return 1 if own < peer else -1


def neighbourhoods(count: int, degree: int, rng: random.Random) -> dict[int, list[int]]:
    """Each participant's neighbours (itself included), participants numbered 1..count.

    `degree` <= 0 or >= count: everyone (SecAgg). Otherwise SecAgg+'s sparse graph: a ring over a
    random order, `degree // 2` neighbours each side, so the relation is symmetric.
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
    """Shares needed to rebuild a secret: a strict majority of its holders, and at least 2."""
    return max(2, holders // 2 + 1, math.ceil(fraction * holders))


def check_threshold(threshold: int, holders: int) -> str:
    """Why a site must refuse these parameters ('' if safe): a threshold of 1 or a minority would
    let the coordinator alone, or with a minority of sites, rebuild a site's secrets."""
    if threshold < 2 or 2 * threshold <= holders:
        return f"reconstruction threshold {threshold} of {holders} shares is not a strict majority (>= 2)"
    if threshold > holders:
        return f"reconstruction threshold {threshold} exceeds the {holders} share holders"
    return ""
