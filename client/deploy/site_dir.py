"""A hospital's site directory: create it, check its data against a study, start its SuperNode.

Why one directory: everything the hospital controls lives in it and nowhere else: `site.toml`
(data path, the site's own budget and round limit, approved studies and apps, the coordinator's
address), the authentication key pair (`keys/`), the coordinator's CA (`tls/`), the privacy
accountant and ledger (`state/<study>/`), and Flower's unpacked apps (`flwr-home/`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.approval import SITE_TOML, load_approval
from client.deploy.supernode import POLL_ENV
from pm_common.deploy.processes import console_script, flower_env
from pm_common.study.schema import InputError, Integer, Number, Rule, Text, check_table, read_toml

# client.site, pm_common.privacy.accountant (torch, Opacus: seconds to import) are imported where they are
# needed, so that `pmfl site init` and `approve` start fast.

PRIVATE_KEY = "keys/site.key"
PUBLIC_KEY = "keys/site.pub"
CA_FILE = "tls/ca.crt"
DEFAULT_RUNTIME_PORT = 9094

SITE_TEMPLATE = """\
# pmfl hospital site `{name}`. Everything in this directory stays at the hospital.

[site]
name = "{name}"
data = "{data}"  # relative to this directory, or absolute; never leaves the site
# delimiter = ","
# encoding = "utf-8"
# thousands = ""  # "," when the export writes 265,000; "." for 265.000 (then decimal = ",")
# decimal = "."

[privacy]  # this site's own budget: the coordinator cannot change it
dp = true
epsilon = {epsilon}
delta = {delta}
max_rounds = {max_rounds}  # the most training rounds this site gives one study

[approval]  # what this site runs; everything else is refused here, at the site
studies = [{studies}]  # [study] names this site takes part in
apps = []  # SHA-256 of each approved study app: `pmfl site approve DIR --app SOURCE_DIR`

[connection]
superlink = "{superlink}"  # the coordinator's address (the only outbound connection)
root_certificates = "{ca}"  # CA of the coordinator's TLS certificate
private_key = "{private_key}"  # this site's authentication key; register {public_key} with the coordinator
runtime_port = {runtime_port}  # loopback-only port between the SuperNode and the site's gate
poll_interval = {poll_interval}  # seconds between pulls when idle (Flower's fixed default: 3)
"""


class SiteAdminError(ValueError):
    """The site directory cannot be created, checked or started as asked; says why."""


# -- init -------------------------------------------------------------------------------------


def write_key_pair(private_path: Path, public_path: Path) -> str:
    """An EC P-384 key pair in OpenSSH format (what flower-supernode and `flwr supernode register` read).

    The private key is readable by its owner only (created with mode 0600).

    Args:
        private_path: Where to write the private key; its parent directory is created when missing.
        public_path: Where to write the public key line.

    Returns:
        The public key line, to hand to the coordinator.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path.write_bytes(public + b"\n")
    return public.decode()


