"""The deployed form, with real processes on separate hosts: a SuperLink with TLS and site
authentication, hospital sites each with its own directory, data, key and gate, and `flwr run` in
between.

Each host is a network namespace with its own address (tests/netns.py), as separate machines on one
network would be: the coordinator's SuperLink listens on the coordinator's address (not 127.0.0.1)
with a certificate for that address (`pmfl coordinator pki --host ADDR`), and the `flwr` CLI, the
ServerApp and `pmfl coordinator`'s own calls run on the coordinator's host; each site dials the
coordinator's address from its own host, where its SuperNode and gate use the default loopback
runtime port (every host has its own ports).

Covered: a client without the CA cannot connect; a site whose key is not registered is refused; a
3-site DP study completes although one site is killed mid-study (the drop-out is reported) and a
fourth, registered site refuses the app it never approved (its code is never unpacked there); the
coordinator restarts from its database and runs the next study with the sites that are left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from client.deploy.approvals import app_hash, approve_app
from client.deploy.site_dir import SiteProcesses, init_site, site_env, start_site, write_key_pair
from pm_common.audit.directories import audit_directory
from pm_common.study.config import load_study
from server.deploy.coordinator import (
    DEFAULT_PORT,
    Coordinator,
    collect,
    follow,
    register_site,
    run_info,
    site_status,
    start_superlink,
    submit,
)
from server.deploy.pki import write_pilot_pki
from tests.netns import Host, Network, network_or_skip

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "pm_common" / "datasets" / "heart_disease"
STUDY = REPO / "docker" / "studies" / "heart_disease.toml"
TRAINING_SITES = ("cleveland", "hungary", "switzerland")
UNAPPROVED_SITE = "va_long_beach"


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
    """One coordinator host with its directory and SuperLink, and a host per site a test adds."""

    def __init__(self, root: Path, network: Network) -> None:
        self.root = root
        self.network = network
        self.coordinator_host = network.add_host("coordinator")
        self.coord = Coordinator(root / "coordinator")
        self.port = DEFAULT_PORT  # the coordinator's host has its own ports
        self.superlink: subprocess.Popen[bytes] | None = None
        self.hosts: dict[str, Host] = {}
        self.sites: dict[str, SiteProcesses] = {}
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)

    @property
    def address(self) -> str:
        return f"{self.coordinator_host.address}:{self.port}"

    def on_coordinator(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `call` on the coordinator's host (the `flwr` CLI and Control API client it uses)."""
        with self.coordinator_host.entered():
            return call(*args, **kwargs)

    def start_superlink(self) -> None:
        log = (self.logs / "superlink.log").open("ab")
        with self.coordinator_host.entered():  # `pmfl coordinator start --host ADDR`
            self.superlink = start_superlink(self.coord, host=self.coordinator_host.address, stdout=log)
        some_host = next(iter(self.hosts.values()), self.coordinator_host)
        wait_for(lambda: some_host.listening(self.coordinator_host.address, self.port), 60, "the SuperLink")

    def stop_superlink(self) -> None:
        if self.superlink is not None:
            stop(self.superlink)

    def kill_coordinator(self) -> None:
        """SIGKILL the SuperLink and everything it started (its SuperExec, the ServerApp): no
        clean-up, no goodbye, as a power cut of the coordinator's machine would."""
        assert self.superlink is not None
        for pid in [*_descendants(self.superlink.pid), self.superlink.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.superlink.wait()

    def status(self) -> list[dict[str, Any]]:
        return self.on_coordinator(site_status, self.coord)

    def register(self, site: Path, name: str) -> int:
        return self.on_coordinator(register_site, self.coord, site / "keys" / "site.pub", name)

    def new_site(self, name: str, approve: str | None, data: Path | None = None,
                 studies: tuple[str, ...] = ("heart-disease",)) -> Path:
        """A site directory on a host of its own, dialing the coordinator's address."""
        self.hosts[name] = self.network.add_host(name)
        site = init_site(
            self.root / "sites" / name,
            name,
            data or DATA / f"{name}.csv",
            superlink=self.address,
            ca=self.coord.pki.ca_cert,
            studies=studies,
        )
        if approve:
            approve_app(site, approve)
        return site

    def start_site(self, site: Path) -> SiteProcesses:
        log = (self.logs / f"{site.name}.log").open("ab")
        with self.hosts[site.name].entered():
            procs = start_site(site, stdout=log)
        self.sites[site.name] = procs
        return procs

    def close(self) -> None:
        for procs in self.sites.values():
            procs.stop()
        self.stop_superlink()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deployment")
    with network_or_skip("deploy") as network:
        fed = Federation(root, network)
        # `pmfl coordinator pki DIR --host ADDR`: SANs ADDR, 127.0.0.1, localhost
        write_pilot_pki(fed.coord.pki.directory, [fed.coordinator_host.address, "127.0.0.1", "localhost"])
        try:
            fed.start_superlink()
            yield fed
        finally:
            fed.close()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, deepest first (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))

    def below(node: int) -> list[int]:
        return [p for child in children.get(node, []) for p in (*below(child), child)]

    return below(pid)


