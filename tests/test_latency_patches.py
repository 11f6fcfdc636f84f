"""The round-latency patches of the deployed processes change timing only, never results.

Covered: the warm worker's memo of Opacus' RDP returns bit for bit what Opacus computes and passes
results from a task to the worker; the SuperNode's poll is short only for a while after a reply;
the SuperLink's sweep of expired task claims runs at most once per interval; its database sessions
queue on one re-entrant lock. (Each patch's version check and verification: tests/test_flower_patches.py;
what happens when one fails: tests/attacks/test_flower_boundary.py.)
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp

from pm_common import flower_patches as patches


def test_rdp_memo_is_bit_for_bit_opacus_and_reaches_the_parent(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    original = rdp.compute_rdp
    orders = RDPAccountant.DEFAULT_ALPHAS
    expected = {s: original(q=0.05, noise_multiplier=1.3, steps=s, orders=orders) for s in (1, 37)}
    child, parent = patches.RdpMemo(), patches.RdpMemo()
    os.close(parent.reader)
    os.close(parent.writer)
    parent.reader, parent.writer = child.reader, child.writer  # the same pipe, as after a fork
    monkeypatch.setattr(rdp, "compute_rdp", original)
    assert child.install()
    try:
        for steps, want in expected.items():
            got = rdp.compute_rdp(q=0.05, noise_multiplier=1.3, steps=steps, orders=orders)
            assert got.dtype == want.dtype and np.array_equal(got, want)
            assert got.tobytes() == want.tobytes()
        parent.receive()
        key = patches.RdpMemo.key(0.05, 1.3, orders)
        assert key is not None and parent.results[key] == [float(x) for x in expected[1]]
        # a scalar order is passed through, not remembered
        assert rdp.compute_rdp(q=0.05, noise_multiplier=1.3, steps=2, orders=2.5) == original(
            q=0.05, noise_multiplier=1.3, steps=2, orders=2.5
        )
    finally:
        rdp.compute_rdp = original
        os.close(child.reader)
        os.close(child.writer)


def test_supernode_polls_fast_only_after_a_reply(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    slept: list[float] = []
    monkeypatch.setattr(patches.time, "sleep", slept.append)
    capped = patches.CappedTime(poll=0.5, local=0.02)
    capped.sleep(3)  # idle: the configured interval
    capped.sleep(0.5)  # a local wait
    capped.replied_at = time.monotonic()
    capped.sleep(3)  # just after a reply
    capped.replied_at = time.monotonic() - patches.ACTIVE_WINDOW - 1
    capped.sleep(3)
    assert slept == [0.5, 0.02, patches.ACTIVE_POLL, 0.5]


def test_superlink_claims_sweep_runs_at_most_once_per_interval(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from flwr.supercore.corestate import sql_corestate

    calls: list[object] = []
    monkeypatch.setattr(
        sql_corestate.SqlCoreState, "_cleanup_expired_task_tokens", lambda self: calls.append(self)
    )
    patches.throttle_token_cleanup(interval=0.2)
    sweep = sql_corestate.SqlCoreState._cleanup_expired_task_tokens
    for _ in range(5):
        sweep("state")
    assert calls == ["state"]
    time.sleep(0.25)
    sweep("state")
    assert calls == ["state", "state"]


def test_superlink_database_sessions_queue_on_one_reentrant_lock(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from contextlib import contextmanager

    from flwr.supercore import sql_mixin

    inside: list[int] = []
    overlap: list[bool] = []

    @contextmanager
    def session(self):  # type: ignore[no-untyped-def]
        inside.append(1)
        overlap.append(len(inside) > 1 and self != "nested")
        try:
            yield self
        finally:
            inside.pop()

    monkeypatch.setattr(sql_mixin.SqlMixin, "session", session)
    patches.serialize_database_sessions()
    serialized = sql_mixin.SqlMixin.session

    def work() -> None:
        with serialized("outer"), serialized("nested"):  # re-entrant within a thread
            time.sleep(0.01)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert not any(overlap)