def init_site(
    site_dir: Path,
    name: str,
    data: Path,
    *,
    superlink: str = "127.0.0.1:8000",
    ca: Path | None = None,
    epsilon: float = 3.0,
    delta: float = 1e-5,
    max_rounds: int = 50,
    studies: tuple[str, ...] = (),
    runtime_port: int | None = None,
    poll_interval: float = 0.5,
) -> Path:
    """Create `site_dir` with its `site.toml` and key pair; copy the coordinator's CA if given.

    The new site.toml is read back with the same checks the ClientApp and the gate apply, so a site
    that cannot start fails here, at set-up, rather than at its first task.

    Args:
        site_dir: The directory to make a site of (created when missing).
        name: The site's name, as the coordinator will know it.
        data: The site's CSV file; recorded relative to the site directory when inside it.
        superlink: The coordinator's address, host:port.
        ca: The coordinator's CA certificate to copy in; None to put it there later.
        epsilon: The site's epsilon budget per study.
        delta: The site's delta.
        max_rounds: The most training rounds the site gives one study.
        studies: The names of the studies the site takes part in; empty for any.
        runtime_port: The local port between the SuperNode and the gate; None for the default.
        poll_interval: Seconds between the SuperNode's polls of the coordinator.

    Returns:
        The site directory, resolved.

    Raises:
        SiteAdminError: When the directory is already a site, or the name is not a valid site name.
    """
    site_dir = Path(site_dir).resolve()
    config = site_dir / SITE_TOML
    if config.exists():
        raise SiteAdminError(f"{config} exists: this directory is already a site")
    if not name or any(c in name for c in '"\\\n'):
        raise SiteAdminError(f"invalid site name {name!r}")
    site_dir.mkdir(parents=True, exist_ok=True)
    data = Path(data).expanduser().resolve()
    data_text = str(data.relative_to(site_dir)) if data.is_relative_to(site_dir) else str(data)
    write_key_pair(site_dir / PRIVATE_KEY, site_dir / PUBLIC_KEY)
    if ca is not None:
        (site_dir / CA_FILE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca, site_dir / CA_FILE)
    config.write_text(
        SITE_TEMPLATE.format(
            name=name,
            data=data_text,
            epsilon=epsilon,
            delta=delta,
            max_rounds=max_rounds,
            studies=", ".join(f'"{s}"' for s in studies),
            superlink=superlink,
            ca=CA_FILE,
            private_key=PRIVATE_KEY,
            public_key=PUBLIC_KEY,
            runtime_port=runtime_port or DEFAULT_RUNTIME_PORT,
            poll_interval=poll_interval,
        ),
        encoding="utf-8",
    )
    read_toml(config)  # what the ClientApp and the gate will read must parse
    load_connection(site_dir)
    load_approval(site_dir)
    return site_dir


# -- connection settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class SiteConnection:
    """How the site reaches the coordinator: `[connection]` of its `site.toml`."""

    superlink: str
    root_certificates: Path
    private_key: Path
    runtime_port: int
    poll_interval: float | None  # None: Flower's own 3 s idle poll, unpatched


CONNECTION_RULES: dict[str, Rule] = {
    "superlink": Text(max_length=300, what="a host:port address"),
    "root_certificates": Text(max_length=4096, what="a file path"),
    "private_key": Text(max_length=4096, what="a file path"),
    "runtime_port": Integer(1, 65535),
    "poll_interval": Number(0.01, 60),  # seconds; 0 would poll the coordinator without pause
}


def load_connection(site_dir: Path) -> SiteConnection:
    """The site's `[connection]` table, every key checked.

    Args:
        site_dir: The site's directory.

    Returns:
        The connection settings, with paths resolved against the site directory and defaults filled in.

    Raises:
        SiteAdminError: every problem of the table, one line each, named `[connection].key`.
    """
    site_dir = Path(site_dir).resolve()
    path = site_dir / SITE_TOML
    try:
        raw = read_toml(path)
    except InputError as exc:
        raise SiteAdminError(str(exc)) from None
    problems: list[str] = []
    table = check_table(raw.get("connection", {}), CONNECTION_RULES, "[connection]", problems)
    if problems or table is None:
        raise SiteAdminError("\n".join(f"{path}: {problem}" for problem in problems))
    return SiteConnection(
        superlink=table.get("superlink", "127.0.0.1:8000"),
        root_certificates=site_dir / table.get("root_certificates", CA_FILE),
        private_key=site_dir / table.get("private_key", PRIVATE_KEY),
        runtime_port=table.get("runtime_port", DEFAULT_RUNTIME_PORT),
        poll_interval=table.get("poll_interval"),
    )


# -- check ------------------------------------------------------------------------------------


