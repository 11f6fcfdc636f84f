"""Secure aggregation: the coordinator learns the exact sum, never a single update; drop-outs recover."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from scipy import stats

from client import secagg_masking as site_secagg
from client.app import _secagg_identity
from client.app import secure_aggregation as site_handler
from client.deploy.warm_worker import serve
from client.site import resolve_site
from client.state import SiteState
from pm_common.records.roster import Roster
from pm_common.secagg import primitives as sa
from pm_common.study.config import (
    StrategyConfig,
    StudyConfig,
    StudyConfigError,
    load_study,
    study_text_for_sites,
)
from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from server.recorder import RunRecorder
from server.secagg_unmasking import SecureAggregation
from server.strategies import build_strategy, coordinator_strategy
from simulations.runner import simulate
from tests.conftest import HEART, enroll, heart_study, site_context

_ids = itertools.count(1)


def enrolled_sites(
    tmp_path: Path, sites: int, **secure_aggregation: Any
) -> tuple[StudyConfig, dict[int, Context], Roster]:
    """`sites` real ClientApp sites (node i is `site-i`, on heart-disease rows) of a study with
    secure aggregation, enrolled in one run: each has its own ledger key and signed the roster."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    hospitals = load_study(HEART).raw["sites"]
    entries = [{"name": f"site-{i + 1}", "data": hospitals[i % len(hospitals)]["data"]} for i in range(sites)]
    settings = {"enabled": True, "max_weight": 100.0, **secure_aggregation}
    path, study = heart_study(tmp_path, entries, secure_aggregation=settings)
    contexts = {i + 1: site_context(path, partition=i) for i in range(sites)}
    return study, contexts, enroll(study, list(contexts.values()))


class Grid:
    """An in-process grid of real enrolled sites: stage messages reach the real site handler.

    `offline` maps a stage ("*": every message) to the nodes that do not answer it. `tamper`, if
    set, may rewrite each outgoing stage message's request (a hostile coordinator's relay)."""

    def __init__(self, tmp_path: Path, sites: int, **secure_aggregation: Any) -> None:
        self.study, self.contexts, self.roster = enrolled_sites(tmp_path, sites, **secure_aggregation)
        self.names = {node: f"site-{node}" for node in self.contexts}
        self.offline: dict[str, set[int]] = {}
        self.log: list[Message] = []
        self.replies: list[Message] = []  # aligned with `log`
        self.tamper: Callable[[int, ConfigRecord], ConfigRecord | None] | None = None

    @property
    def states(self) -> dict[int, RecordDict]:
        return {node: context.state for node, context in self.contexts.items()}

    def identity(self, node: int) -> site_secagg.SiteIdentity:
        """The node's enrolled identity, as its ClientApp builds it."""
        spec, store = resolve_site(self.contexts[node], self.study.name)
        state = store.load() or SiteState(study=self.study.name)
        return _secagg_identity(spec, store, state, self.roster.run)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        return [self.deliver(msg) for msg in messages]

    def deliver(self, msg: Message) -> Message:
        """One stage message to its site (tampered with first, if a tamperer is set): the reply."""
        msg.metadata.__dict__["_message_id"] = f"m{next(_ids)}"  # what Flower's grids do on push
        node = msg.metadata.dst_node_id
        if self.tamper is not None:
            tampered = self.tamper(node, msg.content[p.SECAGG])
            if tampered is not None:
                msg.content[p.SECAGG] = tampered
        self.log.append(msg)
        stage = str(msg.content[p.SECAGG]["stage"])
        if node in self.offline.get("*", set()) | self.offline.get(stage, set()):
            reply = Message(Error(code=1, reason="site went offline"), reply_to=msg)
        else:
            reply = answer(site_handler, msg, self.contexts[node])
        self.replies.append(reply)
        return reply

    def ask(self, node: int, stage: str, server_round: int, **body: Any) -> ConfigRecord | str:
        """Send `node` one stage request as a coordinator could; its reply record, or its refusal."""
        request = ConfigRecord({"study": self.roster.study, "run": self.roster.run, "stage": stage,
                                "round": server_round, **body})
        reply = self.deliver(Message(RecordDict({p.SECAGG: request}), dst_node_id=node,
                                     message_type=p.SECAGG_MESSAGE))
        return reply.error.reason if reply.has_error() else reply.content[p.SECAGG]


