"""The deployed form, with real processes on 127.0.0.1: a SuperLink with TLS and site authentication,
hospital sites each with its own directory, data, key and gate, and `flwr run` in between.

Covered: a client without the CA cannot connect; a site whose key is not registered is refused; a
3-site DP study completes although one site is killed mid-study (the drop-out is reported) and a
fourth, registered site refuses the app it never approved (its code is never unpacked there); the
coordinator restarts from its database and runs the next study with the sites that are left.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from client.approval import app_hash, approve_app
from client.site_admin import SiteProcesses, init_site, site_env, start_site, write_key_pair
from pm_common.audit_run import audit_directory
from pm_common.config import load_study
from server.coordinator import (
    LAUNCHER,
    Coordinator,
    collect,
    follow,
    register_site,
    run_info,
    site_status,
    start_superlink,
    submit,
    superlink_command,
)
from server.pki import write_pilot_pki
from server.superlink_launcher import LocalOnlyOutsideFleet

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "pm_common" / "datasets" / "heart_disease"
STUDY = REPO / "docker" / "studies" / "heart_disease.toml"
TRAINING_SITES = ("cleveland", "hungary", "switzerland")
UNAPPROVED_SITE = "va_long_beach"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):  # type: ignore[no-untyped-def]
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
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def snapshot_app(dest: Path) -> Path:
    """A copy of the study app, so the hash the sites approve cannot change under the test."""
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "runs", "__pycache__", "*.egg-info", ".*_cache", "artifacts", "results"
    )
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def study_file(tmp: Path, name: str, rounds: int, **tables: dict) -> Path:
    raw = {**load_study(STUDY).raw, **tables}
    raw["study"] = {**raw["study"], "rounds": rounds}
    path = tmp / name
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path


class Federation:
    """One coordinator directory and its SuperLink, plus every site process a test starts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.coord = Coordinator(root / "coordinator")
        self.port = free_port()
        self.superlink: subprocess.Popen[bytes] | None = None
        self.sites: dict[str, SiteProcesses] = {}
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_superlink(self) -> None:
        log = (self.logs / "superlink.log").open("ab")
        self.superlink = start_superlink(self.coord, port=self.port, stdout=log)
        wait_for(lambda: _listening(self.port), 60, "the SuperLink to listen")

    def stop_superlink(self) -> None:
        if self.superlink is not None:
            stop(self.superlink)

    def new_site(self, name: str, approve: str | None) -> Path:
        site = init_site(
            self.root / "sites" / name,
            name,
            DATA / f"{name}.csv",
            superlink=self.address,
            ca=self.coord.pki.ca_cert,
            studies=("heart-disease",),
            runtime_port=free_port(),
        )
        if approve:
            approve_app(site, approve)
        return site

    def start_site(self, site: Path) -> SiteProcesses:
        log = (self.logs / f"{site.name}.log").open("ab")
        procs = start_site(site, stdout=log)
        self.sites[site.name] = procs
        return procs

    def close(self) -> None:
        for procs in self.sites.values():
            procs.stop()
        self.stop_superlink()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("deployment"))
    write_pilot_pki(fed.coord.pki.directory, ["127.0.0.1", "localhost"])
    try:
        fed.start_superlink()
        yield fed
    finally:
        fed.close()


def _supernode_refused(fed: Federation, name: str, args: list[str], site: Path) -> str:
    """Run a bare flower-supernode that should be turned away; its log."""
    log_path = fed.logs / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["flower-supernode", "--superlink", fed.address, "--port", str(free_port()), *args],
            env=site_env(site),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            code = proc.wait(timeout=60)
        finally:
            stop(proc)
    assert code != 0, f"{name} was expected to be refused"
    return log_path.read_text(errors="replace")


def test_client_without_the_ca_cannot_connect(federation: Federation) -> None:
    site = federation.new_site("no-ca", approve=None)
    register_site(federation.coord, site / "keys" / "site.pub", "no-ca")
    log = _supernode_refused(
        federation, "no-ca", ["--auth-supernode-private-key", str(site / "keys" / "site.key")], site
    )
    assert "CERTIFICATE_VERIFY_FAILED" in log