@dataclass
class CheckReport:
    """What `pmfl site check` found. Counts only: nothing here is patient-level."""

    site: str
    study: str
    data: Path
    rows: int = 0
    rows_dropped: int = 0  # unusable image files skipped (tabular problems are errors instead)
    positives: int = 0
    train_rows: int = 0
    test_rows: int = 0
    inputs: int = 0
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    planned_rounds: int = 0
    study_accepted: bool = False
    apps_approved: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_site(site_dir: Path, study_path: Path) -> CheckReport:
    """Validate the site's data against the study's contract, locally; sends nothing anywhere.

    Loads the data exactly as the ClientApp will (same validation, encoding and split), so what it
    reports is what a run would meet.

    Args:
        site_dir: The site's directory.
        study_path: The study TOML.

    Returns:
        The report: counts of rows, labels and inputs, the DP plan, whether the study and apps are
        approved, and every problem found (data problems are reported, not raised).
    """
    import torch

    from client.site import load_site_config, load_site_data
    from pm_common.privacy.accountant import plan_study
    from pm_common.study.config import load_study, study_text_for_sites

    site_dir = Path(site_dir).resolve()
    spec = load_site_config(site_dir)
    study = load_study(study_path)
    approval = load_approval(site_dir)
    report = CheckReport(site=spec.name, study=study.name, data=spec.data)
    report.study_accepted = not approval.study_refusal(study.name)
    report.apps_approved = len(approval.apps)
    if not report.study_accepted:
        report.problems.append(approval.study_refusal(study.name))
    try:  # exactly what the ClientApp will load: the same validation, encoding and split
        data = load_site_data(spec, study_text_for_sites(study))
    except ValueError as exc:  # a DataValidationError lists every problem with row and column
        report.problems.append(str(exc))
        return report
    labels = torch.cat([data.train_y, data.test_y])
    report.train_rows, report.test_rows = len(data.train_y), len(data.test_y)
    report.rows, report.rows_dropped = report.train_rows + report.test_rows, len(data.skipped)
    report.positives = int(labels.sum())
    report.inputs = study.contract.num_inputs if study.contract is not None else 0
    privacy = spec.privacy
    report.planned_rounds = min(study.rounds, privacy.max_rounds or study.rounds)
    if privacy.dp:
        plan = plan_study(
            epsilon_budget=privacy.epsilon,
            delta=privacy.delta,
            num_examples=report.train_rows,
            batch_size=study.training.batch_size,
            local_epochs=study.training.local_epochs,
            planned_rounds=report.planned_rounds,
            max_grad_norm=study.training.max_grad_norm,
            accountant=privacy.accountant,
        )
        report.noise_multiplier = plan.noise_multiplier
        report.epsilon, report.delta = privacy.epsilon, privacy.delta
    if report.positives in (0, report.rows):
        report.problems.append("all usable rows have the same label: nothing to learn from this site")
    return report


# -- start ------------------------------------------------------------------------------------


def site_env(site_dir: Path) -> dict[str, str]:
    """Environment of the site's processes: Flower's files in the site directory, no telemetry.

    Args:
        site_dir: The site's directory.

    Returns:
        The environment variables for the SuperNode and gate, including the poll interval when set.
    """
    env = flower_env(FLWR_HOME=str(Path(site_dir).resolve() / "flwr-home"))
    poll = load_connection(site_dir).poll_interval
    if poll is not None:
        env[POLL_ENV] = str(poll)
    return env