def answer(handler: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    """The site's reply as Flower delivers it: an exception becomes an error reply with its reason."""
    try:
        return handler(msg, context)
    except Exception as exc:  # what Flower's ClientApp runtime does with a refusal
        return Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


GLOBAL = {"w": np.zeros((3, 4), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


class Federation:
    """The real strategy wrapper and site code over `Grid`, round after round; node i is site-i.

    Sites mask their updates with the real site code (`mask_update`); training itself is skipped:
    each site's update is given."""

    def __init__(self, tmp_path: Path, sites: int, rounds: int = 1, **secure_aggregation: Any) -> None:
        self.grid = Grid(tmp_path, sites, **secure_aggregation)
        study, roster = self.grid.study, self.grid.roster
        self.recorder = RunRecorder(tmp_path / "run", study, {})
        self.config = study.secure_aggregation
        self.secure = SecureAggregation(
            self.config, self.recorder.record_failure, study=study.name, run=roster.run,
            sites=self.grid.names, study_text=study_text_for_sites(study), roster_size=len(roster.sites),
        )
        self.secure.last_round = rounds
        self.strategy = coordinator_strategy(build_strategy(StrategyConfig(), sites), self.recorder,
                                              secure=self.secure)
        self.masked: dict[int, dict[int, np.ndarray]] = {}  # round -> node -> the masked input it sent
        self.refusals: dict[int, dict[int, str]] = {}  # round -> node -> why it sent no input

    def round(
        self, server_round: int, updates: list[np.ndarray], weights: list[int], *,
        drop_before_input: Collection[int] = (), drop_in_unmask: Collection[int] = (),
        drop_before_confirming: Collection[int] = (),
        relay: Callable[[int, ConfigRecord], None] | None = None,
    ) -> ArrayRecord | None:
        """Sites send `updates` (flat deltas to GLOBAL) weighted by `weights`. Nodes in
        `drop_before_input` vanish when their training message arrives (after key sharing), those in
        `drop_before_confirming` after sending their input, those in `drop_in_unmask` after
        confirming the survivors. `relay(node, request)` may rewrite a training relay in place."""
        replies = self.train(server_round, updates, weights, drop_before_input=drop_before_input, relay=relay)
        self.grid.offline = {"*": set(drop_before_confirming), "unmask": set(drop_in_unmask)}
        aggregate, _ = self.strategy.aggregate_train(server_round, replies)
        return aggregate

    def train(
        self, server_round: int, updates: list[np.ndarray], weights: list[int], *,
        drop_before_input: Collection[int] = (), relay: Callable[[int, ConfigRecord], None] | None = None,
    ) -> list[Message]:
        """The round's key stages (where needed) and training: the sites' replies."""
        self.grid.offline = {}
        arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
        sent = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))  # type: ignore[arg-type]
        replies = []
        for msg in sent:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = f"m{next(_ids)}"
            if relay is not None:
                relay(node, msg.content[p.SECAGG])
            if node in drop_before_input:
                replies.append(Message(Error(code=1, reason="site went offline"), reply_to=msg))
                continue
            ratio = weights[node - 1] / self.config.max_weight
            vector = np.append(updates[node - 1] * ratio, ratio)
            request, state = msg.content[p.SECAGG], self.grid.states[node]
            try:
                masked, _, keys = site_secagg.mask_update(request, state, vector, self.grid.identity(node))
            except sa.SecAggError as exc:
                self.refusals.setdefault(server_round, {})[node] = str(exc)
                replies.append(Message(Error(code=1, reason=str(exc)), reply_to=msg))
                continue
            self.masked.setdefault(server_round, {})[node] = masked
            content = RecordDict({
                p.SITE: ConfigRecord({p.SITE_NAME: f"site-{node}", p.STATUS: "trained", p.REASON: ""}),
                p.TRAIN_METRICS: MetricRecord({p.NUM_EXAMPLES: weights[node - 1], "train-loss": 0.5}),
                p.MASKED: wire.packed_record({p.MASKED: masked}),
            })
            if keys:
                content[p.SECAGG] = keys
            replies.append(Message(content, reply_to=msg))
        return replies


def _round(
    tmp_path: Path, updates: list[np.ndarray], weights: list[int], *, neighbours: int = 0, **drops: Any
) -> tuple[ArrayRecord | None, RunRecorder, Grid]:
    federation = Federation(tmp_path, len(updates), neighbours=neighbours)
    aggregate = federation.round(1, updates, weights, **drops)
    return aggregate, federation.recorder, federation.grid


def stages(grid: Grid, server_round: int) -> list[str]:
    requests = [m.content[p.SECAGG] for m in grid.log]
    return [str(r["stage"]) for r in requests if int(r["round"]) == server_round]


def updates_of(sites: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, 14) for _ in range(sites)]


