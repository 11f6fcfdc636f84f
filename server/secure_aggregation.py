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
        key = sa.combine_shares(_enough(shares, threshold, f"mask-key seed of dropped site {gone}"))
        for site in masked:
            if gone in graph[site]:
                pair = sa.pairwise_mask(key, pk_s[site], round_, length)
                # the surviving site added sign(site, gone) * pair: take it out again
                total = total - pair if sa.pairwise_sign(site, gone) > 0 else total + pair
    return total


def _enough(shares: Sequence[bytes], threshold: int, what: str) -> Sequence[bytes]:
    """`threshold` of the shares: any that many rebuild the secret, and Lagrange interpolation
    costs the square of the number used."""
    if len(shares) < threshold:
        raise sa.SecAggError(f"{len(shares)} shares of the {what}, {threshold} needed: too many drop-outs")
    return shares[:threshold]


@dataclass
class _Round:
    """What the coordinator keeps of one round: who is who, public keys, the neighbour graph, and
    the sealed share bundles waiting to be relayed."""

    number: int
    index_of: dict[int, int]  # node id -> participant index
    graph: dict[int, list[int]]
    threshold: int
    quantiser: sa.Quantiser
    pk_c: dict[int, bytes] = field(default_factory=dict)
    pk_s: dict[int, bytes] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # participants that completed key sharing
    inbox: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # receiver -> bundles

    def node_of(self, index: int) -> int:
        return next(node for node, i in self.index_of.items() if i == index)

    def share_request(self, node: int) -> dict:
        """What `node` needs to share its keys: its number, threshold, neighbours and their keys."""
        neighbours = [j for j in self.graph[self.index_of[node]] if j in self.pk_c]
        return {
            "index": self.index_of[node],
            "threshold": self.threshold,
            "neighbours": neighbours,
            "pk-c": [self.pk_c[j] for j in neighbours],
            "pk-s": [self.pk_s[j] for j in neighbours],
        }

    def collect(self, node: int, reply: ConfigRecord) -> None:
        sender = self.index_of[node]
        self.shared.add(sender)
        for receiver, sealed in zip(reply["destinations"], reply["sealed"], strict=True):
            self.inbox.setdefault(int(receiver), []).append((sender, bytes(sealed)))


