"""Every change pmfl makes to Flower's internals (and one to Opacus'), in one place.

Why they exist: Flower 1.42 serves its Control and Runtime APIs to whoever reaches the SuperLink's
port, and its deployment waits in fixed steps that make a round of tabular training take 14 s
(measured: 3 s polls, a cold `flwr-clientapp` per message). Flower has no setting for either, so
pmfl replaces a few attributes of Flower's modules inside the processes pmfl starts. Patching
internals is a last resort; this module is where it is done, and nowhere else.

Each patch: its name, the process it runs in, what it replaces (Flower 1.42.0 unless said), its kind
and how to run without it.
- `superlink-local-only`, SuperLink: `flwr.superlink.main.create_app`, and `uvicorn` as
  `flwr.superlink.cli.flower_superlink` sees it. **Security**: no switch (`pmfl coordinator start
  --remote-control` runs Flower's own `flower-superlink` instead, which restricts nothing).
- `superlink-serial-db`, SuperLink: `flwr.supercore.sql_mixin.SqlMixin.session`. Performance;
  `PMFL_SUPERLINK_SERIAL_DB=0`.
- `superlink-throttle-cleanup`, SuperLink: `SqlCoreState._cleanup_expired_task_tokens`. Performance;
  `PMFL_SUPERLINK_THROTTLE_CLEANUP=0`.
- `supernode-loop`, SuperNode: `time`, `_push_messages` and `pull_objects` of
  `flwr.supernode.start_client_internal`. Performance; site.toml's `[connection] poll_interval` of 3
  or more (or none) runs Flower's own `flower-supernode`.
- `grid-content-retries`, ServerApp (deployed): `pull_objects` of `flwr.superlink.grid.http_grid`.
  Performance; `PMFL_GRID_FAST_RETRIES=0` where the coordinator starts.
- `simulation-pull-interval`, ServerApp (simulated): `pull_interval` of Flower's `InMemoryGrid`.
  Performance; `PMFL_SIMULATION_FAST_PULL=0`.
- `clientapp-task`, each ClientApp task of the site's warm worker: `get_load_client_app_fn`,
  `pull_and_inflate_object_from_tree`, `pull_task_input`, `install_from_fab` of
  `flwr.supernode.runtime.run_clientapp`. Performance; `PMFL_GATE_WARM=0`.
- `opacus-rdp-memo`, the warm worker: `opacus.accountants.analysis.rdp.compute_rdp` (Opacus 1.6.0).
  Performance; `PMFL_GATE_WARM=0`.

The measurements behind each, in short (the A/B runs are in docs/deployment.md, Round latency):
- `superlink-local-only`: Flower serves the Fleet API (`/v1/fleet/`, all SuperNodes use), the
  Control API (`/v1/control/`: submit and stop runs, register SuperNode keys, read logs; no user
  authentication in the open-source SuperLink) and the Runtime API (`/v1/runtime/`: the coordinator's
  ServerApp and SuperExec) on one port, and has no setting to bind them apart
  (`--control-api-address` only feeds a legacy gRPC server). With `--host 0.0.0.0` anyone who reaches
  the port could register a key or run code on the coordinator as a ServerApp. The patch adds one
  ASGI middleware, outermost before Flower's own: a request outside `/v1/fleet/` from another host
  gets 403. A guard on the server call serves no app the patched factory did not build and verify.
- `superlink-serial-db`: concurrent requests met SQLite's file lock and slept in its busy handler
  (1, 2, 5 ... 100 ms): 5 ms requests took 100-500 ms (traced).
- `superlink-throttle-cleanup`: the sweep of expired task claims (two UPDATEs, a write transaction)
  ran on nearly every request: a quarter of the SuperLink's CPU in a round (profiled).
- `supernode-loop`: a 3 s sleep after every empty pull (a message waits 1.5 s on average per round and
  site), 0.5 s steps while waiting for the local ClientApp, content retries after 1 s, 2 s, ...
- `grid-content-retries`: the ServerApp's retries of reply contents still uploading, after 1 s, 2 s ...
- `simulation-pull-interval`: the simulated ServerApp looked for replies every 0.1 s: rounds took
  0.306 s, 0.101 s at 0.01 s.
- `clientapp-task`: each task retried the local pull after 1 s, 2 s, ... while the SuperNode was still
  receiving the message, and unpacked and hashed the app bundle it had installed before (~40 ms of
  CPU per task); the loader is timed for the benchmarks' log.
- `opacus-rdp-memo`: one DP-SGD step's RDP at 151 orders costs ~0.1 s of CPU (0.3 s on a busy
  machine), recomputed by every forked task for the same mechanism.

For each patch: the library version it was written for is checked against the installed one
(`flwr.__version__`, `opacus.__version__`); then the targets are checked (they exist, take the
arguments the patch passes, and are what the code that uses them looks up: a module global that no
function of the module reads any more would make a replacement silently useless); then it is
applied; then it is verified (the replaced attributes are pmfl's, on every class that uses them; for
the security patch, an app built by the patched factory has the middleware outermost, and a request
from another host to that app's middleware stack gets the middleware's 403). Anything that fails
raises `PatchError` with a one-line reason, and the process that needed the patch stops with it.

Fail closed, for every patch, performance ones included: a patch that cannot be applied or verified
stops its process. The security patch has no switch: the SuperLink never starts without it (only
`--remote-control`, which does not run pmfl's launcher at all, serves Flower's own app). A
performance patch refuses too, because a silently unpatched process would not be wrong but would
be slower than everything pmfl documents and measures, and would hide that Flower changed under
pmfl; but each one may be switched off explicitly (the settings above; each variable "0" switches
its patch off), and its refusal names that switch. Switched off, the process runs Flower's own code
for that part.

Import rules: this module imports only the standard library at module level, and nothing of pmfl.
`client/deploy/warm_worker.py` loads this file by path under a private module name before it forks tasks
that load the study app's own `client`/`server`/`pm_common` from the approved app bundle; the
SuperLink launcher, the SuperNode launcher, the gate, the grid and the ServerApp import it as
`pm_common.flower_patches`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import inspect
import ipaddress
import json
import os
import threading
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

_CLIENTAPP_REPLACED = (
    "get_load_client_app_fn",
    "pull_and_inflate_object_from_tree",
    "pull_task_input",
    "install_from_fab",
)
FLOWER_VERSION = "1.42.0"  # every Flower patch below was written for, and checked against, this
OPACUS_VERSION = "1.6.0"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class PatchError(RuntimeError):
    """A patch could not be applied or verified: the process that needed it must not go on."""


REFUSED_EXIT = 78  # exit status of a helper process that refused to start (EX_CONFIG): not a crash to retry


@dataclass(frozen=True)
class Patch:
    """One change to a library's internals: where, for which version, and how to run without it."""

    name: str
    process: str  # the process it is applied in
    library: str  # the distribution whose internals it changes
    written_for: str  # the version of `library` it was written and checked for
    targets: tuple[str, ...]  # what it replaces
    security: bool = False
    switch_env: str | None = None  # "0" switches it off (performance patches only)
    switch: str = ""  # how to run without it, in words (for the refusal)

    def enabled(self) -> bool:
        """Whether this process should apply the patch (a security patch always does)."""
        return self.security or self.switch_env is None or os.environ.get(self.switch_env, "1") != "0"

    def refusal(self, reason: str) -> PatchError:
        """The one-line error that stops the process, naming the switch where there is one."""
        how = f"; to run Flower's own code instead, {self.switch}" if self.switch else ""
        return PatchError(" ".join(f"{self.name}: {reason}{how}".split()))


