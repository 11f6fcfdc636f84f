"""The coordinator's side of a deployed study: the SuperLink, the registered sites, and the runs.

Why a directory: the coordinator's state must survive restarts and be inspectable. Layout:
`pki/` (CA + server certificate, see `server.deploy.pki`), `state/superlink.db` (Flower's LinkState:
registered site keys, runs, messages), `flwr-home/` (the `flwr` CLI's connection and Flower's
unpacked apps), `coordinator.toml` (the port), `sites.json` (site name -> node id and public key).
Everything Flower does is done by Flower's own commands (`flower-superlink`, `flwr supernode
register`, `flwr run`, `flwr ls`, `flwr log`); this module only assembles and follows them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from pm_common.deploy.app_bundle import packed_state
from pm_common.deploy.processes import console_script, flower_env
from pm_common.study.schema import read_toml
from server.deploy.pki import PkiPaths, check_pki_files

if TYPE_CHECKING:  # flwr is imported where it is used: `pmfl` commands start fast
    from flwr.supercore.control import ControlHttpClient

CONNECTION = "pmfl"  # the name of the SuperLink connection in flwr-home/config.toml
LAUNCHER = "server.deploy.superlink"
DEFAULT_PORT = 8000
_NODE = re.compile(r"node (\d+)")


class CoordinatorError(RuntimeError):
    """A coordinator command failed; carries Flower's own message where there is one."""


@dataclass(frozen=True)
class Coordinator:
    """Paths and settings of one coordinator directory."""

    directory: Path

    @property
    def pki(self) -> PkiPaths:
        return PkiPaths(self.directory / "pki")

    @property
    def database(self) -> Path:
        return self.directory / "state" / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.directory / "flwr-home"

    @property
    def settings_path(self) -> Path:
        return self.directory / "coordinator.toml"

    @property
    def registry_path(self) -> Path:
        return self.directory / "sites.json"

    def settings(self) -> dict[str, Any]:
        if not self.settings_path.exists():
            return {"port": DEFAULT_PORT, "insecure": False, "host": "127.0.0.1"}
        return read_toml(self.settings_path)

    def env(self) -> dict[str, str]:
        return flower_env(FLWR_HOME=str(self.flwr_home))


_script = console_script


# -- SuperLink --------------------------------------------------------------------------------


WILDCARDS = ("", "0.0.0.0", "::", "[::]", "localhost")  # bound there, this host dials 127.0.0.1


def dial_host(host: str) -> str:
    """The address this host's own commands (`flwr`, `pmfl coordinator`, the ServerApp) dial to reach a
    SuperLink listening on `host`.

    127.0.0.1 for a wildcard or loopback, else `host` itself (a process here dialing one of this
    machine's addresses arrives from that address, which the SuperLink counts as this host). The
    server certificate needs it as a subject alternative name.

    Args:
        host: The address the SuperLink listens on.

    Returns:
        The host name or IP to dial, without IPv6 brackets.
    """
    return "127.0.0.1" if host in WILDCARDS else host.strip("[]")


def dial_address(host: str, port: int) -> str:
    """`dial_host` with the port: the host:port this host's own commands connect to.

    Args:
        host: The address the SuperLink listens on.
        port: Its port.

    Returns:
        "host:port", with an IPv6 address in brackets.
    """
    name = dial_host(host)
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def configure(
    coord: Coordinator, port: int = DEFAULT_PORT, insecure: bool = False, host: str = "127.0.0.1"
) -> None:
    """Write the host and port, and the `flwr` CLI's connection.

    The connection is the address this host dials for `host` (see `dial_host`), with the CA unless
    insecure, so that every later `flwr` command reaches this SuperLink without further settings.

    Args:
        coord: The coordinator.
        port: The SuperLink's port.
        insecure: Plain HTTP without TLS.
        host: The address the SuperLink listens on.
    """
    coord.directory.mkdir(parents=True, exist_ok=True)
    settings = {"port": port, "insecure": insecure, "host": host}
    coord.settings_path.write_text(tomli_w.dumps(settings), encoding="utf-8")
    connection: dict[str, Any] = {"address": dial_address(host, port)}
    if insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(coord.pki.ca_cert.resolve())
    coord.flwr_home.mkdir(parents=True, exist_ok=True)
    (coord.flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}), encoding="utf-8"
    )


