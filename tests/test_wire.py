"""The wire format: a model packed into one record, checked on arrival, few objects per message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from client.app import app as client_app
from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from server.recorder import RunRecorder
from server.strategies import build_strategy, coordinator_strategy
from server.update_checks import unpacked_update
from tests.conftest import enroll, heart_study, site_context, train_message

MODEL = {
    "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "bn.num_batches_tracked": np.array(2**53 + 1, dtype=np.int64),  # not exact as a float64
    "empty": np.zeros((0, 5), dtype=np.float32),
    "mask": np.array([True, False, True]),
    "fc.bias": np.array([np.nan, -0.0, np.inf], dtype=np.float64),
}


def test_pack_unpack_round_trip_is_bit_exact_for_every_dtype_and_shape() -> None:
    back = wire.unpacked(wire.packed_record(MODEL))
    assert list(back) == list(MODEL)  # the order the model was sent
    for name, value in MODEL.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        assert back[name].tobytes() == value.tobytes()
        assert back[name].flags.writeable


def test_unpack_refuses_bytes_that_do_not_match_their_layout() -> None:
    record = wire.packed_record(MODEL)
    record[p.PACKED] = bytes(record[p.PACKED])[:-1]
    with pytest.raises(ValueError, match="bytes, their layout says"):
        wire.unpacked(record)
    with pytest.raises(ValueError, match="unreadable array layout"):
        wire.parse_layout('{"w": 1}')
    with pytest.raises(ValueError, match="twice"):
        wire.parse_layout('[["w", [1], "<f4"], ["w", [1], "<f4"]]')
    with pytest.raises(ValueError, match="no layout"):
        wire.unpacked(ConfigRecord({p.PACKED: b""}))


def test_evaluation_rides_in_the_metrics_record_and_comes_back_apart() -> None:
    record = wire.metrics_record({p.NUM_EXAMPLES: 10, "train-loss": 0.5}, {"accuracy": 0.75, "n": 4.0})
    assert wire.split_metrics(record) == (
        {p.NUM_EXAMPLES: 10, "train-loss": 0.5},
        {"accuracy": 0.75, "n": 4.0},
    )
    assert wire.split_metrics(wire.metrics_record({p.NUM_EXAMPLES: 10}, None))[1] is None


GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
EXPECTED = wire.layout_of(GLOBAL)


@pytest.mark.parametrize(
    ("update", "problem"),
    [
        ({"w": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)}, "w: shape (3, 2), expected (2, 3)"),
        (
            {"w": np.ones((2, 3), np.float64), "b": np.ones(3, np.float32)},
            "w: dtype float64, expected float32",
        ),
        ({"w": np.ones((2, 3), np.float32)}, "missing ['b']"),
        ({"w": np.full((2, 3), np.nan, np.float32), "b": np.ones(3, np.float32)}, "w: contains NaN or Inf"),
        ({"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}, ""),
    ],
)
def test_coordinator_says_why_a_packed_update_is_rejected(update: dict, problem: str) -> None:
    arrays, found = unpacked_update(wire.packed_record(update), EXPECTED)
    assert (problem in found) if problem else (found == "" and list(arrays) == ["w", "b"])


def test_malformed_or_missing_update_is_rejected_not_raised() -> None:
    record = wire.packed_record(GLOBAL)
    record[p.PACKED] = b"\0" * 5
    assert "malformed model update" in unpacked_update(record, EXPECTED)[1]
    assert unpacked_update(None, EXPECTED)[1] == "no model update in a 'trained' reply"


def _objects(msg: Message) -> int:
    """How many objects Flower moves for this message: one SuperLink request each way per object."""
    return len(get_all_nested_objects(msg))


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def test_a_round_moves_few_objects_per_message(tmp_path: Path, heart_sites: list) -> None:
    """Coordinator's message: Message, RecordDict, config, packed model (4, was 8 for a 2-tensor
    model); site's reply: Message, RecordDict, site, metrics with evaluation, packed model (5, was 10)."""
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 5})
    strategy = coordinator_strategy(
        build_strategy(study.strategy, 3), RunRecorder(tmp_path / "run", study, {})
    )
    arrays = ArrayRecord({k: Array(v.copy()) for k, v in GLOBAL.items()})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord({p.SERVER_ROUND: 1}), _Grid()))  # type: ignore[arg-type]
    assert [_objects(m) for m in sent] == [4, 4, 4]
    assert len({m.content.object_id for m in sent}) == 1  # pushed once for all sites
    context = site_context(path, partition=0)
    reply = client_app(train_message(study, 1, run=enroll(study, [context]).run), context)
    assert sorted(reply.content.keys()) == [p.TRAIN_METRICS, p.MODEL, p.SITE]
    assert _objects(reply) == 5


def test_strategy_aggregates_packed_replies_and_records_evaluations(tmp_path: Path) -> None:
    _, study = heart_study(tmp_path)
    recorder = RunRecorder(tmp_path / "run", study, {})
    strategy = coordinator_strategy(build_strategy(study.strategy, 3), recorder)
    arrays = ArrayRecord({k: Array(v.copy()) for k, v in GLOBAL.items()})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), _Grid()))  # type: ignore[arg-type]
    assert wire.unpacked(sent[0].content[p.MODEL]).keys() == GLOBAL.keys()
    replies = []
    for i, msg in enumerate(sent):
        model = {k: np.full_like(v, i + 1) for k, v in GLOBAL.items()}
        content = RecordDict(
            {
                p.SITE: ConfigRecord({p.SITE_NAME: f"site-{i}", p.STATUS: "trained", p.REASON: ""}),
                p.TRAIN_METRICS: wire.metrics_record(
                    {p.NUM_EXAMPLES: 1, "train-loss": 0.1}, {"accuracy": 0.5}
                ),
                p.MODEL: wire.packed_record(model),
            }
        )
        replies.append(Message(content, reply_to=msg))
    aggregate, metrics = strategy.aggregate_train(1, replies)
    assert aggregate is not None and isinstance(metrics, MetricRecord)
    np.testing.assert_allclose(aggregate["w"].numpy(), np.full((2, 3), 2.0))
    assert aggregate["w"].numpy().dtype == np.float32
    assert not any(k.startswith(p.EVAL_PREFIX) for k in metrics)  # evaluations go to the recorder
    assert recorder.evaluations[0] == {f"site-{i}": {"accuracy": 0.5} for i in range(3)}
