"""The boundary pmfl draws around Flower's SuperLink, and the patches that draw it, attacked with real
processes.

The coordinator runs in a network namespace of its own with its own address (tests/netns.py), started
as `pmfl coordinator start --host <its address>` starts it, TLS on; the attacker is a process on
another host (another namespace and address) or on the coordinator's host itself. The fail-closed
faults change Flower under pmfl in the started process only (a `sitecustomize` on its PYTHONPATH).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.control_pb2 import (  # pylint: disable=E0611
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
)
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

from client.deploy.site_dir import gate_command, init_site, site_env, supernode_command, write_key_pair
from pm_common import flower_patches
from pm_common.deploy.processes import console_script
from server.deploy import coordinator as coordinator_module
from server.deploy.coordinator import (
    CONNECTION,
    LAUNCHER,
    NOT_ENROLLED,
    Coordinator,
    control_client,
    register_site,
    site_status,
    start_superlink,
    superlink_command,
)
from server.deploy.pki import write_pilot_pki
from server.grid import PollingGrid
from tests.netns import Host, network_or_skip

REPO = Path(__file__).resolve().parents[2]
HEART = REPO / "pm_common" / "datasets" / "heart_disease" / "cleveland.csv"
PORT = 8000  # each namespace has its own ports: the default is free


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Boundary:
    """A coordinator host running `pmfl coordinator start --host ADDR`, and another host."""

    coordinator_host: Host
    elsewhere: Host
    coord: Coordinator
    log: Path

    @property
    def url(self) -> str:
        return f"https://{self.coordinator_host.address}:{PORT}"


@pytest.fixture(scope="module")
def boundary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boundary]:
    root = tmp_path_factory.mktemp("boundary")
    with network_or_skip("boundary") as net:
        coordinator_host, elsewhere = net.add_host("coordinator"), net.add_host("elsewhere")
        coord = Coordinator(root / "coordinator")
        # `pmfl coordinator pki DIR --host ADDR`: SANs ADDR, 127.0.0.1, localhost
        write_pilot_pki(coord.pki.directory, [coordinator_host.address, "127.0.0.1", "localhost"])
        log = root / "coordinator.log"
        with log.open("wb") as out:
            proc = coordinator_host.popen(
                [
                    console_script("pmfl"),
                    "coordinator",
                    "start",
                    str(coord.directory),
                    "--host",
                    coordinator_host.address,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(
                lambda: proc.poll() is not None or elsewhere.listening(coordinator_host.address, PORT),
                90,
                "the SuperLink to listen",
            )
            assert proc.poll() is None, log.read_text(errors="replace")
            yield Boundary(coordinator_host, elsewhere, coord, log)
        finally:
            stop(proc)


def _post(client: httpx.Client, url: str, body: bytes = b"") -> httpx.Response:
    return client.post(url, content=body, headers={"content-type": "application/protobuf"})


def _public_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_control_and_runtime_apis_refuse_other_hosts(boundary: Boundary) -> None:
    """Claim: the coordinator's SuperLink answers its Control and Runtime APIs (submit runs, register
    site keys, hand out ServerApp tasks) to the coordinator's own host only, and its Fleet API to
    every host.
    Attack: a process on another host (its own network namespace and address) that trusts the
    coordinator's CA calls the Control API (list runs, register its own node key, start a run) and
    the Runtime API (acquire a task) over HTTPS, then the Fleet API.
    """
    refused = {
        "/v1/control/list-runs": ListRunsRequest().SerializeToString(),
        "/v1/control/register-node": RegisterNodeRequest(
            public_key=_public_key_pem(), name="x"
        ).SerializeToString(),
        "/v1/control/start-run": StartRunRequest().SerializeToString(),
        "/v1/control/list-nodes": ListNodesRequest().SerializeToString(),
        "/v1/runtime/acquire-task": AcquireTaskRequest().SerializeToString(),
        "/v1/runtime/pull-messages": b"",
    }
    with (
        boundary.elsewhere.entered(),
        httpx.Client(verify=str(boundary.coord.pki.ca_cert), timeout=10) as client,
    ):
        for path, body in refused.items():
            response = _post(client, boundary.url + path, body)
            assert response.status_code == 403, (path, response.status_code, response.text)
            assert response.json()["detail"] == flower_patches.REFUSAL_DETAIL, path
        # The Fleet API is Flower's to answer: an unauthenticated node gets Flower's own refusal.
        fleet = _post(client, boundary.url + "/v1/fleet/pull-messages")
    assert fleet.status_code == 401 and "SuperNode authentication" in fleet.text, fleet.text
    # Nothing happened: no node registered, no run started.
    with boundary.coordinator_host.entered(), control_client(boundary.coord) as control:
        assert not control.ListRuns(ListRunsRequest()).run_dict
        assert not [n for n in control.ListNodes(ListNodesRequest()).nodes_info if n.name == "x"]


def test_coordinator_host_keeps_the_control_api(boundary: Boundary) -> None:
    """Claim: the restriction leaves the coordinator's own commands working: `flwr` and `pmfl
    coordinator` on its host reach the Control API at the address the SuperLink is bound to.
    Attack: none (positive control for the refusals above): the same requests from the coordinator's
    host, through Flower's own Control API client and as raw HTTPS.
    """
    assert LAUNCHER in superlink_command(boundary.coord, insecure=True)  # `pmfl coordinator start`
    with boundary.coordinator_host.entered():
        with control_client(boundary.coord) as control:
            control.ListRuns(ListRunsRequest())
        with httpx.Client(verify=str(boundary.coord.pki.ca_cert), timeout=10) as client:
            response = _post(client, boundary.url + "/v1/control/list-nodes")
    assert response.status_code != 403 and flower_patches.REFUSAL_DETAIL not in response.text
    assert "superlink-local-only" not in boundary.log.read_text(errors="replace")


def test_node_registered_directly_on_the_coordinator_host_is_flagged(
    boundary: Boundary, tmp_path: Path
) -> None:
    """Claim: `pmfl coordinator sites` lists every node the SuperLink has registered, and flags each
    one that was not enrolled through pmfl (`pmfl coordinator register`).
    Attack: a process on the coordinator's host registers a node key of its own with Flower's CLI
    (`flwr supernode register`): the Control API has no user authentication, so the SuperLink
    accepts it, and the node would take part in every study.
    """
    coord = boundary.coord
    enrolled_key, intruder_key = tmp_path / "site.pub", tmp_path / "intruder.pub"
    write_key_pair(tmp_path / "site.key", enrolled_key)
    write_key_pair(tmp_path / "intruder.key", intruder_key)
    with boundary.coordinator_host.entered():
        enrolled = register_site(coord, enrolled_key, "hospital-a")
        answer = coordinator_module.flwr(
            coord, "supernode", "register", str(intruder_key), CONNECTION, "--name", "intruder"
        )
        intruder = int(answer["node-id"])
        rows = {row["node_id"]: row for row in site_status(coord)}
    assert (
        rows[enrolled]["site"] == "hospital-a" and rows[enrolled]["enrolled"] and not rows[enrolled]["flag"]
    )
    assert rows[intruder]["site"] is None and rows[intruder]["name"] == "intruder"
    assert rows[intruder]["status"] == "registered"
    assert not rows[intruder]["enrolled"] and rows[intruder]["flag"] == NOT_ENROLLED
    cli = boundary.coordinator_host.run(
        [console_script("pmfl"), "coordinator", "sites", str(coord.directory)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    intruder_line = next(line for line in cli.stdout.splitlines() if str(intruder) in line)
    assert NOT_ENROLLED in intruder_line and "(intruder)" in intruder_line
    assert "1 node(s) not enrolled by pmfl" in cli.stdout


# -- fail closed ------------------------------------------------------------------------------

FAULTS = {
    # Flower is upgraded under pmfl: every patch was written for 1.42.0.
    "flower-version": (
        "import flwr\nflwr.__version__ = '1.43.0'\n",
        "superlink-local-only: written for flwr 1.42.0, but flwr 1.43.0 is installed",
    ),
    # Flower's factory returns an app that has started already: it takes no more middleware.
    "factory-refuses-middleware": (
        """
        import importlib
        main = importlib.import_module("flwr.superlink.main")
        _create = main.create_app
        def create_app(*args, **kwargs):
            app = _create(*args, **kwargs)
            app.middleware_stack = app.build_middleware_stack()
            return app
        main.create_app = create_app
        """,
        "superlink-local-only: Flower's app did not accept the local-only middleware",
    ),
    # Flower builds the app it serves some other way than through the factory pmfl wraps.
    "app-built-elsewhere": (
        """
        import importlib
        main = importlib.import_module("flwr.superlink.main")
        cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
        _create = main.create_app
        def _run(lifespan_config):
            app = _create(lifespan_config, cli.SuperLinkLifespan)
            c = lifespan_config
            cli.uvicorn.run(app=app, host=c.host, port=c.port, ssl_keyfile=c.ssl_keyfile,
                            ssl_certfile=c.ssl_certfile)
        cli._run_superlink_http_api = _run
        """,
        "superlink-local-only: flower-superlink no longer builds its app with flwr.superlink.main.create_app",
    ),
    # Flower binds the factory when it is imported (`from flwr.superlink.main import create_app` at the
    # top of its module), before pmfl wraps it: the wrapper is never called.
    "factory-bound-early": (
        """
        import importlib
        main = importlib.import_module("flwr.superlink.main")
        cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
        cli.create_app = main.create_app
        exec(
            "def _run_superlink_http_api(lifespan_config):\\n"
            "    c = lifespan_config\\n"
            "    app = create_app(c, SuperLinkLifespan)\\n"
            "    uvicorn.run(app=app, host=c.host, port=c.port, ssl_keyfile=c.ssl_keyfile,"
            " ssl_certfile=c.ssl_certfile)\\n",
            vars(cli),
        )
        """,
        "superlink-local-only: Flower is about to serve an app that pmfl's factory did not build",
    ),
    # A database class opens its sessions its own way: serializing SqlMixin.session would not reach it.
    "db-sessions-overridden": (
        """
        from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
        from flwr.supercore.sql_mixin import SqlMixin
        SqlLinkState.session = SqlMixin.__dict__["session"]  # the same code, defined on the subclass
        """,
        "superlink-serial-db: SqlLinkState does not open its sessions through SqlMixin.session; "
        "to run Flower's own code instead, set PMFL_SUPERLINK_SERIAL_DB=0",
    ),
    # The link state sweeps expired claims its own way: throttling SqlCoreState's would not reach it.
    "cleanup-overridden": (
        """
        from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
        from flwr.supercore.corestate.sql_corestate import SqlCoreState
        SqlLinkState._cleanup_expired_task_tokens = SqlCoreState.__dict__["_cleanup_expired_task_tokens"]
        """,
        "superlink-throttle-cleanup: SqlLinkState does not sweep through "
        "SqlCoreState._cleanup_expired_task_tokens; to run Flower's own code instead, "
        "set PMFL_SUPERLINK_THROTTLE_CLEANUP=0",
    ),
}


def _faulty_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, code: str) -> dict[str, str]:
    """Make every process started from here load `code` first (a sitecustomize on PYTHONPATH)."""
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(textwrap.dedent(code), encoding="utf-8")
    path = os.pathsep.join(p for p in (str(fault), os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    return {**os.environ}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _refusal_lines(output: str, refusal: str) -> list[str]:
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith(refusal)]


def _start_coordinator(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    coord = Coordinator(tmp_path / "coordinator")
    write_pilot_pki(coord.pki.directory, ["127.0.0.1", "localhost"])
    port, log = _free_port(), tmp_path / "superlink.log"
    with log.open("wb") as out:
        return start_superlink(coord, port=port, stdout=out), port, log


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_coordinator_refuses_to_start_when_a_patch_fails(
    fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claim: the coordinator's SuperLink starts only with every patch it needs applied and verified;
    above all it never serves its Control API to other hosts because the local-only middleware
    silently failed to attach.
    Fault: Flower changes under pmfl (another version; a factory that takes no middleware; an app
    built without pmfl's factory; a database class that bypasses a performance patch), and the
    coordinator is started as `pmfl coordinator start` starts it: it must exit non-zero with one line
    naming the patch and the reason (and the switch, for a performance patch), without a traceback
    and without ever listening.
    """
    code, reason = FAULTS[fault]
    _faulty_env(monkeypatch, tmp_path, code)
    proc, port, log = _start_coordinator(tmp_path)
    try:
        exit_code = proc.wait(timeout=120)
    finally:
        stop(proc)
    output = log.read_text(errors="replace")
    assert exit_code != 0, output
    lines = _refusal_lines(output, "pmfl: the SuperLink refuses to start: ")
    assert len(lines) == 1 and reason in lines[0], output
    assert not _listening(port)


def test_performance_patch_switched_off_explicitly_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claim: a performance patch never degrades silently: it stops the process, or it is switched off
    by an explicit setting, and then the process runs Flower's own code for that part.
    Fault: the database-sessions fault above, with `PMFL_SUPERLINK_SERIAL_DB=0` set.
    """
    _faulty_env(monkeypatch, tmp_path, FAULTS["db-sessions-overridden"][0])
    monkeypatch.setenv("PMFL_SUPERLINK_SERIAL_DB", "0")
    proc, port, log = _start_coordinator(tmp_path)
    try:
        wait_for(lambda: proc.poll() is not None or _listening(port), 90, "the SuperLink to listen")
        assert proc.poll() is None, log.read_text(errors="replace")
    finally:
        stop(proc)
    assert "refuses to start" not in log.read_text(errors="replace")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    pki = write_pilot_pki(tmp_path / "pki", ["127.0.0.1"])
    superlink = f"127.0.0.1:{_free_port()}"  # nothing listens: the site must stop before it dials
    return init_site(tmp_path / "site", "cleveland", HEART, superlink=superlink, ca=pki.ca_cert)


def test_site_supernode_refuses_to_start_when_its_loop_patch_fails(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claim: a site's SuperNode runs with pmfl's shorter waits only when they are verified in place;
    otherwise it stops and names the setting that runs Flower's own loop.
    Fault: Flower's SuperNode loop no longer pulls a message's contents through the module's
    `pull_objects` (the patch would change nothing).
    """
    _faulty_env(
        monkeypatch,
        tmp_path,
        """
        import importlib
        loop = importlib.import_module("flwr.supernode.start_client_internal")
        del loop.pull_objects
        """,
    )
    env = {**site_env(site), "PYTHONPATH": os.environ["PYTHONPATH"]}
    proc = subprocess.run(supernode_command(site), env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    lines = _refusal_lines(output, "pmfl: the SuperNode refuses to start: ")
    assert (
        len(lines) == 1
        and "supernode-loop: flwr.supernode.start_client_internal has no pull_objects" in lines[0]
    )
    assert "poll_interval = 3" in lines[0]


FAULTY_TASK = """
import importlib
flower = importlib.import_module("flwr.supernode.runtime.run_clientapp")
del flower.install_from_fab
"""


def test_site_gate_refuses_to_start_when_task_patches_fail(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claim: a site does not start when the patches of its ClientApp tasks cannot apply (every task
    would fail); it says so once and names `PMFL_GATE_WARM=0`, Flower's own task process.
    Fault: Flower's `run_clientapp` no longer installs the app bundle through `install_from_fab`.
    """
    _faulty_env(monkeypatch, tmp_path, FAULTY_TASK)
    env = {**site_env(site), "PYTHONPATH": os.environ["PYTHONPATH"]}
    proc = subprocess.run(
        gate_command(site, os.getpid()), env=env, capture_output=True, text=True, timeout=120
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    lines = _refusal_lines(output, "pmfl: the site's gate refuses to start: ")
    assert (
        len(lines) == 1
        and "clientapp-task: flwr.supernode.runtime.run_clientapp has no install_from_fab" in lines[0]
    )
    assert "PMFL_GATE_WARM=0" in lines[0]


def test_warm_worker_refuses_before_forking_a_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim: the warm ClientApp worker checks its patches before it forks any task, by itself too
    (it is a separate program, run by path).
    Fault: as above, `run_clientapp` without `install_from_fab`.
    """
    env = _faulty_env(monkeypatch, tmp_path, FAULTY_TASK)
    worker = REPO / "client" / "deploy" / "warm_worker.py"
    proc = subprocess.run(
        [sys.executable, "-P", str(worker), "--runtime-api-address", "127.0.0.1:1"],
        input="token\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == flower_patches.REFUSED_EXIT, proc.stderr
    lines = _refusal_lines(proc.stdout + proc.stderr, "pmfl: the warm ClientApp worker refuses to start: ")
    assert len(lines) == 1 and "has no install_from_fab" in lines[0]
    assert "[clientapp] task" not in proc.stderr  # no task was forked


def test_gate_stops_when_its_warm_worker_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim: a site whose warm ClientApp worker refuses its patches stops, rather than start a worker
    for every task that would refuse again (each task lost).
    Fault: another Opacus version than the accounting memo was written for, seen only by the worker
    (the gate itself does not import Opacus).
    """
    from client.deploy.gate import WarmWorker

    _faulty_env(monkeypatch, tmp_path, "import opacus\nopacus.__version__ = '1.7.0'\n")
    worker = WarmWorker("127.0.0.1:1")
    worker.prepare()
    try:
        assert worker.proc is not None and worker.proc.wait(timeout=120) == flower_patches.REFUSED_EXIT
        with pytest.raises(flower_patches.PatchError, match=r"refused to start.*PMFL_GATE_WARM=0"):
            worker.reap()
        with pytest.raises(flower_patches.PatchError):
            worker.prepare()  # not started again
    finally:
        worker.close()


def test_serverapp_refuses_when_the_grid_patch_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim: the deployed ServerApp collects replies with pmfl's sooner content retries only when the
    patch is verified; otherwise it stops with the reason, unless switched off explicitly.
    Fault: Flower's HttpGrid no longer pulls reply contents through its module's `pull_objects`.
    """
    import importlib

    http_grid = importlib.import_module("flwr.superlink.grid.http_grid")
    monkeypatch.delattr(http_grid, "pull_objects")
    with pytest.raises(flower_patches.PatchError) as refusal:
        PollingGrid(inner=None)  # type: ignore[arg-type]
    assert "grid-content-retries: flwr.superlink.grid.http_grid has no pull_objects" in str(refusal.value)
    assert "PMFL_GRID_FAST_RETRIES=0" in str(refusal.value) and "\n" not in str(refusal.value)
    monkeypatch.setenv("PMFL_GRID_FAST_RETRIES", "0")
    assert PollingGrid(inner=None).poll_interval > 0  # type: ignore[arg-type]


def test_ledger_accounting_patch_refuses_another_opacus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim: the warm worker's memo of Opacus' RDP (which feeds every reported epsilon) is only
    installed over the Opacus version it was checked against.
    Fault: another Opacus version is installed.
    """
    import opacus
    from opacus.accountants.analysis import rdp

    original = rdp.compute_rdp
    monkeypatch.setattr(opacus, "__version__", "1.7.0")
    memo = flower_patches.RdpMemo()
    try:
        with pytest.raises(flower_patches.PatchError, match=r"for opacus 1\.6\.0, but opacus 1\.7\.0"):
            memo.install()
        assert rdp.compute_rdp is original
    finally:
        os.close(memo.reader)
        os.close(memo.writer)


def test_simulation_refuses_when_its_grid_cannot_be_tuned() -> None:
    """Claim: the simulated ServerApp's faster reply polling is applied only where Flower's grid waits
    by it; otherwise the run stops with the reason.
    Fault: a grid without `pull_interval`.
    """
    with pytest.raises(flower_patches.PatchError, match="simulation-pull-interval: object has no numeric"):
        flower_patches.set_simulation_pull_interval(object(), 0.01)