def superlink_command(
    coord: Coordinator,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    insecure: bool = False,
    remote_control: bool = False,
) -> list[str]:
    """`flower-superlink` with TLS, SuperNode authentication and a database file.

    Or plain HTTP without authentication when `insecure`: Flower does not allow authentication
    without TLS. Its Control and Runtime APIs answer this host only (`server.deploy.superlink`:
    Flower serves them on the Fleet API's port, without user authentication), unless
    `remote_control`; the launcher refuses to start if that restriction cannot be put in place.

    Args:
        coord: The coordinator.
        host: The address to listen on.
        port: The port of the Fleet, Control and Runtime APIs.
        insecure: Plain HTTP without authentication, for local tests only.
        remote_control: Run Flower's own `flower-superlink`, answering the Control and Runtime APIs to
            other hosts too.

    Returns:
        The command line.

    Raises:
        PkiError: When, without `insecure`, the certificate set is incomplete or not valid for the
            address this host dials (from `check_pki_files`).
    """
    coord.database.parent.mkdir(parents=True, exist_ok=True)
    launcher = [_script("flower-superlink")] if remote_control else [sys.executable, "-P", "-m", LAUNCHER]
    cmd = [
        *launcher,
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(coord.database),
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        return [*cmd, "--insecure"]
    check_pki_files(coord.pki, dial_host(host))  # what the flwr CLI and the ServerApp here dial
    return [
        *cmd,
        "--ssl-ca-certfile",
        str(coord.pki.ca_cert),
        "--ssl-certfile",
        str(coord.pki.server_cert),
        "--ssl-keyfile",
        str(coord.pki.server_key),
        "--enable-supernode-auth",
    ]


def start_superlink(
    coord: Coordinator,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    insecure: bool = False,
    stdout: Any = None,
    remote_control: bool = False,
) -> subprocess.Popen[bytes]:
    """Start the SuperLink (returns at once).

    Its ServerApps inherit the environment, so PMFL_GRID_POLL_INTERVAL set here applies to every study.

    Args:
        coord: The coordinator.
        host: The address to listen on.
        port: The port of the Fleet, Control and Runtime APIs.
        insecure: Plain HTTP without authentication, for local tests only.
        stdout: Where the SuperLink writes its output (stderr included); None to inherit.
        remote_control: Answer the Control and Runtime APIs to other hosts too.

    Returns:
        The SuperLink's process.
    """
    configure(coord, port, insecure, host)
    cmd = superlink_command(coord, host, port, insecure, remote_control)
    err = subprocess.STDOUT if stdout is not None else None
    return subprocess.Popen(cmd, env=coord.env(), stdout=stdout, stderr=err, cwd=coord.directory)


# -- flwr CLI ---------------------------------------------------------------------------------


def flwr(coord: Coordinator, *args: str, cwd: Path | None = None, timeout: float = 120) -> dict[str, Any]:
    """Run a `flwr` CLI command against this coordinator's SuperLink; its JSON answer.

    Uses Flower's own CLI rather than its internals, so this module keeps working as Flower changes.

    Args:
        coord: The coordinator.
        *args: The command's arguments (without `--format json`, which is added).
        cwd: The working directory; the coordinator's directory when None.
        timeout: Seconds before the command is abandoned.

    Returns:
        The command's JSON answer.

    Raises:
        CoordinatorError: When the command fails or does not report success.
    """
    proc = subprocess.run(
        [_script("flwr"), *args, "--format", "json"],
        env=coord.env(),
        cwd=cwd or coord.directory,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout
    start = out.find("{")
    try:
        answer = json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (proc.stderr.strip() or out.strip())
        raise CoordinatorError(f"flwr {' '.join(args[:2])} failed: {detail}")
    return answer


def registry(coord: Coordinator) -> dict[str, dict[str, Any]]:
    """The sites pmfl enrolled (sites.json): name -> node id and public key.

    Args:
        coord: The coordinator.

    Returns:
        The registry; empty when no site was registered yet.
    """
    if not coord.registry_path.exists():
        return {}
    return json.loads(coord.registry_path.read_text(encoding="utf-8"))


def register_site(coord: Coordinator, public_key: Path, name: str) -> int:
    """Register a site's public key with the SuperLink; only registered keys may connect.

    Args:
        coord: The coordinator.
        public_key: The site's public key file (keys/site.pub).
        name: The site's name; it must not be registered yet.

    Returns:
        The node id the SuperLink gave the site.

    Raises:
        CoordinatorError: When the name is registered already or Flower refuses the key.
    """
    sites = registry(coord)
    if name in sites:
        raise CoordinatorError(f"a site named {name!r} is already registered (node {sites[name]['node_id']})")
    answer = flwr(coord, "supernode", "register", str(Path(public_key).resolve()), CONNECTION, "--name", name)
    node_id = int(answer["node-id"])
    sites[name] = {"node_id": node_id, "public_key": Path(public_key).read_text(encoding="utf-8").strip()}
    coord.registry_path.write_text(json.dumps(sites, indent=2), encoding="utf-8")
    return node_id


def unregister_site(coord: Coordinator, name: str) -> None:
    """Remove a site: its key can no longer connect (withdrawal, or a lost key).

    Args:
        coord: The coordinator.
        name: The site's name.

    Raises:
        CoordinatorError: When no site of that name is registered or Flower refuses.
    """
    sites = registry(coord)
    if name not in sites:
        raise CoordinatorError(f"no registered site named {name!r}")
    flwr(coord, "supernode", "unregister", str(sites[name]["node_id"]), CONNECTION)
    del sites[name]
    coord.registry_path.write_text(json.dumps(sites, indent=2), encoding="utf-8")


NOT_ENROLLED = "NOT ENROLLED BY PMFL: registered directly through the Control API on this host"
_GONE = ("unregistered", "deleted")  # hidden by `flwr supernode list`, as here: they can no longer connect


def site_status(coord: Coordinator) -> list[dict[str, Any]]:
    """Every node the SuperLink has registered, as Flower lists it (`flwr supernode list`), and every site in
    sites.json, each with its status; nodes pmfl did not enrol are flagged.

    Why flag: the SuperLink's Control API has no user authentication, so any process on this host can
    register a node key (`flwr supernode register`); such a node takes part in every study like an
    enrolled site, but pmfl's registry does not know it. A node counts as enrolled only when
    sites.json holds its node id with the same public key.

    Args:
        coord: The coordinator.

    Returns:
        One dict per node or site: `site` (the sites.json name, or None), `node_id`, `status`
        (Flower's: online, offline, registered; "?" for a site Flower no longer lists), `enrolled`
        (bool), `flag` (why it is not enrolled, or ""), `name` (the name Flower holds for the node).

    Raises:
        CoordinatorError: the SuperLink cannot be reached.
    """
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

    try:
        with control_client(coord) as client:
            nodes = {int(n.node_id): n for n in client.ListNodes(ListNodesRequest()).nodes_info}
    except Exception as exc:  # transport or Flower error: keep Flower's message, one line
        raise CoordinatorError(f"cannot list the SuperLink's nodes: {exc}") from exc
    sites = registry(coord)
    rows = []
    for name, info in sites.items():
        node = nodes.pop(int(info["node_id"]), None)
        enrolled = node is None or _same_key(node.public_key, info.get("public_key", ""))
        flag = "" if enrolled else f"NOT ENROLLED BY PMFL: the node's key is not the one {name} enrolled"
        rows.append(
            {
                "site": name,
                "node_id": int(info["node_id"]),
                "status": node.status if node is not None else "?",
                "enrolled": enrolled,
                "flag": flag,
                "name": node.name if node is not None else name,
            }
        )
    for node_id, node in sorted(nodes.items()):
        if node.status in _GONE:
            continue
        rows.append(
            {
                "site": None,
                "node_id": node_id,
                "status": node.status,
                "enrolled": False,
                "flag": NOT_ENROLLED,
                "name": node.name,
            }
        )
    return rows


def _same_key(registered: bytes, openssh_line: str) -> bool:
    """Whether the key Flower holds (PEM) is the OpenSSH public key pmfl recorded."""
    from cryptography.hazmat.primitives import serialization

    try:
        held = serialization.load_pem_public_key(registered)
        recorded = serialization.load_ssh_public_key(openssh_line.encode())
    except (ValueError, TypeError):
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return held.public_bytes(serialization.Encoding.DER, spki) == recorded.public_bytes(
        serialization.Encoding.DER, spki
    )


# -- runs -------------------------------------------------------------------------------------


def submit(
    coord: Coordinator,
    study: Path,
    run_dir: Path,
    app_dir: Path,
    expected_sites: int = 0,
    resume: bool = False,
    round_timeout: float | None = None,
) -> int:
    """`flwr run` the study app in `app_dir` with this study; returns Flower's run id.

    Args:
        coord: the coordinator.
        study: the study file.
        run_dir: the run directory the ServerApp writes.
        app_dir: the study app's source tree (its hash is what hospitals approve).
        expected_sites: sites to wait for before round 1.
        resume: continue the run in `run_dir` from its last checkpoint (after a crash of the
            coordinator): the same roster, the next attempt (server/resume.py).
        round_timeout: seconds to wait for a round's replies (None: the app's default, 3600).

    Returns:
        Flower's run id.

    Raises:
        CoordinatorError: the app would carry coordinator files, `run_dir` holds a run and `resume`
            is not set (or holds none and it is), or Flower refuses the run.
    """
    held = (Path(run_dir) / "privacy" / "roster.json").exists()
    if held and not resume:
        raise CoordinatorError(f"{run_dir} already holds a run: pass --resume to continue it, or choose "
                               "another --out")
    if resume and not held:
        raise CoordinatorError(f"{run_dir} holds no run to resume (no privacy/roster.json)")
    if leak := packed_state(app_dir, coord.directory, run_dir):
        raise CoordinatorError(
            f"the app in {app_dir} would carry coordinator files to every site ({leak[0]}, ...): keep "
            "the coordinator and run directories out of the app's source tree, or under a folder git ignores"
        )
    config = (
        f"study='{Path(study).resolve()}' run-dir='{Path(run_dir).resolve()}' expected-sites={expected_sites}"
        f" resume={'true' if resume else 'false'}"
        + (f" round-timeout={float(round_timeout)}" if round_timeout is not None else "")
    )
    answer = flwr(coord, "run", str(Path(app_dir).resolve()), CONNECTION, "--run-config", config)
    return int(answer["run-id"])


def run_info(coord: Coordinator, run_id: int) -> dict[str, Any]:
    """`flwr ls`'s record of one run: its status, app hash and times.

    Args:
        coord: The coordinator.
        run_id: Flower's run id.

    Returns:
        The run's record as `flwr ls --format json` gives it.
    """
    return flwr(coord, "ls", CONNECTION, "--run-id", str(run_id))["runs"][0]


@contextmanager
def control_client(coord: Coordinator) -> Iterator[ControlHttpClient]:
    """Flower's own Control API client (what the `flwr` CLI uses), in this process, for the SuperLink of this
    coordinator (at the address this host dials, see `dial_host`).

    Why not `flwr ls` in a loop: every `flwr` command is a new Python process that costs about 1 s
    of CPU; polled once a second while a study runs, that took half of a 2-core coordinator from
    the SuperLink and the ServerApp, and slowed every round.

    Args:
        coord: The coordinator (its settings must have been written by `configure`).

    Yields:
        The connected client; it is closed on leaving the context.
    """
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    settings = coord.settings()
    insecure = bool(settings.get("insecure", False))
    client = ControlHttpClient.from_server_address(
        server_address=dial_address(str(settings.get("host", "127.0.0.1")), int(settings["port"])),
        insecure=insecure,
        root_certificates=None if insecure else str(coord.pki.ca_cert.resolve()),
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )
    try:
        yield client
    finally:
        client.close()


def run_status(client: ControlHttpClient, run_id: int) -> str:
    """The run's status as `flwr ls` shows it: "running", "finished:completed", ...

    Args:
        client: A Control API client (`control_client`).
        run_id: Flower's run id.

    Returns:
        The status, with its sub-status after a colon when it has one.

    Raises:
        CoordinatorError: When the SuperLink cannot be asked or knows no such run.
    """
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

    try:
        runs = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
    except Exception as exc:  # transport or Flower error: name the run, keep Flower's message
        raise CoordinatorError(f"cannot read the status of run {run_id}: {exc}") from exc
    if run_id not in runs:
        raise CoordinatorError(f"the SuperLink knows no run {run_id}")
    status = run_from_proto(runs[run_id]).status
    return f"{status.status}:{status.sub_status}" if status.sub_status else status.status


def follow(
    coord: Coordinator,
    run_id: int,
    run_dir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    poll: float = 0.5,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Wait for the run to finish, reporting each round that lands in RUN/metrics.json; then `flwr ls`'s
    record of the run.

    Args:
        coord: The coordinator.
        run_id: Flower's run id.
        run_dir: The run directory the ServerApp writes.
        on_round: Called with each new round of metrics.json; None to report nothing.
        poll: Seconds between status checks.
        timeout: Seconds after which to give up; None to wait for the end.

    Returns:
        The run's record (`run_info`).

    Raises:
        CoordinatorError: When the run does not finish within `timeout`, or its status cannot be read.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = 0
    metrics_path = Path(run_dir) / "metrics.json"
    with control_client(coord) as client:
        while not (status := run_status(client, run_id)).startswith("finished"):
            seen = _report_rounds(metrics_path, seen, on_round)
            if deadline is not None and time.monotonic() > deadline:
                raise CoordinatorError(f"run {run_id} did not finish in {timeout:.0f} s (status {status})")
            time.sleep(poll)
    _report_rounds(metrics_path, seen, on_round)
    return run_info(coord, run_id)


def _report_rounds(
    metrics_path: Path, seen: int, on_round: Callable[[dict[str, Any]], None] | None
) -> int:
    """Call `on_round` for each round in metrics.json after the first `seen` entries; the new count."""
    if on_round is None or not metrics_path.exists():
        return seen
    try:
        rounds = json.loads(metrics_path.read_text(encoding="utf-8"))["rounds"]
    except (json.JSONDecodeError, KeyError):
        return seen
    for entry in rounds[seen:]:
        if entry["round"] > 0:
            on_round(entry)
    return max(seen, len(rounds))


def collect(coord: Coordinator, run_id: int, run_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Complete the run directory: the ServerApp's log, and which site each failure was.

    The ServerApp itself wrote metrics.json, model.pt, config.toml, checkpoints/ and privacy/
    (every site's ledger lines as received). Here: `serverapp.log` and `deployment.json`.

    Args:
        coord: The coordinator.
        run_id: Flower's run id.
        run_dir: The run directory.
        info: The run's record (`run_info`).

    Returns:
        What deployment.json holds: the run id, status, app hash, the sites by node id, each round's
        failures with the site they came from, and the sites that dropped out.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = subprocess.run(
        [_script("flwr"), "log", str(run_id), CONNECTION, "--show"],
        env=coord.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    (run_dir / "serverapp.log").write_text(logs.stdout, encoding="utf-8")
    names = {info_["node_id"]: name for name, info_ in registry(coord).items()}
    failures: list[dict[str, Any]] = []
    metrics_path = run_dir / "metrics.json"
    metrics = (
        json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {"rounds": []}
    )
    for entry in metrics["rounds"]:
        for text in entry.get("failures", []):
            match = _NODE.search(text)
            node = int(match.group(1)) if match else None
            failures.append(
                {"round": entry["round"], "node_id": node, "site": names.get(node or -1), "reason": text}
            )
    dropped = sorted({f["site"] or str(f["node_id"]) for f in failures if "Node Unavailable" in f["reason"]})
    deployment = {
        "run_id": run_id,
        "status": info["status"],
        "fab_hash": info.get("fab-hash"),
        "sites": {str(node): name for node, name in names.items()},
        "failures": failures,
        "dropped_out": dropped,
    }
    (run_dir / "deployment.json").write_text(json.dumps(deployment, indent=2), encoding="utf-8")
    return deployment
