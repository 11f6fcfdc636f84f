"""Checks on a site's update before it may touch the global model."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from pm_common.wire.packing import Layout


def expected_layout(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names, shapes and dtypes of the global model the coordinator sent out.

    What every site's reply is checked against before it is aggregated.

    Args:
        arrays: The global model sent to the sites.

    Returns:
        Each parameter's name mapped to its shape and dtype.
    """
    return wire.layout_of({name: a.numpy() for name, a in arrays.items()})


def layout_problem(layout: Layout, expected: Layout) -> str:
    """Why arrays of `layout` cannot be an update of the `expected` model ('' if they can).

    Args:
        layout: The layout a site's update has (or declares).
        expected: The global model's layout (`expected_layout`).

    Returns:
        The first problem found (names, then each parameter's shape and dtype), or ''.
    """
    if set(layout) != set(expected):
        missing, extra = sorted(set(expected) - set(layout)), sorted(set(layout) - set(expected))
        return (
            f"parameter names differ from the global model (missing {missing}, unexpected {extra})"
        )
    for name, (shape, dtype) in layout.items():
        want_shape, want_dtype = expected[name]
        if tuple(shape) != tuple(want_shape):
            return f"{name}: shape {tuple(shape)}, expected {tuple(want_shape)}"
        if dtype != want_dtype:
            return f"{name}: dtype {dtype}, expected {want_dtype}"
    return ""


def update_problem(arrays: Mapping[str, np.ndarray], expected: Layout) -> str:
    """Why an update must be rejected ('' if it is acceptable): wrong keys, shapes, dtypes, NaN/Inf.

    Args:
        arrays: The site's update, by parameter name.
        expected: The global model's layout.

    Returns:
        The first problem found, or ''.
    """
    if problem := layout_problem(wire.layout_of(arrays), expected):
        return problem
    for name, values in arrays.items():
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"{name}: contains NaN or Inf"
    return ""


def unpacked_update(
    record: ConfigRecord | None, expected: Layout, what: str = "model update"
) -> tuple[dict[str, np.ndarray], str]:
    """A site's packed update (pm_common/wire/packing.py) as arrays, and why it must be rejected ('' if it is
    acceptable).

    The layout the site declares is checked before its bytes are read, so a wrong shape or dtype is
    reported as such rather than as a length mismatch. Never raises on a malformed record: a bad
    reply is a site's problem to report, not a reason to stop the round.

    Args:
        record: The reply's packed record; None when the reply carried none.
        expected: The global model's layout.
        what: What the record is, for the message.

    Returns:
        The arrays (empty when rejected before unpacking) and the reason to reject them, or ''.
    """
    if record is None:
        return {}, f"no {what} in a 'trained' reply"
    try:
        layout = wire.record_layout(record)
        problem = layout_problem(layout, expected)
        arrays = {} if problem else wire.unpack(bytes(record[p.PACKED]), layout)
    except (TypeError, ValueError) as exc:
        return {}, f"malformed {what}: {exc}"
    return arrays, problem or update_problem(arrays, expected)


def update_norm(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    """L2 norm of a site's update: its returned model minus the global model it was sent.

    Args:
        arrays: The site's returned model, by parameter name.
        sent: The global model it was sent, by parameter name.

    Returns:
        The norm, computed in float64.
    """
    total = sum(
        float(np.sum(np.square(np.asarray(array, dtype=np.float64) - sent[name])))
        for name, array in arrays.items()
    )
    return float(np.sqrt(total))


def norm_problem(
    arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], max_norm: float | None
) -> str:
    """Why an update is too large to accept ('' if within the study's bound, or no bound is set).

    A bound stops a scaled (boosted) update from dominating the average; it cannot see a
    sign-flipped update of ordinary size: that is what the robust aggregators are for.

    Args:
        arrays: The site's returned model.
        sent: The global model it was sent.
        max_norm: The study's bound on the update's L2 norm; None for no bound.

    Returns:
        The reason to reject the update, or ''.
    """
    if max_norm is None:
        return ""
    norm = update_norm(arrays, sent)
    return f"update norm {norm:.4g} exceeds the study's bound {max_norm:g}" if norm > max_norm else ""


def in_layout_dtypes(arrays: ArrayRecord, expected: Layout) -> ArrayRecord:
    """The aggregate cast back to the global model's dtypes.

    FedAdam/FedYogi/FedAdagrad's update promotes float32 to float64 (NumPy 2 promotes with their
    float64 step size); sites return float32, and the next round would reject every update.

    Args:
        arrays: The aggregated model.
        expected: The global model's layout.

    Returns:
        `arrays` itself when its dtypes already match, else a copy cast to the expected dtypes.
    """
    if all(np.dtype(a.numpy().dtype) == expected[k][1] for k, a in arrays.items() if k in expected):
        return arrays
    cast = {k: a.numpy().astype(expected[k][1]) if k in expected else a.numpy() for k, a in arrays.items()}
    return ArrayRecord({k: Array(v) for k, v in cast.items()})


def masked_layout(expected: Layout) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The layout of a masked update (secure aggregation): one uint32 vector of the model's size plus its
    weight.

    Its values cannot be checked: the site bounds and checks them before masking.

    Args:
        expected: The global model's layout.

    Returns:
        The layout a masked reply must have.
    """
    size = sum(int(np.prod(shape)) for shape, _ in expected.values()) + 1
    return {p.MASKED: ((size,), np.dtype(np.uint32))}
