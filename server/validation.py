"""Checks on a site's update before it may touch the global model."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord

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
