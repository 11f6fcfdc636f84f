"""pm_common/flower_patches.py: each patch checks its version, applies, and verifies itself in-process.

Covered: the catalogue (a version per patch, a switch for every performance patch and none for the
security one); the local-only middleware's notion of "this host"; the SuperLink app built through
the patched factory carries the middleware outermost and answers another host with 403, and the
server guard serves no other app; another Flower version stops every patch before it changes
anything; the warm worker loads the patches by path without importing pmfl's packages. Real
processes, and what happens when a patch fails there: tests/attacks/test_flower_boundary.py.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import flwr
import pytest

from pm_common import flower_patches as patches

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "client" / "deploy" / "warm_worker.py"


def test_catalogue_names_a_version_and_a_way_out_for_each_patch() -> None:
    import opacus

    assert len({p.name for p in patches.CATALOGUE}) == len(patches.CATALOGUE)
    installed = {"flwr": flwr.__version__, "opacus": opacus.__version__}
    for patch in patches.CATALOGUE:
        assert patch.written_for == installed[patch.library], patch.name
        assert bool(patch.switch) != patch.security, patch.name  # performance: a switch; security: none
    assert [p.name for p in patches.CATALOGUE if p.security] == ["superlink-local-only"]


def _status(path: str, peer: str, own: str = "10.0.0.5") -> tuple[int, list[str]]:
    passed: list[str] = []
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        passed.append(scope["path"])

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "client": (peer, 40000), "server": (own, 8000)}
    asyncio.run(patches.LocalOnlyOutsideFleet(app)(scope, None, send))  # type: ignore[arg-type]
    return (sent[0]["status"] if sent else 200), passed


def test_local_only_middleware_knows_this_host() -> None:
    remote = "192.0.2.7"
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/acquire-task", "/docs"):
        assert _status(path, remote)[0] == 403, path
        for local in ("127.0.0.1", "::1", "10.0.0.5", "::ffff:10.0.0.5"):  # or this host's own address
            assert _status(path, local) == (200, [path]), (path, local)
    assert _status("/v1/fleet/pull-messages", remote) == (200, ["/v1/fleet/pull-messages"])
    assert _status("/v1/control/list-runs", "not-an-address")[0] == 403  # no IP: not trusted


@pytest.fixture
def superlink_modules(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, types.ModuleType]:
    """Flower's SuperLink factory and CLI modules, restored after the test."""
    main = importlib.import_module("flwr.superlink.main")
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    monkeypatch.setattr(main, "create_app", main.create_app)
    monkeypatch.setattr(cli, "uvicorn", cli.uvicorn)
    return main, cli


def test_patched_factory_builds_an_app_that_refuses_other_hosts(superlink_modules, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fastapi import FastAPI

    main, cli = superlink_modules
    patches.protect_superlink(trace_path=str(tmp_path / "trace.jsonl"))
    patches.protect_superlink()  # idempotent
    app = main.create_app()  # Flower's own app (in-memory state), through the patched factory
    classes = [m.cls for m in app.user_middleware]
    assert classes[:2] == [patches.RequestTrace, patches.LocalOnlyOutsideFleet]  # outside all of Flower's
    assert len(classes) > 2 and app in patches._VERIFIED_APPS
    status, body = asyncio.run(patches._probe(app, "/v1/runtime/acquire-task"))  # the app as served
    assert status == 403 and json.loads(body)["detail"] == patches.REFUSAL_DETAIL
    served: list[object] = []
    real = types.ModuleType("uvicorn")
    real.run = lambda app, **kwargs: served.append(app)  # type: ignore[attr-defined]
    guard = patches._ServeGuard(real)
    guard.run(app=app, host="127.0.0.1")
    assert served == [app]
    with pytest.raises(patches.PatchError, match="did not build"):
        guard.run(app=FastAPI())
    assert isinstance(cli.uvicorn, patches._ServeGuard)


def test_another_flower_version_stops_every_patch_before_it_changes_anything(
    superlink_modules, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    main, _ = superlink_modules
    factory = main.create_app
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    grid = types.SimpleNamespace(pull_interval=0.1)
    attempts = {
        "superlink-local-only": patches.protect_superlink,
        "superlink-serial-db": patches.serialize_database_sessions,
        "superlink-throttle-cleanup": patches.throttle_token_cleanup,
        "supernode-loop": lambda: patches.patch_supernode_loop(0.5),
        "grid-content-retries": patches.fast_grid_content_retries,
        "simulation-pull-interval": lambda: patches.set_simulation_pull_interval(grid, 0.01),
        "clientapp-task": patches.check_clientapp_task,
    }
    for name, attempt in attempts.items():
        with pytest.raises(patches.PatchError) as refusal:
            attempt()
        message = str(refusal.value)
        assert message.startswith(f"{name}: written for flwr 1.42.0, but flwr 1.43.0 is installed"), message
        assert "\n" not in message
    assert main.create_app is factory and grid.pull_interval == 0.1


def test_a_target_no_longer_looked_up_is_refused() -> None:
    module = types.ModuleType("fake_flower")
    exec("import time\ndef pull_objects(**kw): pass\ndef loop():\n    time.sleep(1)\n", vars(module))
    with pytest.raises(patches.PatchError, match="fake_flower no longer uses pull_objects"):
        patches._require_used(patches.SUPERNODE_LOOP, module, ("time", "pull_objects"))
    patches._require_used(patches.SUPERNODE_LOOP, module, ("time",))


def test_switched_off_performance_patch_leaves_flower_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    http_grid = importlib.import_module("flwr.superlink.grid.http_grid")
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    before = http_grid.pull_objects
    monkeypatch.setenv("PMFL_GRID_FAST_RETRIES", "0")
    patches.fast_grid_content_retries()
    assert http_grid.pull_objects is before
    monkeypatch.delenv("PMFL_GRID_FAST_RETRIES")
    patches.fast_grid_content_retries()
    assert patches._is_ours(http_grid.pull_objects, patches.GRID_CONTENT_RETRIES)
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 1.0}


def test_warm_worker_loads_its_patches_without_pmfl_packages(tmp_path: Path) -> None:
    """The tasks load `client`, `server`, `pm_common` from the approved app bundle: the worker must not
    have imported them from this installation before it forks."""
    script = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("worker", {str(WORKER)!r})
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
patches = worker.load_patches()
patches.check_clientapp_task()
memo = patches.RdpMemo()
print(json.dumps({{
    "installed": memo.install(),
    "pmfl": sorted(m for m in sys.modules if m.split(".")[0] in ("client", "server", "pm_common")),
    "private": worker.PATCHES_MODULE in sys.modules,
}}))
"""
    proc = subprocess.run(
        [sys.executable, "-P", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"installed": True, "pmfl": [], "private": True}
