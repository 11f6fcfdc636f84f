"""The site's part of secure aggregation: keys, shares, the masked update, the unmasking shares.

A round's secrets live only in the node's in-memory context (never on disk, never sent): a site
that restarts mid-round has lost them and counts as dropped out, which the protocol recovers from.
Every step checks what the coordinator asks before answering, so a coordinator that asks for too
little safety (a minority threshold, unmasking fewer inputs than the threshold, a site's key and
its seed at once) is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, RecordDict

from pm_common import secure_aggregation as sa
from pm_common.roster import Roster

STATE_KEY = "pmfl-secagg"


@dataclass(frozen=True)
class SiteIdentity:
    """Who this site is in the run: its name, its ledger key (its enrolled identity), and the run's
    roster it signed, which names every peer's ledger key."""

    site: str
    key: Ed25519PrivateKey
    roster: Roster


@dataclass
class SecAggSiteState:
    """One round's secrets and what the site has been told and has received."""

    round: int
    index: int
    sk_c: bytes  # encrypts the shares this site sends and receives
    mask_seed: bytes  # derives the key of the pairwise masks; its shares are revealed if the site drops out
    seed: bytes  # the self mask; its shares are revealed if the site's input arrives
    neighbours: list[int] = field(default_factory=list)
    pk_c: list[bytes] = field(default_factory=list)  # aligned with neighbours
    pk_s: list[bytes] = field(default_factory=list)
    threshold: int = 0
    shares_from: list[int] = field(default_factory=list)
    seed_shares: list[bytes] = field(default_factory=list)  # aligned with shares_from
    key_shares: list[bytes] = field(default_factory=list)
    own_seed_share: bytes = b""
    own_key_share: bytes = b""
    unmasked: bool = False

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({k: v for k, v in self.__dict__.items()})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SecAggSiteState:
        values = dict(record)
        return cls(**{k: (list(v) if isinstance(v, list) else v) for k, v in values.items()})


def _key(round_: int) -> str:
    return f"{STATE_KEY}-r{round_}"


def load(state: RecordDict, round_: int) -> SecAggSiteState:
    record = state.config_records.get(_key(round_))
    if record is None:
        raise sa.SecAggError(f"no secure-aggregation keys for round {round_} at this site (restarted?)")
    return SecAggSiteState.from_record(record)


def save(state: RecordDict, secagg: SecAggSiteState) -> None:
    state[_key(secagg.round)] = secagg.to_record()


def forget(state: RecordDict, round_: int) -> None:
    """Drop a round's secrets once its unmasking is done: nothing needs them any more."""
    if _key(round_) in state:
        del state[_key(round_)]


def setup(round_: int) -> SecAggSiteState:
    """Fresh key pairs and self-mask seed for a round (its index comes with the key sharing)."""
    return SecAggSiteState(
        round_, 0, sa.new_private_key(), os.urandom(sa.SEED_BYTES), seed=os.urandom(sa.SEED_BYTES)
    )


def public_keys(secagg: SecAggSiteState) -> tuple[bytes, bytes]:
    return sa.public_key(secagg.sk_c), sa.public_key(sa.mask_private_key(secagg.mask_seed))


def share_keys(
    secagg: SecAggSiteState,
    index: int,
    neighbours: Sequence[int],
    pk_c: Sequence[bytes],
    pk_s: Sequence[bytes],
    threshold: int,
) -> tuple[list[int], list[bytes]]:
    """Shamir-share the seed and mask key among the neighbours; one sealed bundle per neighbour.
    `index`: this site's number among the round's participants."""
    secagg.index = index
    neighbours = [int(n) for n in neighbours]
    if secagg.index not in neighbours:
        raise sa.SecAggError(f"site {secagg.index} is not among its own neighbours {neighbours}")
    own = neighbours.index(secagg.index)
    if (pk_c[own], pk_s[own]) != public_keys(secagg):
        raise sa.SecAggError("the coordinator relayed public keys that are not this site's")
    if problem := sa.check_threshold(threshold, len(neighbours)):
        raise sa.SecAggError(problem)
    seed_shares = sa.split_secret(secagg.seed, threshold, len(neighbours))
    key_shares = sa.split_secret(secagg.mask_seed, threshold, len(neighbours))
    secagg.neighbours, secagg.threshold = neighbours, threshold
    secagg.pk_c, secagg.pk_s = [bytes(k) for k in pk_c], [bytes(k) for k in pk_s]
    secagg.own_seed_share, secagg.own_key_share = seed_shares[own], key_shares[own]
    destinations, sealed = [], []
    for pos, peer in enumerate(neighbours):
        if peer == secagg.index:
            continue
        key = sa.agree(secagg.sk_c, pk_c[pos], sa.share_context(secagg.round, secagg.index, peer))
        destinations.append(peer)
        sealed.append(sa.seal(key, seed_shares[pos] + key_shares[pos]))
    return destinations, sealed