SUPERLINK_LOCAL_ONLY = Patch(
    "superlink-local-only",
    "SuperLink",
    "flwr",
    FLOWER_VERSION,
    ("flwr.superlink.main.create_app", "flwr.superlink.cli.flower_superlink.uvicorn"),
    security=True,
)
SUPERLINK_SERIAL_DB = Patch(
    "superlink-serial-db",
    "SuperLink",
    "flwr",
    FLOWER_VERSION,
    ("flwr.supercore.sql_mixin.SqlMixin.session",),
    switch_env="PMFL_SUPERLINK_SERIAL_DB",
    switch="set PMFL_SUPERLINK_SERIAL_DB=0",
)
SUPERLINK_THROTTLE_CLEANUP = Patch(
    "superlink-throttle-cleanup",
    "SuperLink",
    "flwr",
    FLOWER_VERSION,
    ("flwr.supercore.corestate.sql_corestate.SqlCoreState._cleanup_expired_task_tokens",),
    switch_env="PMFL_SUPERLINK_THROTTLE_CLEANUP",
    switch="set PMFL_SUPERLINK_THROTTLE_CLEANUP=0",
)
SUPERNODE_LOOP = Patch(
    "supernode-loop",
    "SuperNode",
    "flwr",
    FLOWER_VERSION,
    tuple(f"flwr.supernode.start_client_internal.{n}" for n in ("time", "_push_messages", "pull_objects")),
    switch="set [connection] poll_interval = 3 (or remove it) in site.toml",
)
GRID_CONTENT_RETRIES = Patch(
    "grid-content-retries",
    "ServerApp",
    "flwr",
    FLOWER_VERSION,
    ("flwr.superlink.grid.http_grid.pull_objects",),
    switch_env="PMFL_GRID_FAST_RETRIES",
    switch="set PMFL_GRID_FAST_RETRIES=0 where the coordinator starts",
)
SIMULATION_PULL_INTERVAL = Patch(
    "simulation-pull-interval",
    "ServerApp",
    "flwr",
    FLOWER_VERSION,
    ("flwr.superlink.grid.inmemory_grid.InMemoryGrid.pull_interval",),
    switch_env="PMFL_SIMULATION_FAST_PULL",
    switch="set PMFL_SIMULATION_FAST_PULL=0",
)
CLIENTAPP_TASK = Patch(
    "clientapp-task",
    "ClientApp task",
    "flwr",
    FLOWER_VERSION,
    tuple(f"flwr.supernode.runtime.run_clientapp.{n}" for n in _CLIENTAPP_REPLACED),
    switch_env="PMFL_GATE_WARM",
    switch="set PMFL_GATE_WARM=0 for the site (a cold flwr-clientapp per task)",
)
OPACUS_RDP_MEMO = Patch(
    "opacus-rdp-memo",
    "warm worker",
    "opacus",
    OPACUS_VERSION,
    ("opacus.accountants.analysis.rdp.compute_rdp",),
    switch_env="PMFL_GATE_WARM",
    switch="set PMFL_GATE_WARM=0 for the site (a cold flwr-clientapp per task)",
)
CATALOGUE: tuple[Patch, ...] = (
    SUPERLINK_LOCAL_ONLY,
    SUPERLINK_SERIAL_DB,
    SUPERLINK_THROTTLE_CLEANUP,
    SUPERNODE_LOOP,
    GRID_CONTENT_RETRIES,
    SIMULATION_PULL_INTERVAL,
    CLIENTAPP_TASK,
    OPACUS_RDP_MEMO,
)