def supernode_command(site_dir: Path, insecure: bool = False, superlink: str | None = None) -> list[str]:
    """`flower-supernode` for this site, with the ClientApp tasks left to the site's gate.

    TLS with the coordinator's CA and the site's key, and `--isolation process` so that the gate
    decides which app runs. Under a 3 s poll interval pmfl's patched launcher runs instead.

    Args:
        site_dir: The site's directory.
        insecure: Plain HTTP without authentication, for local tests only.
        superlink: An address overriding `[connection] superlink`; None to use it.

    Returns:
        The command line.

    Raises:
        SiteAdminError: When, without `insecure`, the coordinator's CA or the site's key is missing.
    """
    site_dir = Path(site_dir).resolve()
    conn = load_connection(site_dir)
    approval = load_approval(site_dir)
    if conn.poll_interval is not None and conn.poll_interval < 3:
        launcher = [sys.executable, "-P", "-m", "client.deploy.supernode"]  # see its docstring
    else:
        launcher = [_script("flower-supernode")]
    cmd = [
        *launcher,
        "--superlink",
        superlink or conn.superlink,
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(conn.runtime_port),
        "--node-config",
        f"site-dir='{site_dir}'",
    ]
    if insecure:
        cmd.append("--insecure")  # no TLS, hence no authentication either: Flower refuses the key
    else:
        for path, what in ((conn.root_certificates, "the coordinator's CA"), (conn.private_key, "key")):
            if not path.is_file():
                raise SiteAdminError(f"missing {what}: {path}")
        cmd += ["--root-certificates", str(conn.root_certificates)]
        cmd += ["--auth-supernode-private-key", str(conn.private_key)]
    if approval.trusted_entities is not None:
        cmd += ["--trusted-entities", str(approval.trusted_entities)]
    return cmd


def gate_command(site_dir: Path, parent_pid: int) -> list[str]:
    """The command line of the site's gate, serving the SuperNode's ClientApp tasks on localhost.

    Run with `-P`, so the site directory (its working directory) never shadows installed modules, and
    with the SuperNode's pid, so the gate stops when the SuperNode does.

    Args:
        site_dir: The site's directory.
        parent_pid: The SuperNode's process id.

    Returns:
        The command line.
    """
    conn = load_connection(site_dir)
    return [
        sys.executable,
        "-P",  # the site directory (cwd) never shadows installed modules
        "-m",
        "client.deploy.gate",
        "--site-dir",
        str(Path(site_dir).resolve()),
        "--runtime-api-address",
        f"127.0.0.1:{conn.runtime_port}",
        "--parent-pid",
        str(parent_pid),
    ]


_script = console_script


@dataclass
class SiteProcesses:
    """The SuperNode and the gate of one site, started and stopped together."""

    supernode: subprocess.Popen[bytes]
    gate: subprocess.Popen[bytes]

    def poll(self) -> int | None:
        """None while both run; otherwise the exit code of the first that stopped."""
        for proc in (self.supernode, self.gate):
            if (code := proc.poll()) is not None:
                return code
        return None

    def wait(self) -> int:
        while (code := self.poll()) is None:
            time.sleep(0.5)
        self.stop()
        return code

    def stop(self, timeout: float = 10.0) -> None:
        for proc in (self.gate, self.supernode):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in (self.gate, self.supernode):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """Stop abruptly, as a crash or power cut would (no goodbye to the coordinator)."""
        for proc in (self.gate, self.supernode):
            if proc.poll() is None:
                proc.kill()
        for proc in (self.gate, self.supernode):
            proc.wait()


def start_site(
    site_dir: Path,
    *,
    insecure: bool = False,
    superlink: str | None = None,
    stdout: IO[bytes] | int | None = None,
) -> SiteProcesses:
    """Start the site's SuperNode and gate (returns at once; `wait()` or `stop()` them).

    Args:
        site_dir: The site's directory; its configuration is checked before anything starts.
        insecure: Plain HTTP without authentication, for local tests only.
        superlink: An address overriding `[connection] superlink`; None to use it.
        stdout: Where both processes write their output (stderr included); None to inherit.

    Returns:
        The two processes.
    """
    from client.site import load_site_config

    site_dir = Path(site_dir).resolve()
    load_site_config(site_dir)  # fail here, not inside the first task
    env = site_env(site_dir)
    (site_dir / "flwr-home").mkdir(exist_ok=True)
    supernode = subprocess.Popen(
        supernode_command(site_dir, insecure, superlink),
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not None else None,
        cwd=site_dir,
    )
    gate = subprocess.Popen(
        gate_command(site_dir, supernode.pid),
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not None else None,
        cwd=site_dir,
    )
    return SiteProcesses(supernode, gate)