def _supernode_refused(fed: Federation, name: str, args: list[str], site: Path) -> str:
    """Run a bare flower-supernode on the site's host that should be turned away; its log."""
    log_path = fed.logs / f"{name}.log"
    with log_path.open("wb") as log:
        proc = fed.hosts[site.name].popen(
            ["flower-supernode", "--superlink", fed.address, "--port", "9094", *args],
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
    federation.register(site, "no-ca")
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


def test_study_survives_dropout_and_coordinator_restart(federation: Federation, tmp_path: Path) -> None:
    fed = federation
    app = snapshot_app(tmp_path / "app")
    digest = app_hash(app)
    sites = {name: fed.new_site(name, approve=digest) for name in TRAINING_SITES}
    sites[UNAPPROVED_SITE] = fed.new_site(UNAPPROVED_SITE, approve=None)
    for name, site in sites.items():
        fed.register(site, name)
        fed.start_site(site)
    wait_for(
        lambda: sum(s["status"] == "online" for s in fed.status() if s["site"] in sites) == 4,
        90,
        "four sites online",
    )

    # A 2-round DP study with secure aggregation; the third site is killed (no goodbye) once
    # round 1 is in: its pairwise masks, already in round 2's plan, are removed from its shares.
    run_dir = tmp_path / "run"
    started = time.monotonic()
    study = study_file(tmp_path, "study.toml", rounds=2, secure_aggregation={"enabled": True})
    run_id = fed.on_coordinator(submit, fed.coord, study, run_dir, app, expected_sites=4)
    metrics_path = run_dir / "metrics.json"

    def round_one_recorded() -> bool:
        if not metrics_path.exists():
            return False
        rounds = json.loads(metrics_path.read_text())["rounds"]
        return len(rounds) > 1 and len(rounds[1]["trained"]) == 3

    wait_for(round_one_recorded, 150, "round 1 with three sites", interval=0.1)
    victim = "switzerland"
    fed.sites[victim].kill()
    info = fed.on_coordinator(follow, fed.coord, run_id, run_dir, timeout=240)
    elapsed = time.monotonic() - started
    deployment = fed.on_coordinator(collect, fed.coord, run_id, run_dir, info)
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
    assert fed.on_coordinator(run_info, fed.coord, run_id)["status"] == "finished:completed"
    assert {s["site"] for s in fed.status()} >= set(sites)
    wait_for(
        lambda: {s["site"] for s in fed.status() if s["status"] == "online"} >= {"cleveland", "hungary"},
        90,
        "the surviving sites to reconnect",
    )
    second = tmp_path / "run-2"
    study_2 = study_file(tmp_path, "study-2.toml", rounds=1)
    run_id_2 = fed.on_coordinator(submit, fed.coord, study_2, second, app, expected_sites=3)
    info = fed.on_coordinator(follow, fed.coord, run_id_2, second, timeout=120)
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


def test_coordinator_killed_mid_study_resumes_and_audits_clean(federation: Federation, tmp_path: Path) -> None:  # noqa: E501
    """Claim: budgets hold through a coordinator crash in deployment: after a SIGKILL of the whole
    coordinator mid-study and a restart, `pmfl coordinator run --resume` finishes the study; every
    round each site ran is in its ledger once under a unique attempt, the run's copy is the sites'
    own, and the audit passes (issue 14.11).
    Fault: SIGKILL of the SuperLink, its SuperExec and the ServerApp once round 1 is recorded."""
    fed = federation
    app = snapshot_app(tmp_path / "app")
    digest = app_hash(app)
    study_name = "heart-disease-crash"
    names = {"crash-cleveland": "cleveland", "crash-hungary": "hungary"}
    sites = {
        name: fed.new_site(name, approve=digest, data=DATA / f"{data}.csv", studies=(study_name,))
        for name, data in names.items()
    }
    for name, site in sites.items():
        fed.register(site, name)
        fed.start_site(site)
    wait_for(lambda: sum(s["status"] == "online" for s in fed.status() if s["site"] in sites) == 2, 90,
             "two sites online")
    raw = {**load_study(STUDY).raw}
    raw["study"] = {**raw["study"], "name": study_name, "rounds": 3}
    study = tmp_path / "crash.toml"
    study.write_text(tomli_w.dumps(raw), encoding="utf-8")
    run_dir = tmp_path / "run"
    fed.on_coordinator(submit, fed.coord, study, run_dir, app, expected_sites=2)
    metrics_path = run_dir / "metrics.json"

    def round_one_recorded() -> bool:
        return metrics_path.exists() and len(json.loads(metrics_path.read_text())["rounds"]) > 1

    wait_for(round_one_recorded, 150, "round 1 recorded", interval=0.1)
    fed.kill_coordinator()
    fed.start_superlink()
    wait_for(lambda: sum(s["status"] == "online" for s in fed.status() if s["site"] in sites) == 2, 90,
             "the sites to reconnect")
    run_id = fed.on_coordinator(submit, fed.coord, study, run_dir, app, expected_sites=2, resume=True)
    info = fed.on_coordinator(follow, fed.coord, run_id, run_dir, timeout=240)
    assert info["status"] == "finished:completed", info

    assert len(json.loads((run_dir / "attempts.json").read_text())) == 2
    for name, site in sites.items():
        at_site = (site / "state" / study_name / "ledger.jsonl").read_text().splitlines()
        at_run = (run_dir / "privacy" / f"ledger-{name}.jsonl").read_text().splitlines()
        assert at_run == at_site, name  # the run's copy completed from the site's own
        lines = [json.loads(line) for line in at_run]
        assert lines[0]["status"] == "enrolled" and lines[-1]["status"] == "closed"
        answered = [(e["round"], e["attempt"]) for e in lines if e["status"] in ("trained", "declined")]
        assert len(answered) == len(set(answered)), name
        assert any(attempt == 1 for _, attempt in answered), name  # rounds after the restart
        assert sum(e["status"] == "trained" for e in lines) <= 3 and lines[-1]["epsilon"] <= 3.0
    result = audit_directory(run_dir, site_dirs=list(sites.values()))
    assert result.exit_code == 0, result.findings
    assert audit_directory(run_dir).exit_code == 0