# -- checks shared by every patch --------------------------------------------------------------


def check_version(patch: Patch) -> None:
    """Refuse unless the installed library is the version `patch` was written for.

    Raises:
        PatchError: another version (or the library is missing).
    """
    try:
        module = __import__(patch.library)
    except ImportError as exc:
        raise patch.refusal(f"{patch.library} is not installed") from exc
    found = getattr(module, "__version__", None)
    if found != patch.written_for:
        raise patch.refusal(
            f"written for {patch.library} {patch.written_for}, but {patch.library} {found} is installed"
        )


def _global_names(module: types.ModuleType) -> set[str]:
    """Every name the functions and methods defined in `module` look up (code objects' co_names)."""
    names: set[str] = set()

    def walk(code: types.CodeType) -> None:
        names.update(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const)

    for value in vars(module).values():
        members = vars(value).values() if isinstance(value, type) else (value,)
        for member in members:
            function = getattr(member, "__func__", member)
            function = getattr(function, "__wrapped__", function)
            code = getattr(function, "__code__", None)
            if isinstance(code, types.CodeType) and getattr(function, "__module__", None) == module.__name__:
                walk(code)
    return names


def _require_used(patch: Patch, module: types.ModuleType, names: tuple[str, ...]) -> None:
    """Refuse unless each of `names` is a callable attribute of `module` that its code looks up."""
    for name in names:
        if not hasattr(module, name):
            raise patch.refusal(f"{module.__name__} has no {name}")
    unused = set(names) - _global_names(module)
    if unused:
        raise patch.refusal(f"{module.__name__} no longer uses {', '.join(sorted(unused))}")


def _require_keywords(patch: Patch, function: Any, keywords: tuple[str, ...], where: str) -> None:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError) as exc:
        raise patch.refusal(f"{where} has no readable signature") from exc
    missing = [k for k in keywords if k not in parameters]
    if missing:
        raise patch.refusal(f"{where} takes no {', '.join(missing)}")


def _mark(function: Any, patch: Patch) -> Any:
    function._pmfl_patch = patch.name
    return function


def _is_ours(value: Any, patch: Patch) -> bool:
    return getattr(value, "_pmfl_patch", None) == patch.name


def _with_retries(patch: Patch, function: Any, initial: float, cap: float) -> Any:
    """`function` with sooner retries of unavailable contents (Flower: 1 s, doubling up to 10 s)."""
    if isinstance(function, functools.partial) and _is_ours(function, patch):
        return function
    _require_keywords(patch, function, ("initial_backoff", "backoff_cap"), getattr(function, "__name__", "?"))
    return _mark(functools.partial(function, initial_backoff=initial, backoff_cap=cap), patch)


# -- superlink-local-only (security) ------------------------------------------------------------

OPEN_PREFIX = "/v1/fleet/"  # what SuperNodes call; everything else is for this host's processes
REFUSAL_DETAIL = "this API answers the coordinator's own host only"
_PROBE_PEER, _PROBE_OWN = ("192.0.2.1", 40000), ("192.0.2.2", 8000)  # TEST-NET-1: never this host


class LocalOnlyOutsideFleet:
    """ASGI middleware: 403 for non-Fleet requests from other hosts; everything else passes.

    "This host": a loopback peer, or a peer with the address the connection arrived at (a process here
    that dialed one of the machine's own addresses). A reverse proxy on this host would make every
    request local: put the proxy's own path filter in front instead.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PREFIX) or is_local(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": REFUSAL_DETAIL}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def is_local(scope: Scope) -> bool:
    """Whether the request's peer is this host (see `LocalOnlyOutsideFleet`)."""
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


