"""`flower-superlink` whose Control and Runtime APIs answer this host only; the Fleet API answers all.

Why: Flower 1.42 serves three APIs on one HTTPS port: the Fleet API (`/v1/fleet/...`, the only one
SuperNodes use), the Control API (`/v1/control/...`: submit and stop runs, register SuperNode keys,
read logs; the open-source SuperLink has no user authentication for it) and the Runtime API
(`/v1/runtime/...`: the coordinator's ServerApp and SuperExec). It has no setting to bind them
apart: `--control-api-address` is deprecated and only used by a legacy gRPC server that an internal
variable (`FLWR_INTERNAL_GRPC_CONTROL_API`) starts, while the same routes stay on the shared port.
With `--host 0.0.0.0` anyone who reaches the port could register a key of their own, or run code on
the coordinator by submitting a ServerApp. This launcher adds one ASGI middleware to the app that
Flower builds (`flwr.superlink.main.create_app`) and then runs Flower's own `flower-superlink`
unchanged: a request outside `/v1/fleet/` from another host gets 403.

"This host": a loopback peer, or a peer with the address the connection arrived at (a process here
that dialed one of the machine's own addresses). A reverse proxy on this host would make every
request local: put the proxy's own path filter in front instead.

Round latency: every object of every message is its own HTTPS request (~140 per round with three
sites), and the SuperLink's CPU per request set the pace of a round. Two changes to how Flower's
SQL state runs, each with its reason at its function: database transactions queue on a lock in
the process instead of sleeping in SQLite's busy handler (`serialize_database_sessions`), and the
sweep of expired task claims runs once a second instead of on every request
(`throttle_token_cleanup`). `PMFL_TRACE_REQUESTS=FILE` logs each request's timing (`RequestTrace`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PREFIX = "/v1/fleet/"  # what SuperNodes call; everything else is for this host's processes
TRACE_ENV = "PMFL_TRACE_REQUESTS"  # a file: one JSON line per request (benchmarks/deploy_latency.py)
SERIAL_DB_ENV = "PMFL_SUPERLINK_SERIAL_DB"  # "0": Flower's own database sessions
CLEANUP_ENV = "PMFL_SUPERLINK_THROTTLE_CLEANUP"  # "0": Flower's sweep of expired claims on every call


class LocalOnlyOutsideFleet:
    """ASGI middleware: 403 for non-Fleet requests from other hosts; everything else passes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PREFIX) or is_local(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "this API answers the coordinator's own host only"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RequestTrace:
    """ASGI middleware, opt-in (`PMFL_TRACE_REQUESTS=FILE`): one JSON line per request with its start
    (wall clock), duration, path, status and caller (a SuperNode's key digest, or the component
    name a Runtime API client sends).

    Why: a round is ~130 small HTTPS requests; where its time goes is only visible per request.
    Nothing of a request's body is written.
    """

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app = app
        self.out = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives with the app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, wall, status = time.perf_counter(), time.time(), [0]

        async def traced_send(event: MutableMapping[str, Any]) -> None:
            if event["type"] == "http.response.start":
                status[0] = int(event["status"])
            await send(event)

        try:
            await self.app(scope, receive, traced_send)
        finally:
            line = {
                "t": round(wall, 4),
                "dur": round(time.perf_counter() - started, 5),
                "path": scope["path"],
                "status": status[0],
                "who": _caller(scope),
                "port": (scope.get("client") or (None, None))[1],
            }
            self.out.write(json.dumps(line) + "\n")


def _caller(scope: Scope) -> str:
    headers = dict(scope.get("headers") or [])
    if key := headers.get(b"flwr-public-key"):
        return "node:" + hashlib.sha256(key).hexdigest()[:8]
    return headers.get(b"flwr-component-name", b"?").decode("latin-1")


def is_local(scope: Scope) -> bool:
    """Whether the request's peer is this host (see the module docstring)."""
    peer, own = _address(scope.get("client")), _address(scope.get("server"))
    if peer is None:
        return False  # a peer without an IP address (e.g. a Unix socket) is not trusted blindly
    return peer.is_loopback or peer == own


def _address(endpoint: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(endpoint[0])
    except (TypeError, IndexError, ValueError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def patch_create_app() -> bool:
    """Make Flower's SuperLink app factory add the middleware; False if this Flower has none."""
    from flwr.superlink import main as superlink_main

    create_app = getattr(superlink_main, "create_app", None)
    if not callable(create_app):
        return False

    def create_local_only_app(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)
        app.add_middleware(LocalOnlyOutsideFleet)
        if trace := os.environ.get(TRACE_ENV):
            app.add_middleware(RequestTrace, path=trace)
        return app

    superlink_main.create_app = create_local_only_app  # type: ignore[attr-defined]
    return True


def serialize_database_sessions() -> bool:
    """Let one thread at a time run a transaction on the SuperLink's database; False if this
    Flower has no `SqlMixin.session` to wrap.

    Why: the SuperLink answers requests from a pool of threads, and each request runs one or more
    SQLite transactions. When several SuperNodes push and pull objects at once, their writers meet
    SQLite's file lock, whose busy handler sleeps 1, 2, 5, ... up to 100 ms between tries: a
    request that needed 5 ms waited 100-500 ms (traced). A lock in the process makes them queue
    instead, each woken the moment the previous transaction ends. Re-entrant: Flower nests
    sessions (one per database scope) within a request's thread.
    """
    import threading
    from contextlib import contextmanager

    from flwr.supercore import sql_mixin

    session = getattr(getattr(sql_mixin, "SqlMixin", None), "session", None)
    if session is None or getattr(session, "_pmfl_serialized", False):
        return session is not None
    lock = threading.RLock()

    @contextmanager
    def serialized(self: Any) -> Any:
        with lock, session(self) as active:
            yield active

    serialized._pmfl_serialized = True  # type: ignore[attr-defined]
    sql_mixin.SqlMixin.session = serialized  # type: ignore[method-assign]
    return True


TOKEN_CLEANUP_INTERVAL = 1.0  # seconds between Flower's sweeps of expired task claims


def throttle_token_cleanup(interval: float = TOKEN_CLEANUP_INTERVAL) -> bool:
    """Run Flower's sweep of expired task claims at most every `interval` seconds; False if this
    Flower has no such sweep.

    Why: the SQL state runs `_cleanup_expired_task_tokens` (two UPDATEs, a write transaction) at
    the start of nearly every request, including every object a SuperNode pushes or pulls:
    a quarter of the SuperLink's CPU in a round (profiled), and one more writer for SQLite's lock
    each time. What it does is housekeeping on a scale of tens of seconds (a task whose heartbeat
    stopped is failed, a launch that never started is retried, with the time it expired as its
    finish time), and a token's validity does not depend on it: `get_task_by_token` checks the
    claim's expiry itself. Sweeping once a second makes such a transition visible up to a second
    later; nothing else changes.
    """
    import threading

    from flwr.supercore.corestate import sql_corestate

    state = getattr(sql_corestate, "SqlCoreState", None)
    cleanup = getattr(state, "_cleanup_expired_task_tokens", None)
    if state is None or cleanup is None:
        return False
    if getattr(cleanup, "_pmfl_throttled", False):
        return True
    lock, last = threading.Lock(), [-float("inf")]

    def throttled(self: Any) -> None:
        with lock:
            now = time.monotonic()
            if now - last[0] < interval:
                return
            last[0] = now
        cleanup(self)

    throttled._pmfl_throttled = True  # type: ignore[attr-defined]
    state._cleanup_expired_task_tokens = throttled
    return True


def main() -> None:
    import sys

    from flwr.superlink.cli.flower_superlink import flower_superlink

    if not patch_create_app():
        sys.exit("this Flower version's SuperLink has no app factory to restrict; refusing to start")
    if os.environ.get(SERIAL_DB_ENV, "1") != "0" and not serialize_database_sessions():
        print("warning: this Flower version's database sessions are not the expected ones")
    if os.environ.get(CLEANUP_ENV, "1") != "0" and not throttle_token_cleanup():
        print("warning: this Flower version has no sweep of expired task claims to throttle")
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