def test_unregistered_site_is_refused(federation: Federation, tmp_path: Path) -> None:
    site = federation.new_site("rogue", approve=None)  # has the CA, but its key was never registered
    procs = federation.start_site(site)
    code = procs.supernode.wait(timeout=60)
    procs.stop()
    log = (federation.logs / "rogue.log").read_text(errors="replace")
    assert code != 0 and "Failed to activate SuperNode" in log
    # A fresh key with the registered site's name changes nothing: keys, not names, are checked.
    write_key_pair(tmp_path / "other.key", tmp_path / "other.pub")
    log = _supernode_refused(
        federation,
        "rogue-2",
        [
            "--root-certificates",
            str(federation.coord.pki.ca_cert),
            "--auth-supernode-private-key",
            str(tmp_path / "other.key"),
        ],
        site,
    )
    assert "Failed to activate SuperNode" in log


def test_other_hosts_reach_the_fleet_api_only(tmp_path: Path) -> None:
    """`pmfl coordinator start` runs the SuperLink through server.superlink_launcher, whose middleware
    answers the Control and Runtime APIs to this host only (Flower serves all three on one port)."""
    assert LAUNCHER in superlink_command(Coordinator(tmp_path), insecure=True)
    assert LAUNCHER not in superlink_command(Coordinator(tmp_path), insecure=True, remote_control=True)
    passed: list[str] = []

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        passed.append(scope["path"])

    def status(path: str, peer: str, own: str = "10.0.0.5") -> int:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "path": path, "client": (peer, 40000), "server": (own, 8000)}
        asyncio.run(LocalOnlyOutsideFleet(app)(scope, None, send))  # type: ignore[arg-type]
        return sent[0]["status"] if sent else 200

    remote = "192.0.2.7"
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/acquire-task", "/docs"):
        assert status(path, remote) == 403, path
        for local in ("127.0.0.1", "::1", "10.0.0.5", "::ffff:10.0.0.5"):  # or this host's own address
            assert status(path, local) == 200, (path, local)
    assert status("/v1/fleet/pull-messages", remote) == 200
    assert passed.count("/v1/fleet/pull-messages") == 1