def _weighted_mean(updates: list[np.ndarray], weights: list[int], alive: Collection[int]) -> np.ndarray:
    return sum(updates[i] * weights[i] for i in alive) / sum(weights[i] for i in alive)


def flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([arrays[k].numpy().ravel() for k in GLOBAL])


def test_coordinator_recovers_the_weighted_mean_of_the_updates(tmp_path: Path) -> None:
    updates, weights = updates_of(5), [30, 50, 10, 80, 40]
    aggregate, recorder, _ = _round(tmp_path, updates, weights)
    assert aggregate is not None and not recorder.failures
    # float32 model, 2**29 quantisation levels over +-2: far below float32 resolution here
    np.testing.assert_allclose(flat(aggregate), _weighted_mean(updates, weights, range(5)), atol=1e-6)


def test_later_rounds_are_keyed_in_advance_and_a_returning_site_rekeys(tmp_path: Path) -> None:
    """Round 2's keys travel with round 1's training and confirmation messages (no setup stage);
    a site that missed round 2 is set up for round 3 during round 2's exchanges, at no extra
    exchange, and is back in round 3; nobody keys a round twice; every sum is right."""
    federation = Federation(tmp_path, 5, rounds=3)
    weights = [30, 50, 10, 80, 40]
    for server_round, dropped in ((1, set()), (2, {4}), (3, set())):
        updates = updates_of(5, seed=server_round)
        aggregate = federation.round(server_round, updates, weights, drop_before_input=dropped)
        assert aggregate is not None
        alive = [i for i in range(5) if i + 1 not in dropped]
        np.testing.assert_allclose(flat(aggregate), _weighted_mean(updates, weights, alive), atol=1e-6)
    grid = federation.grid
    assert stages(grid, 1) == ["setup"] * 5 + ["share-keys"] * 5 + ["survivors"] * 5 + ["unmask"] * 5
    assert stages(grid, 2) == ["survivors"] * 4 + ["unmask"] * 4  # keyed in round 1; site 4 gone
    # site 4 set up and shared round 3's keys during round 2's two exchanges
    assert stages(grid, 3) == ["setup", "share-keys"] + ["survivors"] * 5 + ["unmask"] * 5
    assert len([m for m in grid.log if m.content[p.SECAGG]["stage"] == "setup"]) == 6
    assert not any(k.startswith(site_secagg.STATE_KEY + "-r1") for k in grid.states[1])
    # a round that is over is over: no keys, no shares for it any more
    again = grid.ask(1, "setup", 1, **{"study-toml": study_text_for_sites(grid.study)})
    assert isinstance(again, str) and "round 1 is over at this site" in again


def test_sum_is_exact_after_quantisation(tmp_path: Path) -> None:
    """Inputs on the quantisation grid round to themselves: the unmasked sum is exact to the bit."""
    grid = Grid(tmp_path, 5)
    quantiser = sa.Rules.of(grid.study.secure_aggregation, 5).quantiser
    rng = np.random.default_rng(1)
    levels = [rng.integers(0, quantiser.levels, 1000) for _ in range(5)]
    grid_values = [lv * quantiser.step - quantiser.clip_range for lv in levels]
    masked = protocol(grid, grid_values)
    np.testing.assert_array_equal(recover(grid, masked), np.sum(levels, axis=0).astype(np.uint32))


