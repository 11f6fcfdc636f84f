"""The coordinator's part of secure aggregation: relay keys and shares, then recover only the sum.

A round runs SecAgg+'s stages over the same Grid as training: `setup` (fresh public keys, signed by
each site's ledger key), `share-keys` (sealed Shamir shares relayed between neighbours), the
training message itself (each site replies with its masked update), `survivors` (the sites whose
inputs arrived confirm that set by signature: SecAgg's consistency check) and `unmask` (survivors
hand in the shares that remove the masks). The coordinator sees public keys, ciphertexts it cannot
open, masked vectors that look uniformly random, and the shares that remove masks from the sum;
never a single site's update. Sites identify each other by their names on the run's roster.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from pm_common.secagg import primitives as sa
from pm_common.study.config import SecureAggregationConfig
from pm_common.wire import keys as p

log = logging.getLogger("pmfl.server")


@dataclass
class _Round:
    """What the coordinator keeps of one round: who is who, signed public keys, the neighbour
    graph, and the sealed share bundles waiting to be relayed."""

    number: int
    sites: dict[int, str]  # node id -> site name, for the round's participants
    graph: dict[str, list[str]]
    threshold: int
    pk_c: dict[str, bytes] = field(default_factory=dict)
    pk_s: dict[str, bytes] = field(default_factory=dict)
    signatures: dict[str, bytes] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)  # sites that completed key sharing
    inbox: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)  # receiver -> bundles

    def node_of(self, site: str) -> int:
        return next(node for node, name in self.sites.items() if name == site)

    def share_request(self, node: int) -> dict:
        """What `node` needs to share its keys: its neighbours with their signed keys, the threshold."""
        neighbours = self.graph[self.sites[node]]
        return {
            "threshold": self.threshold,
            "neighbours": neighbours,
            "pk-c": [self.pk_c[n] for n in neighbours],
            "pk-s": [self.pk_s[n] for n in neighbours],
            "key-signatures": [self.signatures[n] for n in neighbours],
        }

    def collect(self, node: int, reply: ConfigRecord) -> None:
        sender = self.sites[node]
        self.shared.add(sender)
        for receiver, sealed in zip(reply["destinations"], reply["sealed"], strict=True):
            self.inbox.setdefault(str(receiver), []).append((sender, bytes(sealed)))


class SecureAggregation:
    """Run the key stages around a round's training messages, then recover only the sum.

    Steady state is pipelined: a site's training reply carries its signed public keys for the next
    round and the `survivors` request carries the next round's key sharing, so a round costs two
    exchanges more than without secure aggregation (`survivors` and `unmask`). The first round, and
    any round nobody keyed in advance, runs the `setup` and `share-keys` stages first. A site keys
    a round once: a site that was not keyed with the others (it was unreachable, or it declined)
    is set up for the next round during this one's `survivors` exchange and shares its keys in the
    `unmask` exchange, at no extra exchange.
    """

    def __init__(
        self,
        config: SecureAggregationConfig,
        on_failure: Callable[[int, str], None],
        *,
        study: str = "",
        run: str = "",
        sites: Mapping[int, str] | None = None,
        study_text: str = "",
        roster_size: int = 0,
    ) -> None:
        """`study`, `run`: named in every stage request, so a site finds the run's roster it signed
        (its peers' ledger keys). `sites`: node id -> site name, from the run's enrolment.
        `study_text`: the study as the sites received it at enrolment (its digest is in the roster);
        sites read their rules from it. `roster_size`: sites on the run's roster (default: `sites`)."""
        self.config = config
        self.on_failure = on_failure  # (round, reason): the recorder's failure log
        self.study = study
        self.run = run
        self.sites = dict(sites or {})
        self.study_text = study_text
        self.rules = sa.Rules.of(config, roster_size or len(self.sites))
        self.timeout = 3600.0
        self.last_round = 0  # no keys are prepared beyond it
        self._round: _Round | None = None
        self._next: _Round | None = None
        self._grid: Grid | None = None

    @property
    def round_number(self) -> int:
        return self._round.number if self._round else 0

    def _plan(self, number: int, keys: Mapping[int, ConfigRecord]) -> _Round:
        """A round over the sites whose signed keys are in `keys` (node -> keys record): a random
        neighbour graph and the study's threshold for its neighbourhoods."""
        sites: dict[int, str] = {}
        for node, record in sorted(keys.items()):
            name = str(record.get("site", ""))
            expected = self.sites.get(node, name)
            if name != expected or name in sites.values():
                self.on_failure(number, f"secure aggregation: node {node} sent keys as {name!r} "
                                f"(enrolled as {expected!r}); left out")
                continue
            sites[node] = name
        names = sorted(sites.values())
        graph = sa.neighbourhoods(len(names), self.config.neighbours, random.SystemRandom())
        holders = len(next(iter(graph.values()))) if graph else 2
        current = _Round(
            number,
            sites,
            {names[i - 1]: [names[j - 1] for j in nb] for i, nb in graph.items()},
            self.rules.threshold(holders),
        )
        for node, name in sites.items():
            current.pk_c[name] = bytes(keys[node]["pk-c"])
            current.pk_s[name] = bytes(keys[node]["pk-s"])
            current.signatures[name] = bytes(keys[node]["signature"])
        return current

    def _setup_request(self, number: int) -> dict:
        return {"stage": "setup", "round": number, "study-toml": self.study_text}

    def _key_round(self, number: int, nodes: Sequence[int]) -> _Round:
        """The `setup` and `share-keys` stages for a round nobody holds shares for yet (a site
        that made its keys for it in advance answers `setup` with the same keys)."""
        keys = dict(self._stage(number, {n: self._setup_request(number) for n in nodes}))
        current = self._plan(number, keys)
        requests = {n: {"stage": "share-keys", "round": number, **current.share_request(n)}
                    for n in current.sites}
        for node, reply in self._stage(number, requests):
            current.collect(node, reply)
        return current

    def prepare(self, grid: Grid, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """The round's training messages for the sites holding keys for it, each carrying the
        sealed shares addressed to it (keys are agreed first where they were not in advance)."""
        messages = list(messages)
        self._grid = grid
        nodes = sorted({m.metadata.dst_node_id for m in messages})
        ready = self._next if self._next is not None and self._next.number == server_round else None
        if ready is None:
            ready = self._key_round(server_round, nodes)
        self._round, self._next = ready, None
        waiting = [n for n in nodes if ready.sites.get(n) not in ready.shared]
        if waiting and len(waiting) < len(nodes):
            log.info("round %d: node(s) %s hold no keys for it and join from the next round",
                     server_round, waiting)
        needed = max(ready.threshold, self.rules.quorum)
        if len(ready.shared) < needed:
            self.on_failure(server_round, f"secure aggregation: only {len(ready.shared)} sites shared keys, "
                            f"{needed} needed (a majority of the roster's {self.rules.roster_size} and the "
                            "threshold); no training this round")
            return []
        quantiser = self.rules.quantiser
        relayed = []
        for message in messages:
            site = ready.sites.get(message.metadata.dst_node_id)
            if site not in ready.shared:
                continue
            bundles = [(s, b) for s, b in ready.inbox.get(site, []) if s in ready.shared]
            relay = ConfigRecord({
                "round": server_round,
                "study": self.study,
                "run": self.run,
                "senders": [s for s, _ in bundles],
                "sealed": [b for _, b in bundles],
                "clip-range": quantiser.clip_range,
                "levels": quantiser.levels,
                "max-weight": float(self.rules.max_weight),
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

        `next_keys`: the next round's signed public keys that came with the training replies. The
        `survivors` request carries that round's key sharing to the same sites; sites online but
        not keyed (back from a drop-out, or declined this round) are set up for it meanwhile and
        share their keys with everyone in the `unmask` exchange.
        """
        current, grid = self._round, self._grid
        if current is None or grid is None:
            raise sa.SecAggError("recover() before prepare()")
        masked = {
            current.sites[n]: v for n, v in masked_by_node.items() if current.sites.get(n) in current.shared
        }
        survivors = sorted(masked)
        needed = max(current.threshold, self.rules.quorum)
        if len(masked) < needed:
            self.on_failure(current.number, f"secure aggregation: {len(masked)} masked updates, "
                            f"{needed} needed to unmask; round skipped")
            return None
        upcoming_keys: dict[int, ConfigRecord] = {}
        joining: list[int] = []
        if current.number < self.last_round:
            upcoming_keys = {
                n: keys for n, keys in next_keys.items() if current.sites.get(n) in masked and "pk-c" in keys
            }
            joining = [n for n in grid.get_node_ids()
                       if n not in upcoming_keys and current.sites.get(n) not in masked]
        upcoming = self._plan(current.number + 1, upcoming_keys) if upcoming_keys and not joining else None

        confirm = {current.node_of(s): {"stage": "survivors", "round": current.number, "survivors": survivors}
                   for s in survivors}
        if upcoming is not None:
            for node in upcoming.sites:
                confirm[node] |= {"next-round": upcoming.number, **upcoming.share_request(node)}
        for node in joining:
            confirm[node] = self._setup_request(current.number + 1)
        signatures: dict[str, bytes] = {}
        for node, reply in self._stage(current.number, confirm):
            if node in joining:
                upcoming_keys[node] = reply
            elif "signature" in reply:
                signatures[current.sites[node]] = bytes(reply["signature"])
                if upcoming is not None and "destinations" in reply:
                    upcoming.collect(node, reply)
        if joining:  # everyone keyed for the next round shares its keys in the `unmask` exchange
            answered = {current.sites[n] for n in upcoming_keys if n in current.sites} & set(signatures)
            upcoming = self._plan(current.number + 1, {
                n: k for n, k in upcoming_keys.items() if n in joining or current.sites.get(n) in answered
            }) if upcoming_keys else None

        unconfirmed = [s for s in survivors if s not in signatures]
        if unconfirmed:
            self.on_failure(current.number, f"secure aggregation: {unconfirmed} sent their input but did not "
                            "confirm the survivors, so their self masks cannot be removed; round skipped")
        unmask = {} if unconfirmed else {
            current.node_of(s): {"stage": "unmask", "round": current.number, "survivors": survivors,
                                 **self._confirmations(s, current.graph[s], signatures)}
            for s in survivors
        }
        if joining and upcoming is not None:
            for node in upcoming.sites:
                share = {"next-round": upcoming.number, **upcoming.share_request(node)}
                unmask[node] = unmask[node] | share if node in unmask else {
                    "stage": "share-keys", "round": upcoming.number, **upcoming.share_request(node)
                }
        seed_shares: dict[str, list[bytes]] = {}
        dropped = sorted(current.shared - set(masked))
        key_shares: dict[str, list[bytes]] = {d: [] for d in dropped}
        for node, reply in self._stage(current.number, unmask):
            for site, share in zip(reply.get("seed-sites", []), reply.get("seed-shares", []), strict=True):
                seed_shares.setdefault(str(site), []).append(bytes(share))
            for site, share in zip(reply.get("key-sites", []), reply.get("key-shares", []), strict=True):
                key_shares.setdefault(str(site), []).append(bytes(share))
            if joining and upcoming is not None and "destinations" in reply:
                upcoming.collect(node, reply)
        self._next = upcoming if upcoming is not None and upcoming.shared else None
        if unconfirmed:
            return None
        try:
            total = sa.recover_sum(current.number, masked, seed_shares, key_shares, current.pk_s,
                                   current.graph, current.threshold)
        except sa.SecAggError as exc:
            self.on_failure(current.number, f"secure aggregation: {exc}; round skipped")
            return None
        if dropped:
            log.info("round %d: secure aggregation removed the masks of %d dropped site(s)",
                     current.number, len(dropped))
        return self.rules.quantiser.dequantise_sum(total, len(masked)), len(masked)

    def _confirmations(self, site: str, neighbours: Sequence[str], signatures: Mapping[str, bytes]) -> dict:
        """The survivor confirmations `site` needs to unmask: a quorum of the roster's, and those of
        its neighbours (whose seeds it reveals only with their own confirmation); no more."""
        quorum = sorted(signatures)[: self.rules.quorum]
        signers = sorted({*quorum, *(n for n in neighbours if n in signatures), site} & set(signatures))
        return {"signers": signers, "survivor-signatures": [signatures[n] for n in signers]}

    def _stage(self, server_round: int, requests: Mapping[int, dict]) -> list[tuple[int, ConfigRecord]]:
        """Send one exchange's requests (each names its stage and round); the replies of the sites
        that answered. A failure is recorded under `server_round`, the round being run."""
        assert self._grid is not None
        if not requests:
            return []
        messages = [
            Message(RecordDict({p.SECAGG: ConfigRecord({"study": self.study, "run": self.run, **body})}),
                    dst_node_id=node, message_type=p.SECAGG_MESSAGE)
            for node, body in requests.items()
        ]
        replies = list(self._grid.send_and_receive(messages, timeout=self.timeout))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set on send
        answered = []
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                stage = requests.get(node, {}).get("stage", "stage")
                reason = f"secure aggregation {stage}: node {node}: {reply.error.reason}"
                self.on_failure(server_round, reason)
                continue
            answered.append((node, reply.content[p.SECAGG]))
        return answered
