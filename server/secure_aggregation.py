"""The coordinator's part of secure aggregation: relay keys and shares, then recover only the sum.

A round runs SecAgg+'s stages over the same Grid as training: `setup` (fresh public keys),
`share-keys` (sealed Shamir shares relayed between neighbours), the training message itself (each
site replies with its masked update), and `unmask` (survivors hand in the shares that remove the
masks). The coordinator sees public keys, ciphertexts it cannot open, masked vectors that look
uniformly random, and the shares that remove masks from the sum; never a single site's update.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from pm_common import protocol as p
from pm_common import secure_aggregation as sa
from pm_common.config import SecureAggregationConfig

log = logging.getLogger("pmfl.server")


def recover_sum(
    round_: int,
    masked: Mapping[int, np.ndarray],
    seed_shares: Mapping[int, Sequence[bytes]],
    key_shares: Mapping[int, Sequence[bytes]],
    pk_s: Mapping[int, bytes],
    graph: Mapping[int, Sequence[int]],
    threshold: int,
) -> np.ndarray:
    """The sum of the quantised inputs in `masked` (participant -> masked vector), mod 2**32.

    `seed_shares` holds shares of each contributor's self-mask seed; `key_shares` shares of the
    mask key of each site that shared keys but sent no input (its pairwise masks stay in its
    neighbours' inputs and are removed here).
    """
    length = len(next(iter(masked.values())))
    total = np.zeros(length, dtype=np.uint32)
    for vector in masked.values():
        total += vector
    for site in masked:
        shares = _enough(seed_shares.get(site, ()), threshold, f"self-mask seed of site {site}")
        total -= sa.self_mask(sa.combine_shares(shares), round_, length)
    for gone, shares in key_shares.items():
        key = sa.combine_shares(_enough(shares, threshold, f"mask key of dropped site {gone}"))
        for site in masked:
            if gone in graph[site]:
                pair = sa.pairwise_mask(key, pk_s[site], round_, length)
                # the surviving site added sign(site, gone) * pair: take it out again
                total = total - pair if sa.pairwise_sign(site, gone) > 0 else total + pair
    return total


def _enough(shares: Sequence[bytes], threshold: int, what: str) -> Sequence[bytes]:
    if len(shares) < threshold:
        raise sa.SecAggError(f"{len(shares)} shares of the {what}, {threshold} needed: too many drop-outs")
    return shares


@dataclass
class _Round:
    """What the coordinator keeps of one round: who is who, public keys, the neighbour graph."""

    number: int
    index_of: dict[int, int]  # node id -> participant index
    graph: dict[int, list[int]]
    threshold: int
    quantiser: sa.Quantiser
    pk_c: dict[int, bytes] = field(default_factory=dict)
    pk_s: dict[int, bytes] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # participants that completed key sharing

    def node_of(self, index: int) -> int:
        return next(node for node, i in self.index_of.items() if i == index)


class SecureAggregation:
    """Run the key stages before a round's training messages go out; recover the sum after."""

    def __init__(self, config: SecureAggregationConfig, on_failure: Callable[[int, str], None]) -> None:
        self.config = config
        self.on_failure = on_failure  # (round, reason): the recorder's failure log
        self.timeout = 3600.0
        self._round: _Round | None = None
        self._grid: Grid | None = None

    @property
    def round_number(self) -> int:
        return self._round.number if self._round else 0

    def prepare(self, grid: Grid, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """Key agreement and share exchange; returns the training messages of the sites that
        completed both, each carrying the sealed shares addressed to it."""
        messages = list(messages)
        self._grid = grid
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        index_of = {node: i + 1 for i, node in enumerate(nodes)}
        graph = sa.neighbourhoods(len(nodes), self.config.neighbours, random.SystemRandom())
        holders = len(next(iter(graph.values()))) if graph else 0
        current = _Round(
            server_round,
            index_of,
            graph,
            sa.reconstruction_threshold(self.config.threshold, holders),
            sa.Quantiser.for_sites(self.config.clip_range, len(nodes)),
        )
        self._round = current
        setup = {n: {"stage": "setup", "index": index_of[n]} for n in nodes}
        for node, reply in self._stage(server_round, setup):
            current.pk_c[index_of[node]] = bytes(reply["pk-c"])
            current.pk_s[index_of[node]] = bytes(reply["pk-s"])
        requests = {}
        for node in sorted(n for n in nodes if index_of[n] in current.pk_c):
            neighbours = [j for j in graph[index_of[node]] if j in current.pk_c]
            requests[node] = {
                "stage": "share-keys",
                "threshold": current.threshold,
                "neighbours": neighbours,
                "pk-c": [current.pk_c[j] for j in neighbours],
                "pk-s": [current.pk_s[j] for j in neighbours],
            }
        inbox: dict[int, tuple[list[int], list[bytes]]] = {i: ([], []) for i in index_of.values()}
        for node, reply in self._stage(server_round, requests):
            sender = index_of[node]
            current.shared.add(sender)
            for receiver, sealed in zip(reply["destinations"], reply["sealed"], strict=True):
                inbox[int(receiver)][0].append(sender)
                inbox[int(receiver)][1].append(bytes(sealed))
        ready = []
        for message in messages:
            index = index_of[message.metadata.dst_node_id]
            if index not in current.shared:
                continue
            senders, sealed = [], []
            for sender, blob in zip(*inbox[index], strict=True):
                if sender in current.shared:
                    senders.append(sender)
                    sealed.append(blob)
            relay = ConfigRecord({
                "round": server_round,
                "senders": senders,
                "sealed": sealed,
                "pk-c": [current.pk_c[s] for s in senders],
                "clip-range": current.quantiser.clip_range,
                "levels": current.quantiser.levels,
                "max-weight": float(self.config.max_weight),
            })
            # Flower's strategies share one content object among a round's messages: copy it
            ready.append(Message(
                RecordDict({**dict(message.content.items()), p.SECAGG: relay}),
                dst_node_id=message.metadata.dst_node_id,
                message_type=message.metadata.message_type,
                group_id=message.metadata.group_id,
            ))
        if len(current.shared) < current.threshold:
            self.on_failure(server_round, f"secure aggregation: only {len(current.shared)} sites "
                            f"shared keys, {current.threshold} needed; no training this round")
            return []
        return ready

    def recover(self, masked_by_node: Mapping[int, np.ndarray]) -> tuple[np.ndarray, int] | None:
        """Unmask the sum of the inputs that arrived: (float sum, number of inputs), or None."""
        current, grid = self._round, self._grid
        if current is None or grid is None:
            raise sa.SecAggError("recover() before prepare()")
        masked = {current.index_of[n]: v for n, v in masked_by_node.items()}
        dropped = sorted(current.shared - set(masked))
        if len(masked) < current.threshold:
            self.on_failure(current.number, f"secure aggregation: {len(masked)} masked updates, "
                            f"{current.threshold} needed to unmask; round skipped")
            return None
        active = sorted(masked)
        request = {"stage": "unmask", "active": active, "dropped": dropped}
        seed_shares: dict[int, list[bytes]] = {}
        key_shares: dict[int, list[bytes]] = {}
        for _, reply in self._stage(current.number, {current.node_of(i): request for i in active}):
            for site, share in zip(reply["seed-nodes"], reply["seed-shares"], strict=True):
                seed_shares.setdefault(int(site), []).append(bytes(share))
            for site, share in zip(reply["key-nodes"], reply["key-shares"], strict=True):
                key_shares.setdefault(int(site), []).append(bytes(share))
        key_shares = {d: key_shares.get(d, []) for d in dropped}
        try:
            total = recover_sum(current.number, masked, seed_shares, key_shares, current.pk_s,
                                current.graph, current.threshold)
        except sa.SecAggError as exc:
            self.on_failure(current.number, f"secure aggregation: {exc}; round skipped")
            return None
        if dropped:
            log.info("round %d: secure aggregation removed the masks of %d dropped site(s)",
                     current.number, len(dropped))
        return current.quantiser.dequantise_sum(total, len(masked)), len(masked)

    def _stage(self, server_round: int, requests: Mapping[int, dict]) -> list[tuple[int, ConfigRecord]]:
        """Send one stage's requests; the replies of the sites that answered it."""
        assert self._grid is not None
        messages = [
            Message(RecordDict({p.SECAGG: ConfigRecord({"round": server_round, **body})}),
                    dst_node_id=node, message_type=p.SECAGG_MESSAGE)
            for node, body in requests.items()
        ]
        replies = list(self._grid.send_and_receive(messages, timeout=self.timeout))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set on send
        answered = []
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                stage = next(iter(requests.values()))["stage"]
                reason = f"secure aggregation {stage}: node {node}: {reply.error.reason}"
                self.on_failure(server_round, reason)
                continue
            answered.append((node, reply.content[p.SECAGG]))
        return answered