class SecureAggregation:
    """Run the key stages around a round's training messages, then recover only the sum.

    Steady state is pipelined: a site's training reply carries its public keys for the next round
    and the unmasking request carries the next round's key sharing, so a round costs one exchange
    more than without secure aggregation. The first round, and any round whose sites differ from
    those keyed in advance, runs the `setup` and `share-keys` stages first.
    """

    def __init__(
        self,
        config: SecureAggregationConfig,
        on_failure: Callable[[int, str], None],
        *,
        study: str = "",
        run: str = "",
        sites: Mapping[int, str] | None = None,
    ) -> None:
        """`study`, `run`: named in every stage request, so a site finds the run's roster it signed
        (its peers' ledger keys). `sites`: node id -> site name, from the run's enrolment."""
        self.config = config
        self.on_failure = on_failure  # (round, reason): the recorder's failure log
        self.study = study
        self.run = run
        self.sites = dict(sites or {})
        self.timeout = 3600.0
        self.last_round = 0  # no keys are prepared beyond it
        self._round: _Round | None = None
        self._next: _Round | None = None
        self._grid: Grid | None = None

    @property
    def round_number(self) -> int:
        return self._round.number if self._round else 0

    def _plan(self, number: int, nodes: Sequence[int]) -> _Round:
        nodes = sorted(nodes)
        graph = sa.neighbourhoods(len(nodes), self.config.neighbours, random.SystemRandom())
        holders = len(next(iter(graph.values()))) if graph else 2
        return _Round(
            number,
            {node: i + 1 for i, node in enumerate(nodes)},
            graph,
            sa.reconstruction_threshold(self.config.threshold, holders),
            sa.Quantiser.for_sites(self.config.clip_range, len(nodes)),
        )

    def _key_round(self, number: int, nodes: Sequence[int]) -> _Round:
        """The `setup` and `share-keys` stages for a round nobody holds keys for yet; the graph and
        threshold are those of the sites that answered `setup`."""
        keys = dict(self._stage(number, {n: {"stage": "setup"} for n in nodes}))
        current = self._plan(number, sorted(keys))
        for node, reply in keys.items():
            current.pk_c[current.index_of[node]] = bytes(reply["pk-c"])
            current.pk_s[current.index_of[node]] = bytes(reply["pk-s"])
        requests = {n: {"stage": "share-keys", **current.share_request(n)} for n in current.index_of}
        for node, reply in self._stage(number, requests):
            current.collect(node, reply)
        return current

    def prepare(self, grid: Grid, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """The round's training messages for the sites holding keys for it, each carrying the
        sealed shares addressed to it (keys are agreed first where they were not in advance)."""
        messages = list(messages)
        self._grid = grid
        nodes = {m.metadata.dst_node_id for m in messages}
        ready = self._next
        if ready is None or ready.number != server_round or not nodes <= {
            ready.node_of(i) for i in ready.shared
        }:
            ready = self._key_round(server_round, sorted(nodes))
        self._round, self._next = ready, None
        if len(ready.shared) < ready.threshold:
            self.on_failure(server_round, f"secure aggregation: only {len(ready.shared)} sites "
                            f"shared keys, {ready.threshold} needed; no training this round")
            return []
        relayed = []
        for message in messages:
            index = ready.index_of.get(message.metadata.dst_node_id)
            if index not in ready.shared:
                continue
            bundles = [(s, b) for s, b in ready.inbox.get(index, []) if s in ready.shared]
            relay = ConfigRecord({
                "round": server_round,
                "study": self.study,
                "run": self.run,
                "senders": [s for s, _ in bundles],
                "sealed": [b for _, b in bundles],
                "clip-range": ready.quantiser.clip_range,
                "levels": ready.quantiser.levels,
                "max-weight": float(self.config.max_weight),
            })
            if server_round < self.last_round:
                relay["next-round"] = server_round + 1
            # Flower's strategies share one content object among a round's messages: copy it
            relayed.append(Message(
                RecordDict({**dict(message.content.items()), p.SECAGG: relay}),
                dst_node_id=message.metadata.dst_node_id,
                message_type=message.metadata.message_type,
                group_id=message.metadata.group_id,
            ))
        return relayed

    def recover(
        self, masked_by_node: Mapping[int, np.ndarray], next_keys: Mapping[int, ConfigRecord]
    ) -> tuple[np.ndarray, int] | None:
        """Unmask the sum of the inputs that arrived: (float sum, number of inputs), or None.

        `next_keys`: the next round's public keys that came with the training replies; the
        unmasking request carries that round's key sharing to the same sites.
        """
        current, grid = self._round, self._grid
        if current is None or grid is None:
            raise sa.SecAggError("recover() before prepare()")
        masked = {current.index_of[n]: v for n, v in masked_by_node.items()}
        dropped = sorted(current.shared - set(masked))
        if len(masked) < current.threshold:
            self.on_failure(current.number, f"secure aggregation: {len(masked)} masked updates, "
                            f"{current.threshold} needed to unmask; round skipped")
            return None
        keyed = sorted(n for n in masked_by_node if "pk-c" in next_keys.get(n, {}))
        upcoming = self._plan(current.number + 1, keyed)
        for node, keys in next_keys.items():
            if node in upcoming.index_of:
                upcoming.pk_c[upcoming.index_of[node]] = bytes(keys["pk-c"])
                upcoming.pk_s[upcoming.index_of[node]] = bytes(keys["pk-s"])
        requests = {}
        for i in masked:  # each site hears only about its own neighbours
            node = current.node_of(i)
            requests[node] = {
                "stage": "unmask",
                "active": [j for j in current.graph[i] if j in masked],
                "dropped": [j for j in current.graph[i] if j in dropped],
            }
            if node in upcoming.index_of:
                requests[node] |= {"next-round": upcoming.number, **upcoming.share_request(node)}
        seed_shares: dict[int, list[bytes]] = {}
        key_shares: dict[int, list[bytes]] = {d: [] for d in dropped}
        for node, reply in self._stage(current.number, requests):
            for site, share in zip(reply["seed-nodes"], reply["seed-shares"], strict=True):
                seed_shares.setdefault(int(site), []).append(bytes(share))
            for site, share in zip(reply["key-nodes"], reply["key-shares"], strict=True):
                key_shares.setdefault(int(site), []).append(bytes(share))
            if "destinations" in reply and node in upcoming.index_of:
                upcoming.collect(node, reply)
        self._next = upcoming if upcoming.index_of else None
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
        if not requests:
            return []
        messages = [
            Message(RecordDict({p.SECAGG: ConfigRecord(
                {"round": server_round, "study": self.study, "run": self.run, **body}
            )}), dst_node_id=node, message_type=p.SECAGG_MESSAGE)
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
