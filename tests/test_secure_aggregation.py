"""Secure aggregation: the coordinator learns the exact sum, never a single update; drop-outs recover."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from scipy import stats

from client import secure_aggregation as site_secagg
from client.app import secure_aggregation as site_handler
from pm_common import protocol as p
from pm_common import secure_aggregation as sa
from pm_common import wire
from pm_common.config import SecureAggregationConfig, StrategyConfig, StudyConfigError
from server.recorder import RunRecorder
from server.secure_aggregation import SecureAggregation
from server.strategy import SiteReportingStrategy, build_strategy
from simulations.runner import simulate
from tests.conftest import heart_study

_ids = itertools.count(1)


class _Grid:
    """An in-process grid: stage messages reach the real site handler; nodes in `down` are offline."""

    def __init__(self, sites: int) -> None:
        self.states = {node: RecordDict() for node in range(1, sites + 1)}
        self.down: set[int] = set()
        self.log: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.states)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(_ids)}"  # what Flower's grids do on push
            self.log.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.down:
                replies.append(Message(Error(code=1, reason="site went offline"), reply_to=msg))
                continue
            context = Context(run_id=1, node_id=node, node_config={}, state=self.states[node], run_config={})
            replies.append(site_handler(msg, context))
        return replies


GLOBAL = {"w": np.zeros((3, 4), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


class _Federation:
    """The real strategy wrapper and site code over `_Grid`, round after round; node i+1 is site i."""

    def __init__(self, tmp_path: Path, sites: int, rounds: int = 1, **config: object) -> None:
        _, study = heart_study(tmp_path)
        self.recorder = RunRecorder(tmp_path / "run", study, {})
        self.config = SecureAggregationConfig(enabled=True, max_weight=100.0, **config)  # type: ignore[arg-type]
        self.grid = _Grid(sites)
        secure = SecureAggregation(self.config, self.recorder.record_failure)
        secure.last_round = rounds
        inner = build_strategy(StrategyConfig(), sites)
        self.strategy = SiteReportingStrategy(inner, self.recorder, secure=secure)

    def round(
        self, server_round: int, updates: list[np.ndarray], weights: list[int], *,
        drop_before_input: set[int] = frozenset(), drop_in_unmask: set[int] = frozenset(),
    ) -> ArrayRecord | None:
        """Sites send `updates` (flat deltas to GLOBAL) weighted by `weights`."""
        self.grid.down = set()
        arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
        sent = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))  # type: ignore[arg-type]
        replies = []
        for msg in sent:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = f"m{next(_ids)}"
            if node in drop_before_input:
                replies.append(Message(Error(code=1, reason="site went offline"), reply_to=msg))
                continue
            ratio = weights[node - 1] / self.config.max_weight
            vector = np.append(updates[node - 1] * ratio, ratio)
            masked, _, keys = site_secagg.mask_update(msg.content[p.SECAGG], self.grid.states[node], vector)
            content = RecordDict({
                p.SITE: ConfigRecord({p.SITE_NAME: f"site-{node}", p.STATUS: "trained", p.REASON: ""}),
                p.TRAIN_METRICS: MetricRecord({p.NUM_EXAMPLES: weights[node - 1], "train-loss": 0.5}),
                p.MASKED: wire.packed_record({p.MASKED: masked}),
            })
            if keys:
                content[p.SECAGG] = keys
            replies.append(Message(content, reply_to=msg))
        self.grid.down = set(drop_in_unmask)
        aggregate, _ = self.strategy.aggregate_train(server_round, replies)
        return aggregate


def _round(
    tmp_path: Path, updates: list[np.ndarray], weights: list[int], *,
    drop_before_input: set[int] = frozenset(), drop_in_unmask: set[int] = frozenset(), neighbours: int = 0,
) -> tuple[ArrayRecord | None, RunRecorder, _Grid]:
    federation = _Federation(tmp_path, len(updates), neighbours=neighbours)
    aggregate = federation.round(
        1, updates, weights, drop_before_input=drop_before_input, drop_in_unmask=drop_in_unmask
    )
    return aggregate, federation.recorder, federation.grid


def _stages(grid: _Grid, server_round: int) -> list[str]:
    requests = [m.content[p.SECAGG] for m in grid.log]
    return [str(r["stage"]) for r in requests if int(r["round"]) == server_round]


def _updates(sites: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, 14) for _ in range(sites)]


def _weighted_mean(updates: list[np.ndarray], weights: list[int], alive: list[int]) -> np.ndarray:
    return sum(updates[i] * weights[i] for i in alive) / sum(weights[i] for i in alive)


def _flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([arrays[k].numpy().ravel() for k in GLOBAL])


def test_coordinator_recovers_the_weighted_mean_of_the_updates(tmp_path: Path) -> None:
    updates, weights = _updates(5), [30, 50, 10, 80, 40]
    aggregate, recorder, _ = _round(tmp_path, updates, weights)
    assert aggregate is not None and not recorder.failures
    # float32 model, 2**29 quantisation levels over +-2: far below float32 resolution here
    np.testing.assert_allclose(_flat(aggregate), _weighted_mean(updates, weights, range(5)), atol=1e-6)


def test_later_rounds_are_keyed_in_advance_and_a_returning_site_rekeys(tmp_path: Path) -> None:
    """Round 2's keys travel with round 1's training and unmasking messages (no setup stage);
    a site that missed round 2 is back in round 3, which is keyed afresh; every sum is right."""
    federation = _Federation(tmp_path, 5, rounds=3)
    weights = [30, 50, 10, 80, 40]
    for server_round, dropped in ((1, set()), (2, {4}), (3, set())):
        updates = _updates(5, seed=server_round)
        aggregate = federation.round(server_round, updates, weights, drop_before_input=dropped)
        assert aggregate is not None
        alive = [i for i in range(5) if i + 1 not in dropped]
        np.testing.assert_allclose(_flat(aggregate), _weighted_mean(updates, weights, alive), atol=1e-6)
    assert _stages(federation.grid, 1) == ["setup"] * 5 + ["share-keys"] * 5 + ["unmask"] * 5
    assert _stages(federation.grid, 2) == ["unmask"] * 4  # keyed in round 1; site 4 gone
    assert _stages(federation.grid, 3) == ["setup"] * 5 + ["share-keys"] * 5 + ["unmask"] * 5
    assert not any(k.startswith(site_secagg.STATE_KEY + "-r1") for k in federation.grid.states[1])


def test_sum_is_exact_after_quantisation() -> None:
    """Inputs on the quantisation grid round to themselves: the unmasked sum is exact to the bit."""
    quantiser = sa.Quantiser.for_sites(2.0, 5)
    rng = np.random.default_rng(1)
    levels = [rng.integers(0, quantiser.levels, 1000) for _ in range(5)]
    grid_values = [lv * quantiser.step - quantiser.clip_range for lv in levels]
    states, masked = _protocol(grid_values, quantiser)
    total = _recover(states, masked, dropped=[])
    np.testing.assert_array_equal(total, np.sum(levels, axis=0).astype(np.uint32))


@pytest.mark.parametrize(("sites", "neighbours", "before_input"), [(8, 0, {3, 7}), (12, 7, {3})])
def test_dropouts_up_to_the_threshold_are_recovered(
    tmp_path: Path, sites: int, neighbours: int, before_input: set[int]
) -> None:
    """Sites vanish after sharing keys (their pairwise masks stay in the others' inputs), and one
    after sending its input (its self mask must come from shares): the sum of the inputs that
    arrived is still exact. SecAgg (everyone a neighbour) and SecAgg+ (a sparse graph)."""
    updates, weights = _updates(sites, seed=2), [10 * (i + 2) for i in range(sites)]
    aggregate, recorder, _ = _round(
        tmp_path, updates, weights, drop_before_input=before_input, drop_in_unmask={5}, neighbours=neighbours
    )
    assert aggregate is not None
    alive = [i for i in range(sites) if i + 1 not in before_input]
    np.testing.assert_allclose(_flat(aggregate), _weighted_mean(updates, weights, alive), atol=1e-6)
    assert sum("offline" in f for f in recorder.failures[1]) == len(before_input) + 1


def test_too_many_dropouts_skip_the_round_and_say_why(tmp_path: Path) -> None:
    aggregate, recorder, _ = _round(tmp_path, _updates(5), [10] * 5, drop_before_input={1, 2, 3})
    assert aggregate is None
    assert any("2 masked updates, 3 needed to unmask" in f for f in recorder.failures[1])


def test_a_masked_update_is_indistinguishable_from_uniform_noise() -> None:
    """What the coordinator receives from one site passes a uniformity test whatever the update
    (all zeros or all at the clip bound); the quantised update itself fails it."""
    quantiser = sa.Quantiser.for_sites(2.0, 3)
    bins = 64
    for value in (0.0, 2.0):
        inputs = [np.full(50_000, value), np.zeros(50_000), np.zeros(50_000)]
        _, masked = _protocol(inputs, quantiser)
        counts = np.bincount((masked[1] >> np.uint32(26)).astype(np.int64), minlength=bins)
        assert stats.chisquare(counts).pvalue > 1e-6
        plain, _ = quantiser.quantise(inputs[0], np.random.default_rng(0))
        plain_counts = np.bincount((plain >> np.uint32(26)).astype(np.int64), minlength=bins)
        assert stats.chisquare(plain_counts).pvalue < 1e-6
    # and one masked input carries no correlation with the update it hides
    update = np.linspace(-2, 2, 50_000)
    _, masked = _protocol([update, np.zeros(50_000), np.zeros(50_000)], quantiser)
    assert abs(np.corrcoef(update, masked[1].astype(np.float64))[0, 1]) < 0.03


def test_site_refuses_requests_that_would_expose_its_update() -> None:
    quantiser = sa.Quantiser.for_sites(2.0, 4)
    states, _ = _protocol([np.zeros(8)] * 4, quantiser)
    secagg = site_secagg.load(states[1], 1)
    with pytest.raises(sa.SecAggError, match="fewer than the threshold"):
        site_secagg.unmasking_shares(secagg, active=[1, 2], dropped=[3, 4])
    with pytest.raises(sa.SecAggError, match="own mask key"):
        site_secagg.unmasking_shares(secagg, active=[2, 3, 4], dropped=[1])
    with pytest.raises(sa.SecAggError, match="both active and dropped"):
        site_secagg.unmasking_shares(secagg, active=[1, 2, 3], dropped=[3])
    site_secagg.unmasking_shares(secagg, active=[1, 2, 3, 4], dropped=[])
    with pytest.raises(sa.SecAggError, match="already given"):
        site_secagg.unmasking_shares(secagg, active=[1, 2, 3, 4], dropped=[])
    fresh = site_secagg.setup(2)
    pk_c, pk_s = site_secagg.public_keys(fresh)
    with pytest.raises(sa.SecAggError, match="not a strict majority"):
        site_secagg.share_keys(fresh, 1, [1, 2, 3, 4], [pk_c] * 4, [pk_s] * 4, threshold=2)
    with pytest.raises(sa.SecAggError, match="not this site's"):
        site_secagg.share_keys(fresh, 1, [1, 2, 3], [pk_s] * 3, [pk_c] * 3, threshold=2)


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
    sites' sum is unmasked and the study goes on; no single update is ever stored. Hospital-level
    DP rides along: its guarantee now holds against the coordinator, from the sites that added noise."""
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


def _protocol(inputs: list[np.ndarray], quantiser: sa.Quantiser) -> tuple[dict[int, RecordDict], dict]:
    """Every site's stages run directly (no coordinator code): states and masked inputs by index."""
    n = len(inputs)
    states = {i: RecordDict() for i in range(1, n + 1)}
    keys = {}
    for i, state in states.items():
        secagg = site_secagg.setup(1)
        keys[i] = site_secagg.public_keys(secagg)
        site_secagg.save(state, secagg)
    graph = sa.neighbourhoods(n, 0, random.Random(0))
    threshold = sa.reconstruction_threshold(0.6, n)
    inbox: dict[int, list[tuple[int, bytes]]] = {i: [] for i in states}
    for i, state in states.items():
        secagg = site_secagg.load(state, 1)
        nb = graph[i]
        dst, sealed = site_secagg.share_keys(secagg, i, nb, [keys[j][0] for j in nb],
                                             [keys[j][1] for j in nb], threshold)
        site_secagg.save(state, secagg)
        for d, s in zip(dst, sealed, strict=True):
            inbox[d].append((i, s))
    masked = {}
    for i, state in states.items():
        senders = [s for s, _ in inbox[i]]
        request = ConfigRecord({"round": 1, "senders": senders, "sealed": [b for _, b in inbox[i]],
                                "clip-range": quantiser.clip_range, "levels": quantiser.levels})
        masked[i], _, _ = site_secagg.mask_update(request, state, inputs[i - 1])
    return states, masked


def _recover(states: dict[int, RecordDict], masked: dict, dropped: list[int]) -> np.ndarray:
    from server.secure_aggregation import recover_sum

    seeds: dict[int, list[bytes]] = {}
    keys: dict[int, list[bytes]] = {}
    for i in masked:
        secagg = site_secagg.load(states[i], 1)
        seed_nodes, seed_shares, key_nodes, key_shares = site_secagg.unmasking_shares(secagg, sorted(masked),
                                                                                     dropped)
        for node, share in zip(seed_nodes, seed_shares, strict=True):
            seeds.setdefault(node, []).append(share)
        for node, share in zip(key_nodes, key_shares, strict=True):
            keys.setdefault(node, []).append(share)
    secagg = site_secagg.load(states[1], 1)
    pk_s = dict(zip(secagg.neighbours, secagg.pk_s, strict=True))
    graph = {i: site_secagg.load(states[i], 1).neighbours for i in states}
    return recover_sum(1, masked, seeds, keys, pk_s, graph, secagg.threshold)
