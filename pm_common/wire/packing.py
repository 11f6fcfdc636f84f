"""How a model travels between coordinator and sites: one record of packed bytes, not one Array per tensor.

Why: Flower 1.42 moves every object of a message with its own HTTPS request to and from the
SuperLink: the message, its RecordDict, each record, and for an ArrayRecord each Array and each
Array's chunk (so a model of k tensors costs 2k + 1 objects). The SuperLink's CPU per request sets
a deployed round's pace, so a model goes as one ConfigRecord holding the tensors' bytes back to back
and their layout (names, shapes, dtypes, in order) as text: one object whatever the model, and
bit-exact for every dtype. The receiver unpacks it into the arrays Flower's strategies expect.

Also here: a model as one float64 vector (`flatten`/`unflatten`, the layout secure aggregation
masks), and the site's evaluation riding in its training-metrics record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from pm_common.wire import keys as p

Layout = Mapping[str, tuple[tuple[int, ...], np.dtype]]  # name -> shape, dtype, in the order sent


MetricValue = int | float | list[int] | list[float]
"""What a metric may be on the wire (Flower's MetricRecord values)."""

def layout_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names, shapes and dtypes of `arrays`, in their order."""
    return {name: (tuple(a.shape), np.dtype(a.dtype)) for name, a in arrays.items()}


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[bytes, str]:
    """The arrays' bytes back to back (C order) and their layout as JSON text."""
    layout = [[name, list(a.shape), np.dtype(a.dtype).str] for name, a in arrays.items()]
    data = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    return data, json.dumps(layout)


def parse_layout(text: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`pack`'s layout text back as a Layout; ValueError if it is not one."""
    try:
        rows = json.loads(text)
        layout = {str(name): (tuple(int(n) for n in shape), np.dtype(dtype)) for name, shape, dtype in rows}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unreadable array layout: {exc}") from None
    if len(layout) != len(rows):
        raise ValueError("array layout names a tensor twice")
    if any(n < 0 for shape, _ in layout.values() for n in shape) or any(
        dtype.hasobject for _, dtype in layout.values()
    ):
        raise ValueError("array layout has a negative dimension or an object dtype")
    return layout


def unpack(data: bytes, layout: Layout) -> dict[str, np.ndarray]:
    """`pack`'s inverse: the arrays of `layout` read from `data` (copies, writable).

    ValueError when `data` is not exactly as long as the layout says.
    """
    sizes = [int(np.prod(shape)) * dtype.itemsize for shape, dtype in layout.values()]
    if sum(sizes) != len(data):
        raise ValueError(f"packed arrays of {len(data)} bytes, their layout says {sum(sizes)}")
    arrays, start = {}, 0
    for (name, (shape, dtype)), size in zip(layout.items(), sizes, strict=True):
        arrays[name] = (
            np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=start).reshape(shape).copy()
        )
        start += size
    return arrays


def packed_record(arrays: Mapping[str, np.ndarray]) -> ConfigRecord:
    """The arrays as one record: one object on the wire."""
    data, layout = pack(arrays)
    return ConfigRecord({p.PACKED: data, p.LAYOUT: layout})


def record_layout(record: ConfigRecord) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The layout a packed record declares (ValueError if it declares none readable)."""
    if p.LAYOUT not in record or p.PACKED not in record:
        raise ValueError("not a packed-arrays record (no layout or no bytes)")
    return parse_layout(str(record[p.LAYOUT]))


def unpacked(record: ConfigRecord) -> dict[str, np.ndarray]:
    """The arrays of a `packed_record` (ValueError if it is malformed)."""
    packed = record[p.PACKED]
    if not isinstance(packed, bytes):
        raise ValueError("not a packed-arrays record (its bytes are not bytes)")
    return unpack(packed, record_layout(record))


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """A model's arrays as one float64 vector, in the mapping's order (the order the model was
    sent): the layout of the update a site masks."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def unflatten(vector: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """`flatten`'s inverse: the vector cut back into arrays of the layout's names, shapes and dtypes."""
    arrays, start = {}, 0
    for name, (shape, dtype) in layout.items():
        size = int(np.prod(shape))
        arrays[name] = vector[start : start + size].reshape(shape).astype(dtype)
        start += size
    return arrays


def metrics_record(
    train: Mapping[str, MetricValue], evaluation: Mapping[str, MetricValue] | None
) -> MetricRecord:
    """A site's training metrics and, when it may send them, its evaluation of the received model
    (keys prefixed EVAL_PREFIX): one record, one object on the wire."""
    merged: dict[str, MetricValue] = dict(train)
    merged.update({p.EVAL_PREFIX + k: v for k, v in (evaluation or {}).items()})
    return MetricRecord(merged)


def split_metrics(record: MetricRecord) -> tuple[dict[str, MetricValue], dict[str, MetricValue] | None]:
    """`metrics_record`'s inverse: (training metrics, evaluation or None if the site sent none)."""
    train = {k: v for k, v in record.items() if not k.startswith(p.EVAL_PREFIX)}
    evaluation = {k.removeprefix(p.EVAL_PREFIX): v for k, v in record.items() if k.startswith(p.EVAL_PREFIX)}
    return train, evaluation or None


def model_content(arrays: Mapping[str, np.ndarray], config: ConfigRecord) -> RecordDict:
    """What the sites receive: the config and the model packed into one record.

    Args:
        arrays: the model's arrays, by name, in the order sent.
        config: the message's config record.

    Returns:
        The message content.
    """
    return RecordDict({p.CONFIG: config, p.MODEL: packed_record(arrays)})


def metrics_problem(train: Mapping[str, float]) -> str:
    """Why a trained reply's metrics cannot be aggregated ('' if they can): FedAvg weighs by them."""
    return "" if p.NUM_EXAMPLES in train else f"no {p.NUM_EXAMPLES} in a 'trained' reply's metrics"
