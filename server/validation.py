"""Checks on a site's update before it may touch the global model."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

Expected = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def expected_layout(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names, shapes and dtypes of the global model the coordinator sent out."""
    return {name: (tuple(a.shape), np.dtype(a.numpy().dtype)) for name, a in arrays.items()}


def update_problem(arrays: ArrayRecord, expected: Expected) -> str:
    """Why an update must be rejected ('' if it is acceptable): wrong keys, shapes, dtypes, NaN/Inf."""
    names = set(arrays.keys())
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        return (
            f"parameter names differ from the global model (missing {missing}, unexpected {extra})"
        )
    for name, array in arrays.items():
        shape, dtype = expected[name]
        values = array.numpy()
        if tuple(values.shape) != shape:
            return f"{name}: shape {tuple(values.shape)}, expected {shape}"
        if values.dtype != dtype:
            return f"{name}: dtype {values.dtype}, expected {dtype}"
        if not np.isfinite(values).all():
            return f"{name}: contains NaN or Inf"
    return ""


def update_norm(arrays: ArrayRecord, sent: Mapping[str, np.ndarray]) -> float:
    """L2 norm of a site's update: its returned model minus the global model it was sent."""
    total = sum(
        float(np.sum(np.square(array.numpy().astype(np.float64) - sent[name])))
        for name, array in arrays.items()
    )
    return float(np.sqrt(total))


def norm_problem(arrays: ArrayRecord, sent: Mapping[str, np.ndarray], max_norm: float | None) -> str:
    """Why an update is too large to accept ('' if within the study's bound, or no bound is set).

    A bound stops a scaled (boosted) update from dominating the average; it cannot see a
    sign-flipped update of ordinary size: that is what the robust aggregators are for.
    """
    if max_norm is None:
        return ""
    norm = update_norm(arrays, sent)
    return f"update norm {norm:.4g} exceeds the study's bound {max_norm:g}" if norm > max_norm else ""


def in_layout_dtypes(arrays: ArrayRecord, expected: Expected) -> ArrayRecord:
    """The aggregate cast back to the global model's dtypes.

    FedAdam/FedYogi/FedAdagrad's update promotes float32 to float64 (NumPy 2 promotes with their
    float64 step size); sites return float32, and the next round would reject every update.
    """
    if all(np.dtype(a.numpy().dtype) == expected[k][1] for k, a in arrays.items() if k in expected):
        return arrays
    cast = {k: a.numpy().astype(expected[k][1]) if k in expected else a.numpy() for k, a in arrays.items()}
    return ArrayRecord({k: Array(v) for k, v in cast.items()})


def masked_problem(arrays: ArrayRecord | None, expected: Expected) -> str:
    """Why a masked update (secure aggregation) is malformed: one uint32 vector of the model's size
    plus its weight. Its values cannot be checked: the site bounds and checks them before masking."""
    size = sum(int(np.prod(shape)) for shape, _ in expected.values()) + 1
    if arrays is None or len(arrays) != 1:
        return "no masked update in a 'trained' reply under secure aggregation"
    values = next(iter(arrays.values())).numpy()
    if values.dtype != np.uint32 or values.shape != (size,):
        return f"masked update of dtype {values.dtype} and shape {values.shape}, expected uint32 ({size},)"
    return ""