def test_study_survives_dropout_and_coordinator_restart(federation: Federation, tmp_path: Path) -> None:
    fed = federation
    app = snapshot_app(tmp_path / "app")
    digest = app_hash(app)
    sites = {name: fed.new_site(name, approve=digest) for name in TRAINING_SITES}
    sites[UNAPPROVED_SITE] = fed.new_site(UNAPPROVED_SITE, approve=None)
    for name, site in sites.items():
        register_site(fed.coord, site / "keys" / "site.pub", name)
        fed.start_site(site)
    wait_for(
        lambda: sum(s["status"] == "online" for s in site_status(fed.coord) if s["site"] in sites) == 4,
        90,
        "four sites online",
    )

    # A 2-round DP study with secure aggregation; the third site is killed (no goodbye) once
    # round 1 is in: its pairwise masks, already in round 2's plan, are removed from its shares.
    run_dir = tmp_path / "run"
    started = time.monotonic()
    study = study_file(tmp_path, "study.toml", rounds=2, secure_aggregation={"enabled": True})
    run_id = submit(fed.coord, study, run_dir, app, expected_sites=4)
    metrics_path = run_dir / "metrics.json"

    def round_one_recorded() -> bool:
        if not metrics_path.exists():
            return False
        rounds = json.loads(metrics_path.read_text())["rounds"]
        return len(rounds) > 1 and len(rounds[1]["trained"]) == 3

    wait_for(round_one_recorded, 150, "round 1 with three sites", interval=0.1)
    victim = "switzerland"
    fed.sites[victim].kill()
    info = follow(fed.coord, run_id, run_dir, timeout=240)
    elapsed = time.monotonic() - started
    deployment = collect(fed.coord, run_id, run_dir, info)
    assert info["status"] == "finished:completed", info

    metrics = json.loads(metrics_path.read_text())
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert set(rounds[1]["trained"]) == set(TRAINING_SITES)
    assert set(rounds[2]["trained"]) == {"cleveland", "hungary"}, rounds[2]
    assert any("Node Unavailable" in f for f in rounds[2]["failures"])
    assert deployment["dropped_out"] == [victim], deployment
    refusals = [f for f in deployment["failures"] if f["site"] == UNAPPROVED_SITE]
    assert refusals and all("has not approved this app" in f["reason"] for f in refusals)
    # it refused to enrol (its gate refuses the app before any of its code runs): it is not on the
    # run's roster, and nobody asks it anything more in this run
    assert {f["round"] for f in refusals} == {0}
    roster = json.loads((run_dir / "privacy" / "roster.json").read_text())["roster"]
    assert [s["site"] for s in roster["sites"]] == sorted(TRAINING_SITES)
    assert not list(run_dir.rglob("update-*.npz"))  # no single update kept
    assert not (sites[UNAPPROVED_SITE] / "flwr-home" / "apps").exists()  # its code never reached disk
    assert metrics["rounds"][-1]["sites"].keys() == {"cleveland", "hungary"}  # final evaluation
    assert (run_dir / "model.pt").exists() and (run_dir / "serverapp.log").stat().st_size > 0

    # Every ledger line the coordinator holds is byte for byte one the site wrote in its own directory.
    for name in TRAINING_SITES:
        at_site = (sites[name] / "state" / "heart-disease" / "ledger.jsonl").read_text().splitlines()
        at_coordinator = (run_dir / "privacy" / f"ledger-{name}.jsonl").read_text().splitlines()
        assert at_coordinator and set(at_coordinator) <= set(at_site), name
        statuses = [json.loads(line)["status"] for line in at_coordinator]
        expected = ["enrolled", "trained"] if name == victim else ["enrolled", "trained", "trained", "closed"]
        assert statuses == expected, name
    # The run's audit cannot see the end of the killed site's ledger on its own; with that
    # hospital's own directory it can, and then everything verifies.
    assert audit_directory(run_dir).exit_code == 2
    anchored = audit_directory(run_dir, site_dirs=[sites[victim]])
    assert anchored.exit_code == 0, anchored.findings
    summary = json.loads((run_dir / "privacy" / "summary.json").read_text())
    assert all(0 < s["epsilon"] <= 3.0 for s in summary["sites"].values())
    print(f"\n2-round study with a drop-out: {elapsed:.1f} s")

    # The coordinator restarts from its database: sites and runs are still known, and the sites
    # that are still running reconnect by themselves and take the next study.
    fed.stop_superlink()
    fed.start_superlink()
    assert run_info(fed.coord, run_id)["status"] == "finished:completed"
    assert {s["site"] for s in site_status(fed.coord)} >= set(sites)
    wait_for(
        lambda: (
            {s["site"] for s in site_status(fed.coord) if s["status"] == "online"} >= {"cleveland", "hungary"}
        ),
        90,
        "the surviving sites to reconnect",
    )
    second = tmp_path / "run-2"
    run_id_2 = submit(
        fed.coord, study_file(tmp_path, "study-2.toml", rounds=1), second, app, expected_sites=3
    )
    info = follow(fed.coord, run_id_2, second, timeout=120)
    assert info["status"] == "finished:completed", info
    # Same study, so each site's accountant carried on from its own directory: its budget was
    # planned for the 2 rounds it already gave, and it declines a third.
    rounds = json.loads((second / "metrics.json").read_text())["rounds"]
    assert set(rounds[1]["declined"]) == {"cleveland", "hungary"}, rounds[1]
    assert all("budget" in reason for reason in rounds[1]["declined"].values())
    ledger = (sites["cleveland"] / "state" / "heart-disease" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in ledger] == [
        "enrolled", "trained", "trained", "closed", "enrolled", "declined", "closed"
    ]
    # Issue 14.10: the honest resubmission audits clean, in the run and at each site.
    result = audit_directory(second, site_dirs=[sites["cleveland"], sites["hungary"]])
    assert result.exit_code == 0, result.findings
    for name in ("cleveland", "hungary"):
        assert audit_directory(sites[name]).exit_code == 0, name