@pytest.mark.parametrize(("sites", "neighbours", "before_input"), [(8, 0, {3, 7}), (12, 7, {3})])
def test_dropouts_up_to_the_threshold_are_recovered(
    tmp_path: Path, sites: int, neighbours: int, before_input: set[int]
) -> None:
    """Sites vanish after sharing keys (their pairwise masks stay in the others' inputs), and one
    after sending its input and confirming the survivors (its self mask must come from shares):
    the sum of the inputs that arrived is still exact. SecAgg (everyone a neighbour) and SecAgg+
    (a sparse graph)."""
    updates, weights = updates_of(sites, seed=2), [10 * (i + 2) for i in range(sites)]
    aggregate, recorder, _ = _round(
        tmp_path, updates, weights, drop_before_input=before_input, drop_in_unmask={5}, neighbours=neighbours
    )
    assert aggregate is not None
    alive = [i for i in range(sites) if i + 1 not in before_input]
    np.testing.assert_allclose(flat(aggregate), _weighted_mean(updates, weights, alive), atol=1e-6)
    assert sum("offline" in f for f in recorder.failures[1]) == len(before_input) + 1


def test_a_site_that_vanishes_before_confirming_the_survivors_costs_the_round(tmp_path: Path) -> None:
    """Its input arrived, but a self-mask seed is revealed only for a survivor set its own site
    confirmed: the round is skipped with the reason (the price of the consistency check)."""
    aggregate, recorder, grid = _round(tmp_path, updates_of(5), [10] * 5, drop_before_confirming={2})
    assert aggregate is None
    assert any("['site-2'] sent their input but did not confirm" in f for f in recorder.failures[1])
    assert "unmask" not in stages(grid, 1)


def test_too_many_dropouts_skip_the_round_and_say_why(tmp_path: Path) -> None:
    aggregate, recorder, _ = _round(tmp_path, updates_of(5), [10] * 5, drop_before_input={1, 2, 3})
    assert aggregate is None
    assert any("2 masked updates, 3 needed to unmask" in f for f in recorder.failures[1])


def test_a_masked_update_is_indistinguishable_from_uniform_noise(tmp_path: Path) -> None:
    """What the coordinator receives from one site passes a uniformity test whatever the update
    (all zeros or all at the clip bound); the quantised update itself fails it."""
    bins = 64
    for run, value in enumerate((0.0, 2.0)):
        grid = Grid(tmp_path / f"grid-{run}", 3)
        quantiser = sa.Rules.of(grid.study.secure_aggregation, 3).quantiser
        inputs = [np.full(50_000, value), np.zeros(50_000), np.zeros(50_000)]
        masked = protocol(grid, inputs)
        counts = np.bincount((masked[1] >> np.uint32(26)).astype(np.int64), minlength=bins)
        assert stats.chisquare(counts).pvalue > 1e-6
        plain, _ = quantiser.quantise(inputs[0], np.random.default_rng(0))
        plain_counts = np.bincount((plain >> np.uint32(26)).astype(np.int64), minlength=bins)
        assert stats.chisquare(plain_counts).pvalue < 1e-6
    # and one masked input carries no correlation with the update it hides
    update = np.linspace(-2, 2, 50_000)
    masked = protocol(Grid(tmp_path / "grid-2", 3), [update, np.zeros(50_000), np.zeros(50_000)])
    assert abs(np.corrcoef(update, masked[1].astype(np.float64))[0, 1]) < 0.03