class RequestTrace:
    """ASGI middleware, opt-in (`PMFL_TRACE_REQUESTS=FILE`): one JSON line per request with its start
    (wall clock), duration, path, status and caller (a SuperNode's key digest, or the component
    name a Runtime API client sends).

    Why: a round is ~80 small HTTPS requests; where its time goes is only visible per request.
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


_VERIFIED_APPS: weakref.WeakSet[Any] = weakref.WeakSet()  # apps built by the patched factory, verified


class _ServeGuard(types.ModuleType):
    """`uvicorn` as `flower_superlink` sees it: serves only an app this module built and verified.

    Why: the factory patch only works while Flower builds its app through
    `flwr.superlink.main.create_app`. If it built the app any other way, the SuperLink would start
    without the middleware; this guard stops it at the last moment before the port opens.
    """

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__(real.__name__)
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def run(self, app: Any, *args: Any, **kwargs: Any) -> Any:
        if app not in _VERIFIED_APPS:
            raise SUPERLINK_LOCAL_ONLY.refusal(
                "Flower is about to serve an app that pmfl's factory did not build, so the Control and "
                "Runtime APIs would answer every host"
            )
        _verify_middleware_order(app)
        return self._real.run(app, *args, **kwargs)


def protect_superlink(trace_path: str | None = None) -> None:
    """Make every SuperLink app this process serves answer the Control and Runtime APIs to this
    host only (the `superlink-local-only` patch); call before `flower_superlink()`.

    Args:
        trace_path: also log every request to this file (`RequestTrace`), or None.

    Raises:
        PatchError: another Flower version, or its factory or server is not the expected one. The
            patched factory raises it too, while Flower builds its app, if the middleware cannot be
            attached or does not answer a request from another host with 403.
    """
    patch = SUPERLINK_LOCAL_ONLY
    check_version(patch)
    superlink_main = importlib.import_module("flwr.superlink.main")
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module, not its function

    create_app = getattr(superlink_main, "create_app", None)
    if not callable(create_app):
        raise patch.refusal("flwr.superlink.main has no create_app to build the SuperLink's app with")
    if "create_app" not in _global_names(cli):
        raise patch.refusal("flower-superlink no longer builds its app with flwr.superlink.main.create_app")
    server = getattr(cli, "uvicorn", None)
    if not callable(getattr(server, "run", None)):
        raise patch.refusal("flower-superlink no longer serves its app with uvicorn.run")
    if not _is_ours(create_app, patch):

        def create_local_only_app(*args: Any, **kwargs: Any) -> Any:
            app = create_app(*args, **kwargs)
            try:
                app.add_middleware(LocalOnlyOutsideFleet)
            except Exception as exc:  # Starlette: "Cannot add middleware after an application has started"
                raise patch.refusal(f"Flower's app did not accept the local-only middleware ({exc})") from exc
            _verify_local_only(app)
            if trace_path:
                app.add_middleware(RequestTrace, path=trace_path)
            _verify_middleware_order(app)
            _VERIFIED_APPS.add(app)
            return app

        superlink_main.create_app = _mark(create_local_only_app, patch)
    if not isinstance(server, _ServeGuard):
        cli.uvicorn = _ServeGuard(server)  # type: ignore[assignment]
    if not (_is_ours(superlink_main.create_app, patch) and isinstance(cli.uvicorn, _ServeGuard)):
        raise patch.refusal("the factory or the server guard did not stay in place")


def _verify_middleware_order(app: Any) -> None:
    """The local-only middleware is in the app's stack, before (outside) every middleware of Flower's."""
    classes = [getattr(m, "cls", None) for m in getattr(app, "user_middleware", [])]
    if LocalOnlyOutsideFleet not in classes:
        raise SUPERLINK_LOCAL_ONLY.refusal("the local-only middleware is not in the SuperLink app's stack")
    outside = classes[: classes.index(LocalOnlyOutsideFleet)]
    if any(cls is not RequestTrace for cls in outside):
        raise SUPERLINK_LOCAL_ONLY.refusal("a middleware of Flower's runs before the local-only middleware")


def _verify_local_only(app: Any) -> None:
    """Send a Control API request from another host through the app's own middleware stack (as
    uvicorn will build it): it must come back 403 from the local-only middleware."""
    _verify_middleware_order(app)
    try:
        stack = app.build_middleware_stack()  # not stored: the app can still take middleware
        status, body = asyncio.run(_probe(stack, "/v1/control/list-runs"))
    except Exception as exc:
        raise SUPERLINK_LOCAL_ONLY.refusal(f"the SuperLink app could not be probed ({exc})") from exc
    if status != 403 or REFUSAL_DETAIL not in body:
        raise SUPERLINK_LOCAL_ONLY.refusal(
            f"a Control API request from another host got {status}, not the local-only middleware's 403"
        )


async def _probe(app: ASGIApp, path: str) -> tuple[int, str]:
    sent: list[MutableMapping[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/protobuf")],
        "client": _PROBE_PEER,
        "server": _PROBE_OWN,
        "state": {},
    }

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(event: MutableMapping[str, Any]) -> None:
        sent.append(event)

    await app(scope, receive, send)
    status = next((int(e["status"]) for e in sent if e["type"] == "http.response.start"), 0)
    body = b"".join(e.get("body", b"") for e in sent if e["type"] == "http.response.body")
    return status, body.decode("utf-8", "replace")


# -- superlink-serial-db, superlink-throttle-cleanup (performance) ------------------------------


def serialize_database_sessions() -> None:
    """Let one thread at a time run a transaction on the SuperLink's database.

    Why: the SuperLink answers requests from a pool of threads, and each request runs one or more
    SQLite transactions. When several SuperNodes push and pull objects at once, their writers meet
    SQLite's file lock, whose busy handler sleeps 1, 2, 5, ... up to 100 ms between tries: a
    request that needed 5 ms waited 100-500 ms (traced). A lock in the process makes them queue
    instead, each woken the moment the previous transaction ends. Re-entrant: Flower nests
    sessions (one per database scope) within a request's thread.

    Raises:
        PatchError: another Flower version, no `SqlMixin.session`, or a database class that
            overrides it (the patch would not reach it).
    """
    patch = SUPERLINK_SERIAL_DB
    check_version(patch)
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    sql_mixin = importlib.import_module("flwr.supercore.sql_mixin")
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore

    mixin = getattr(sql_mixin, "SqlMixin", None)
    session = getattr(mixin, "session", None)
    if mixin is None or not callable(session):
        raise patch.refusal("flwr.supercore.sql_mixin.SqlMixin has no session()")
    if not _is_ours(session, patch):
        lock = threading.RLock()

        @contextlib.contextmanager
        def serialized(self: Any) -> Iterator[Any]:
            with lock, session(self) as active:
                yield active

        mixin.session = _mark(serialized, patch)
    for cls in (SqlLinkState, SqlObjectStore):
        if not _is_ours(getattr(cls, "session", None), patch):
            raise patch.refusal(f"{cls.__name__} does not open its sessions through SqlMixin.session")


TOKEN_CLEANUP_INTERVAL = 1.0  # seconds between Flower's sweeps of expired task claims


def throttle_token_cleanup(interval: float = TOKEN_CLEANUP_INTERVAL) -> None:
    """Run Flower's sweep of expired task claims at most every `interval` seconds.

    Why: the SQL state runs `_cleanup_expired_task_tokens` (two UPDATEs, a write transaction) at
    the start of nearly every request, including every object a SuperNode pushes or pulls:
    a quarter of the SuperLink's CPU in a round (profiled), and one more writer for SQLite's lock
    each time. What it does is housekeeping on a scale of tens of seconds (a task whose heartbeat
    stopped is failed, a launch that never started is retried, with the time it expired as its
    finish time), and a token's validity does not depend on it: `get_task_by_token` checks the
    claim's expiry itself. Sweeping once a second makes such a transition visible up to a second
    later; nothing else changes.

    Raises:
        PatchError: another Flower version, no such sweep, or the link state overrides it.
    """
    patch = SUPERLINK_THROTTLE_CLEANUP
    check_version(patch)
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    sql_corestate = importlib.import_module("flwr.supercore.corestate.sql_corestate")

    state = getattr(sql_corestate, "SqlCoreState", None)
    cleanup = getattr(state, "_cleanup_expired_task_tokens", None)
    if state is None or not callable(cleanup):
        raise patch.refusal("SqlCoreState has no _cleanup_expired_task_tokens")
    if not _is_ours(cleanup, patch):
        lock, last = threading.Lock(), [-float("inf")]

        def throttled(self: Any) -> None:
            with lock:
                now = time.monotonic()
                if now - last[0] < interval:
                    return
                last[0] = now
            cleanup(self)

        state._cleanup_expired_task_tokens = _mark(throttled, patch)
    if not _is_ours(getattr(SqlLinkState, "_cleanup_expired_task_tokens", None), patch):
        raise patch.refusal("SqlLinkState does not sweep through SqlCoreState._cleanup_expired_task_tokens")


# -- supernode-loop (performance) -----------------------------------------------------------------

LOCAL_WAIT = 0.02  # seconds between looks at the SuperNode's local store (Flower: 0.5)
ACTIVE_POLL, ACTIVE_WINDOW = 0.1, 5.0  # seconds: the poll interval for a while after each reply
SUPERNODE_RETRY_START, SUPERNODE_RETRY_CAP = 0.05, 1.0  # seconds, retries of unavailable contents
_NETWORK_SLEEP = 1.0  # Flower's loop sleeps 3 s before its next pull, 0.5 s on local waits


class CappedTime(types.ModuleType):
    """The `time` module as seen by the SuperNode's main loop, with its sleeps capped.

    - the idle poll (sleeps of 1 s or more: a network request each) is capped at `poll` seconds;
    - for `ACTIVE_WINDOW` seconds after the site sent a reply it polls every `ACTIVE_POLL` seconds:
      the next round's message comes a fraction of a second after the last site's reply, and with
      the idle interval each site picked it up up to a whole interval late (a round waits for its
      last site: with three sites and 0.5 s, 0.375 s on average). That costs a few more requests
      per round while a study runs, none while the site is idle;
    - the local waits (shorter sleeps: no network) are capped at `local` seconds.
    """

    def __init__(self, poll: float, local: float) -> None:
        super().__init__("time")
        self._poll = poll
        self._local = local
        self.replied_at = -float("inf")  # time.monotonic() when the site last sent a reply

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds < _NETWORK_SLEEP:
            cap = self._local
        elif time.monotonic() - self.replied_at < ACTIVE_WINDOW:
            cap = min(self._poll, ACTIVE_POLL)
        else:
            cap = self._poll
        time.sleep(min(seconds, cap))


def patch_supernode_loop(poll: float, local: float = LOCAL_WAIT) -> CappedTime:
    """Cap the SuperNode loop's idle poll at `poll` and its local waits at `local` seconds, poll
    sooner for a while after each reply, and retry unavailable contents from 0.05 s on.

    Why: `flwr.supernode.start_client_internal` sleeps 3 s whenever a pull from the SuperLink finds
    no message (a message that arrives meanwhile waits 1.5 s on average per round and site),
    0.5 s between looks at its own store for the ClientApp's reply, and retries a message's
    contents after 1 s, 2 s, ... when they are not on the SuperLink yet (common: the ServerApp
    uploads them just after the message). None of these has a flag.

    Args:
        poll: the idle poll, seconds (site.toml's `[connection] poll_interval`).
        local: the cap on local waits, seconds.

    Returns:
        The loop's new `time` (its `replied_at` is set at each reply).

    Raises:
        PatchError: another Flower version, or the loop does not look these names up.
    """
    patch = SUPERNODE_LOOP
    check_version(patch)
    loop = importlib.import_module("flwr.supernode.start_client_internal")

    if isinstance(getattr(loop, "time", None), CappedTime):
        return loop.time  # applied (and verified) in this process already
    _require_used(patch, loop, ("time", "_push_messages", "pull_objects"))
    if loop.time is not time:
        raise patch.refusal("the loop's time is not the time module")
    capped = CappedTime(poll, local)
    push_messages = loop._push_messages

    def push_and_note(*args: Any, **kwargs: Any) -> None:
        try:
            push_messages(*args, **kwargs)
        finally:
            capped.replied_at = time.monotonic()

    pull = _with_retries(patch, loop.pull_objects, SUPERNODE_RETRY_START, SUPERNODE_RETRY_CAP)
    loop.time = capped  # type: ignore[attr-defined]
    loop._push_messages = _mark(push_and_note, patch)  # type: ignore[attr-defined]
    loop.pull_objects = pull  # type: ignore[attr-defined]
    replaced = (loop._push_messages, loop.pull_objects)
    if loop.time is not capped or not all(_is_ours(function, patch) for function in replaced):
        raise patch.refusal("the loop's time, _push_messages or pull_objects did not stay replaced")
    return capped


# -- grid-content-retries, simulation-pull-interval (performance, ServerApp) ---------------------

GRID_RETRY_START, GRID_RETRY_CAP = 0.05, 1.0  # seconds, retries of reply contents still uploading


def fast_grid_content_retries() -> None:
    """Make Flower's HttpGrid retry unavailable reply contents from 0.05 s on (this process only).

    Why: the SuperLink lists a site's reply as soon as the site has sent the message, before its
    contents are uploaded, and the HttpGrid then retries the contents after 1 s, 2 s, ...
    (`pull_objects`, PULL_INITIAL_BACKOFF): with replies collected every 0.1 s, that second was a
    round's largest fixed wait. No-op when `PMFL_GRID_FAST_RETRIES=0`.

    Raises:
        PatchError: another Flower version, or the HttpGrid does not pull contents this way.
    """
    patch = GRID_CONTENT_RETRIES
    if not patch.enabled():
        return
    check_version(patch)
    http_grid = importlib.import_module("flwr.superlink.grid.http_grid")

    _require_used(patch, http_grid, ("pull_objects",))
    http_grid.pull_objects = _with_retries(patch, http_grid.pull_objects, GRID_RETRY_START, GRID_RETRY_CAP)
    if not _is_ours(http_grid.pull_objects, patch):
        raise patch.refusal("http_grid.pull_objects did not stay replaced")


def set_simulation_pull_interval(grid: Any, seconds: float) -> None:
    """Have Flower's in-memory grid look for simulated replies every `seconds` (Flower: 0.1 s).

    Why: every exchange of a simulated round waited up to 0.1 s for replies that were ready in a
    few ms: the default study's rounds took 0.306 s, 0.101 s at 0.01 s. No-op when
    `PMFL_SIMULATION_FAST_PULL=0`.

    Raises:
        PatchError: another Flower version, or the grid does not wait by `pull_interval`.
    """
    patch = SIMULATION_PULL_INTERVAL
    if not patch.enabled():
        return
    check_version(patch)
    inmemory_grid = importlib.import_module("flwr.superlink.grid.inmemory_grid")

    if not isinstance(getattr(grid, "pull_interval", None), (int, float)):
        raise patch.refusal(f"{type(grid).__name__} has no numeric pull_interval")
    if "pull_interval" not in _global_names(inmemory_grid):
        raise patch.refusal("InMemoryGrid no longer waits by its pull_interval")
    grid.pull_interval = seconds
    if grid.pull_interval != seconds:
        raise patch.refusal("the grid's pull_interval did not stay set")


# -- clientapp-task, opacus-rdp-memo (performance, the site's warm worker) ----------------------

TASK_RETRY_START, TASK_RETRY_CAP = 0.02, 0.05  # seconds: retries of contents not yet at the SuperNode
_CLIENTAPP_NAMES = ("get_load_client_app_fn", "pull_task_input", "install_from_fab", "get_project_dir")


def check_clientapp_task() -> None:
    """Check, without changing anything, that `patch_clientapp_task` will apply (the gate and the
    warm worker call this before any task, so a site never starts with tasks that would fail).

    Raises:
        PatchError: another Flower version, or `run_clientapp` is not the expected one.
    """
    patch = CLIENTAPP_TASK
    check_version(patch)
    inflatable_utils = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
    flower = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    if not callable(getattr(flower, "run_clientapp", None)):
        raise patch.refusal(f"{flower.__name__} has no run_clientapp")
    if _is_ours(getattr(flower, "install_from_fab", None), patch):
        return  # applied (and verified) in this process already
    _require_used(patch, flower, (*_CLIENTAPP_NAMES, "pull_and_inflate_object_from_tree"))
    pull = flower.pull_and_inflate_object_from_tree
    if isinstance(pull, functools.partial):
        pull = pull.func
    if pull is not inflatable_utils.pull_and_inflate_object_from_tree:
        raise patch.refusal("run_clientapp's pull_and_inflate_object_from_tree is not Flower's")
    _require_keywords(patch, pull, ("initial_backoff", "backoff_cap"), "pull_and_inflate_object_from_tree")
    _require_keywords(patch, flower.install_from_fab, ("skip_prompt",), "install_from_fab")
    _require_keywords(patch, flower.get_project_dir, ("fab_id", "fab_version", "fab_hash"), "get_project_dir")


class TimedApp:
    """The loaded ClientApp, timed: the log then tells the app's own work from the task's overhead
    (`[clientapp] app ... s`, read by benchmarks/deploy_latency.py)."""

    def __init__(self, app: Any, log: Callable[[str], None]) -> None:
        self.app = app
        self.log = log

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started, wall = time.monotonic(), time.time()
        try:
            return self.app(*args, **kwargs)
        finally:
            self.log(f"[clientapp] app {time.monotonic() - started:.3f} s from {wall:.3f}")


def patch_clientapp_task(log: Callable[[str], None]) -> types.ModuleType:
    """In a forked ClientApp task only: time the app, retry local contents sooner, and load an
    installed app bundle without unpacking it again.

    Why: the task often starts while the SuperNode is still receiving the message's contents, and
    Flower then retries the local pull after 1 s, 2 s, ... (retries from 0.02 s instead, a few
    more requests on loopback). And for every task Flower's `install_from_fab` unpacks the bundle
    into a temporary folder and hashes each file, then, when the app's folder already exists,
    returns that folder and discards what it unpacked: the code that runs is the installed one
    either way. Skipping the unpacking when that folder exists (named by the bundle's hash, which
    the SuperNode checked against the run and the gate against the site's approval) loads exactly
    the same code, ~40 ms of CPU sooner per task. A bundle not installed yet goes through Flower's
    checks unchanged.

    Args:
        log: where the app's timing line goes (the task's stderr).

    Returns:
        Flower's `run_clientapp` module, patched: call its `run_clientapp`.

    Raises:
        PatchError: as `check_clientapp_task`, or a replacement did not stay in place.
    """
    patch = CLIENTAPP_TASK
    check_clientapp_task()
    flower = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    if _is_ours(flower.install_from_fab, patch):
        return flower
    loader, pull, install = flower.get_load_client_app_fn, flower.pull_task_input, flower.install_from_fab
    runs: list[Any] = []

    def timed_loader(*args: Any, **kwargs: Any) -> Any:
        load = loader(*args, **kwargs)
        return lambda *a: TimedApp(load(*a), log)

    def pull_and_note(*args: Any, **kwargs: Any) -> Any:
        message, context, run, fab = pull(*args, **kwargs)
        runs.append(run)
        return message, context, run, fab

    def install_unless_installed(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        if runs and isinstance(fab_file, bytes):
            digest = hashlib.sha256(fab_file).hexdigest()
            installed = flower.get_project_dir(runs[-1].fab_id, runs[-1].fab_version, digest)
            if installed.is_dir():
                return installed
        return install(fab_file, *args, **kwargs)

    flower.get_load_client_app_fn = _mark(timed_loader, patch)
    flower.pull_and_inflate_object_from_tree = _with_retries(
        patch, flower.pull_and_inflate_object_from_tree, TASK_RETRY_START, TASK_RETRY_CAP
    )
    flower.pull_task_input = _mark(pull_and_note, patch)
    flower.install_from_fab = _mark(install_unless_installed, patch)
    if not all(_is_ours(getattr(flower, name), patch) for name in _CLIENTAPP_REPLACED):
        raise patch.refusal("run_clientapp's functions did not stay replaced")
    return flower


class RdpMemo:
    """Opacus' `compute_rdp`, remembered across tasks: a task reports what it computed to the warm
    worker, and the next task, forked from it, finds the result.

    Why: the privacy accounting computes the RDP of one DP-SGD step at 151 orders, about 0.1 s of
    CPU (more on a busy machine), for the same sampling rate and noise every round; a forked task
    keeps nothing, so every round paid it again. The result is the one the task computed (exact
    floats), so every epsilon is bit for bit what it was. Only Opacus' own function is wrapped;
    the app's code is never loaded in the warm worker.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self.results: dict[tuple[Any, ...], list[float]] = {}
        self.max_entries = max_entries
        self.reader, self.writer = os.pipe()
        self._buffer = b""

    def install(self) -> bool:
        """Wrap `opacus.accountants.analysis.rdp.compute_rdp`; False (nothing to do) without Opacus.

        Raises:
            PatchError: another Opacus version, or `compute_rdp` is not the expected one.
        """
        patch = OPACUS_RDP_MEMO
        try:
            from opacus.accountants import rdp as accountant
            from opacus.accountants.analysis import rdp
        except ImportError:
            return False  # a leaner site image: nothing computes RDP in this process's children
        check_version(patch)
        compute = rdp.compute_rdp
        if _is_ours(compute, patch):
            return True
        _require_keywords(patch, compute, ("q", "noise_multiplier", "steps", "orders"), "compute_rdp")
        if getattr(accountant, "privacy_analysis", None) is not rdp:
            raise patch.refusal("Opacus' RDP accountant no longer computes through analysis.rdp")

        @functools.wraps(compute)
        def remembered(*, q: float, noise_multiplier: float, steps: int, orders: Any) -> Any:
            key = self.key(q, noise_multiplier, orders)
            if key is None:
                return compute(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
            if key not in self.results:
                one_step = compute(q=q, noise_multiplier=noise_multiplier, steps=1, orders=orders)
                self.results[key] = [float(x) for x in one_step]
                self.report(key)
            import numpy as np

            return np.array(self.results[key]) * steps  # Opacus: (one step at each order) * steps

        rdp.compute_rdp = _mark(remembered, patch)
        if not _is_ours(rdp.compute_rdp, patch):
            raise patch.refusal("compute_rdp did not stay replaced")
        return True

    @staticmethod
    def key(q: Any, noise_multiplier: Any, orders: Any) -> tuple[Any, ...] | None:
        """Plain numbers only (a list of orders, as every caller passes); else not remembered."""
        if not isinstance(orders, (list, tuple)):
            return None
        values = (q, noise_multiplier, *orders)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return None
        return tuple(float(v) for v in values)

    def in_child(self) -> None:
        """In a forked task: never block on the parent (a full pipe drops a result, nothing else)."""
        os.close(self.reader)
        os.set_blocking(self.writer, False)

    def report(self, key: tuple[Any, ...]) -> None:
        """In a task: send a new result to the parent (exact: repr of a float round-trips)."""
        with contextlib.suppress(OSError):  # the parent stopped: nothing to remember it for
            line = json.dumps([list(key), self.results[key]]).encode() + b"\n"
            os.write(self.writer, line)

    def receive(self) -> None:
        """In the parent: take in what tasks reported."""
        self._buffer += os.read(self.reader, 65536)
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError, TypeError):  # a line cut short by a full pipe
                key, result = json.loads(line)
                if len(result) == len(key) - 2 and len(self.results) < self.max_entries:
                    self.results[tuple(float(v) for v in key)] = [float(x) for x in result]