def masked_input(
    secagg: SecAggSiteState,
    senders: Sequence[int],
    sealed: Sequence[bytes],
    vector: np.ndarray,
    quantiser: sa.Quantiser,
) -> tuple[np.ndarray, int]:
    """Open the shares addressed to this site, then mask its quantised `vector`.

    Pairwise masks are added only for the neighbours whose shares arrived (those that completed
    key sharing): any of them that drops out later can then be unmasked from its shares.
    Returns the masked uint32 vector and the number of clipped coordinates.
    """
    senders = [int(s) for s in senders]
    if not set(senders) <= set(secagg.neighbours):
        strangers = sorted(set(senders) - set(secagg.neighbours))
        raise sa.SecAggError(f"shares relayed from non-neighbours {strangers}")
    secagg.shares_from, secagg.seed_shares, secagg.key_shares = [], [], []
    for sender, blob in zip(senders, sealed, strict=True):
        pk = secagg.pk_c[secagg.neighbours.index(sender)]
        key = sa.agree(secagg.sk_c, pk, sa.share_context(secagg.round, sender, secagg.index))
        bundle = sa.unseal(key, blob)
        split = len(secagg.own_seed_share)
        secagg.shares_from.append(sender)
        secagg.seed_shares.append(bundle[:split])
        secagg.key_shares.append(bundle[split:])
    quantised, clipped = quantiser.quantise(vector, np.random.default_rng())
    masked = quantised + sa.self_mask(secagg.seed, secagg.round, len(quantised))
    for peer in senders:
        pk = secagg.pk_s[secagg.neighbours.index(peer)]
        pair = sa.pairwise_mask(secagg.mask_seed, pk, secagg.round, len(quantised))
        masked = masked + pair if sa.pairwise_sign(secagg.index, peer) > 0 else masked - pair
    return masked.astype(np.uint32), clipped


def unmasking_shares(
    secagg: SecAggSiteState, active: Sequence[int], dropped: Sequence[int]
) -> tuple[list[int], list[bytes], list[int], list[bytes]]:
    """Seed shares of the active neighbours and key shares of the dropped ones, once per round.

    Refuses a request that would expose a single input: fewer active sites than the threshold, a
    site listed both ways, or this site's own key (it is evidently not dropped).
    """
    active_set, dropped_set = {int(a) for a in active}, {int(d) for d in dropped}
    if secagg.unmasked:
        raise sa.SecAggError(f"round {secagg.round}: unmasking shares were already given")
    if active_set & dropped_set:
        raise sa.SecAggError(f"sites listed both active and dropped: {sorted(active_set & dropped_set)}")
    if secagg.index in dropped_set:
        raise sa.SecAggError("asked for this site's own mask key while it is online")
    active_neighbours = len(active_set & set(secagg.neighbours))
    if active_neighbours < secagg.threshold:
        raise sa.SecAggError(
            f"only {active_neighbours} inputs to unmask, fewer than the threshold {secagg.threshold}: "
            "the sum could reveal a single site's update"
        )
    secagg.unmasked = True
    held = dict(zip(secagg.shares_from, zip(secagg.seed_shares, secagg.key_shares, strict=True), strict=True))
    held[secagg.index] = (secagg.own_seed_share, secagg.own_key_share)
    seed_nodes = [n for n in sorted(active_set) if n in held]
    key_nodes = [n for n in sorted(dropped_set) if n in held]
    return seed_nodes, [held[n][0] for n in seed_nodes], key_nodes, [held[n][1] for n in key_nodes]


def handle(request: ConfigRecord, state: RecordDict, identity: SiteIdentity | None = None) -> ConfigRecord:
    """Answer a key stage: `setup`, `share-keys` or `unmask` (which may carry the next round's
    key sharing: the round after it is then ready without extra exchanges)."""
    stage, round_ = str(request["stage"]), int(request["round"])
    if stage == "setup":
        secagg = setup(round_)
        save(state, secagg)
        pk_c, pk_s = public_keys(secagg)
        return ConfigRecord({"pk-c": pk_c, "pk-s": pk_s})
    if stage == "share-keys":
        return _share(request, state, round_)
    if stage != "unmask":
        raise sa.SecAggError(f"unknown secure-aggregation stage {stage!r}")
    secagg = load(state, round_)
    seed_nodes, seed_shares, key_nodes, key_shares = unmasking_shares(
        secagg, request["active"], request["dropped"]
    )
    forget(state, round_)
    reply = ConfigRecord({
        "seed-nodes": seed_nodes, "seed-shares": seed_shares,
        "key-nodes": key_nodes, "key-shares": key_shares,
    })
    if "next-round" in request:
        reply.update(_share(request, state, int(request["next-round"])))
    return reply


def _share(request: ConfigRecord, state: RecordDict, round_: int) -> ConfigRecord:
    secagg = load(state, round_)
    destinations, sealed = share_keys(
        secagg, int(request["index"]), request["neighbours"], request["pk-c"], request["pk-s"],
        int(request["threshold"]),
    )
    save(state, secagg)
    return ConfigRecord({"destinations": destinations, "sealed": sealed})


def mask_update(
    request: ConfigRecord, state: RecordDict, vector: np.ndarray, identity: SiteIdentity | None = None
) -> tuple[np.ndarray, int, ConfigRecord]:
    """The training stage: this round's masked `vector`, its number of clipped coordinates, and
    what goes back with it: the next round's public keys when the coordinator asks for them."""
    secagg = load(state, int(request["round"]))
    quantiser = sa.Quantiser(float(request["clip-range"]), int(request["levels"]))
    masked, clipped = masked_input(secagg, request["senders"], request["sealed"], vector, quantiser)
    save(state, secagg)
    reply = ConfigRecord()
    if "next-round" in request:
        upcoming = setup(int(request["next-round"]))
        save(state, upcoming)
        reply["pk-c"], reply["pk-s"] = public_keys(upcoming)
    return masked, clipped, reply