def test_site_refuses_requests_that_would_expose_its_update(tmp_path: Path) -> None:
    grid = Grid(tmp_path, 4)
    protocol(grid, [np.zeros(8)] * 4)
    secagg, identity = site_secagg.load(grid.states[1], 1), grid.identity(1)
    with pytest.raises(sa.SecAggError, match="fewer than"):  # a "sum" of too few inputs
        site_secagg.confirm_survivors(secagg, identity, ["site-1", "site-2"])
    with pytest.raises(sa.SecAggError, match="not among the survivors"):  # its own mask key, in effect
        site_secagg.confirm_survivors(secagg, identity, ["site-2", "site-3", "site-4"])
    with pytest.raises(sa.SecAggError, match="not the survivor set this site confirmed"):
        site_secagg.unmasking_shares(secagg, identity, ["site-1", "site-2", "site-3"], [], [])
    everyone = ["site-1", "site-2", "site-3", "site-4"]
    signatures = {
        n: site_secagg.confirm_survivors(site_secagg.load(grid.states[i], 1), grid.identity(i), everyone)
        for i, n in enumerate(everyone, start=1)
    }
    site_secagg.confirm_survivors(secagg, identity, everyone)
    site_secagg.unmasking_shares(secagg, identity, everyone, list(signatures), list(signatures.values()))
    with pytest.raises(sa.SecAggError, match="already given"):
        site_secagg.unmasking_shares(secagg, identity, everyone, list(signatures), list(signatures.values()))
    rules = sa.Rules.of(grid.study.secure_aggregation, 4)
    fresh = site_secagg.setup(grid.states[1], identity, rules, 2)
    pk_c, pk_s = site_secagg.public_keys(fresh)
    keys = [site_secagg.setup(grid.states[i], grid.identity(i), rules, 2) for i in range(1, 5)]
    signed = [k.key_signature for k in keys]
    c_keys, s_keys = zip(*(site_secagg.public_keys(k) for k in keys), strict=True)
    with pytest.raises(sa.SecAggError, match="not a strict majority"):
        site_secagg.share_keys(fresh, identity, everyone, c_keys, s_keys, signed, threshold=2)
    with pytest.raises(sa.SecAggError, match="not its"):
        site_secagg.share_keys(fresh, identity, everyone, s_keys, c_keys, signed, threshold=3)
    assert (pk_c, pk_s) == (c_keys[0], s_keys[0])


def test_every_seal_draws_a_fresh_nonce_and_opens_only_in_its_context() -> None:
    """The same bundle sealed twice under one key gives unrelated ciphertexts (the fixed zero nonce
    gave two that XOR to the XOR of the plaintexts); a bundle opens only for its round and direction."""
    key, plaintext = bytes(range(32)), bytes(64)
    context = sa.share_context("run", 1, "site-1", "site-2")
    first, second = sa.seal(key, plaintext, context), sa.seal(key, plaintext, context)
    assert first[: sa.NONCE_BYTES] != second[: sa.NONCE_BYTES] and first[: sa.NONCE_BYTES] != bytes(12)
    assert first[sa.NONCE_BYTES :] != second[sa.NONCE_BYTES :]
    assert sa.unseal(key, first, context) == sa.unseal(key, second, context) == plaintext
    for other in (sa.share_context("run", 2, "site-1", "site-2"),
                  sa.share_context("run", 1, "site-2", "site-1")):
        with pytest.raises(sa.SecAggError, match="does not open"):
            sa.unseal(key, first, other)


def test_a_site_task_starts_from_the_state_its_previous_task_saved(tmp_path: Path) -> None:
    """The flaky deployment failure ("shares relayed from non-neighbours [2]" in round 2 after a
    drop-out): Flower's task sends its reply first and saves the node's Context only when it exits,
    and the next message (after a key sharing, the training relay) arrives at once; a task forked
    then read the keys from before the sharing. Played here with stand-in tasks that read the state
    when they start and save it late, on exit, as Flower's do: the warm worker's `serve` starts each
    task only once the previous one exited, so every task sees its predecessor's state."""
    state = tmp_path / "context.json"
    state.write_text("[]")

    def task(token: str) -> None:  # in the forked child
        seen = json.loads(state.read_text())  # the Context as the task pulls it at start
        time.sleep(0.3)  # the reply is out; the Context is saved on exit, a while later
        state.write_text(json.dumps([*seen, token]))
        os._exit(0)

    serve(iter(["setup", "share-keys", "train", "survivors", "unmask"]), task)
    assert json.loads(state.read_text()) == ["setup", "share-keys", "train", "survivors", "unmask"]


def test_shamir_shares_rebuild_only_from_the_threshold() -> None:
    secret = bytes(range(32))
    shares = sa.split_secret(secret, 3, 5)
    assert sa.combine_shares(shares[1:4]) == secret
    assert sa.combine_shares([shares[0], shares[4]]) != secret


def test_study_refuses_secure_aggregation_with_a_robust_aggregator(tmp_path: Path) -> None:
    with pytest.raises(StudyConfigError, match="robust aggregators inspect each update"):
        heart_study(tmp_path, strategy={"name": "median"}, secure_aggregation={"enabled": True})


def test_simulated_study_with_secure_aggregation_survives_a_dropped_site(tmp_path: Path) -> None:
    """Real Flower simulation: Switzerland vanishes in round 1 after sharing keys; the other three
    sites' sum is unmasked and the study goes on, Switzerland keyed again for round 2 meanwhile;
    no single update is ever stored. Hospital-level DP rides along: its guarantee now holds
    against the coordinator, from the sites that added noise."""
    _, study = heart_study(
        tmp_path, study={"rounds": 2}, secure_aggregation={"enabled": True},
        hospital_dp={"enabled": True, "clip_norm": 1.0, "noise_multiplier": 0.01},
        simulation={"attacks": {"switzerland": "drop-out:1"}},
    )
    metrics = simulate(study, tmp_path / "run")
    first, second = metrics["rounds"][1], metrics["rounds"][2]
    assert sorted(first["trained"]) == ["cleveland", "hungary", "va_long_beach"]
    assert any("simulated drop-out" in f for f in first["failures"])
    assert len(second["trained"]) == 4 and not second["failures"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"][2]["pooled_accuracy"] > 0.6
    assert not list((tmp_path / "run").rglob("update-*.npz"))
    hospital = json.loads((tmp_path / "run" / "privacy" / "hospital_dp.json").read_text())
    assert [r["contributing_sites"] for r in hospital["rounds"]] == [3, 4]
    assert hospital["against_the_coordinator"].startswith("holds: secure aggregation is on")


def protocol(grid: Grid, inputs: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Every site's stages of round 1 run directly (no coordinator code), every site a neighbour
    of every other: the masked inputs by node."""
    rules = sa.Rules.of(grid.study.secure_aggregation, len(grid.contexts))
    keys = {n: site_secagg.setup(grid.states[n], grid.identity(n), rules, 1) for n in grid.contexts}
    everyone = [grid.names[n] for n in grid.contexts]
    c_keys, s_keys = zip(*(site_secagg.public_keys(keys[n]) for n in grid.contexts), strict=True)
    signed = [keys[n].key_signature for n in grid.contexts]
    inbox: dict[str, list[tuple[str, bytes]]] = {name: [] for name in everyone}
    for node, state in grid.states.items():
        secagg = site_secagg.load(state, 1)
        destinations, sealed = site_secagg.share_keys(secagg, grid.identity(node), everyone, c_keys, s_keys,
                                                      signed, rules.threshold(len(everyone)))
        site_secagg.save(state, secagg)
        for destination, blob in zip(destinations, sealed, strict=True):
            inbox[destination].append((grid.names[node], blob))
    masked = {}
    for node, state in grid.states.items():
        bundles = inbox[grid.names[node]]
        quantiser = rules.quantiser
        request = ConfigRecord({
            "round": 1, "study": grid.roster.study, "run": grid.roster.run,
            "senders": [s for s, _ in bundles], "sealed": [b for _, b in bundles],
            "clip-range": quantiser.clip_range, "levels": quantiser.levels, "max-weight": rules.max_weight,
        })
        masked[node], _, _ = site_secagg.mask_update(request, state, inputs[node - 1], grid.identity(node))
    return masked


def recover(grid: Grid, masked: dict[int, np.ndarray]) -> np.ndarray:
    """Every site confirms the survivors and hands in its unmasking shares; the sum they unmask."""
    survivors = sorted(grid.names[n] for n in masked)
    signatures = {}
    for node in masked:
        secagg = site_secagg.load(grid.states[node], 1)
        signatures[grid.names[node]] = site_secagg.confirm_survivors(secagg, grid.identity(node), survivors)
        site_secagg.save(grid.states[node], secagg)
    seeds: dict[str, list[bytes]] = {}
    for node in masked:
        secagg = site_secagg.load(grid.states[node], 1)
        seed_sites, seed_shares, _, _ = site_secagg.unmasking_shares(
            secagg, grid.identity(node), survivors, list(signatures), list(signatures.values())
        )
        for site, share in zip(seed_sites, seed_shares, strict=True):
            seeds.setdefault(site, []).append(share)
    first = site_secagg.load(grid.states[1], 1)
    pk_s = dict(zip(first.neighbours, first.pk_s, strict=True))
    graph = {grid.names[n]: site_secagg.load(grid.states[n], 1).neighbours for n in grid.contexts}
    by_site = {grid.names[n]: v for n, v in masked.items()}
    return sa.recover_sum(1, by_site, seeds, {}, pk_s, graph, first.threshold)
