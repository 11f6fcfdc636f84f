"""`pmfl site ...`: what a hospital's IT runs: create, check, approve, start."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.approval import ApprovalError, load_approval
from client.deploy.approvals import app_hash, approve_app, revoke_app

# client.deploy.site_dir (torch, pandas) is imported inside the commands that need it: `pmfl --help`
# stays fast.

site_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="markdown",  # help texts are Markdown: [[sites]] and [default: ...] print as written
    pretty_exceptions_show_locals=False,  # a traceback's local variables can hold patient rows
    help="Run a hospital site: its data, budget and approvals stay here.",
)
console = Console()
err_console = Console(stderr=True)
SiteDir = Annotated[Path, typer.Argument(help="the site directory")]


def _fail(exc: Exception, code: int = 1) -> None:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        err_console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code) from exc


@site_app.command("init")
def init(
    directory: SiteDir,
    name: Annotated[str, typer.Option(help="the site's name, as the coordinator will know it")],
    data: Annotated[Path, typer.Option(help="the site's CSV file (stays here)")],
    superlink: Annotated[str, typer.Option(help="coordinator address host:port")] = "127.0.0.1:8000",
    ca: Annotated[Path | None, typer.Option(help="the coordinator's CA certificate (copied in)")] = None,
    epsilon: Annotated[float, typer.Option(help="this site's epsilon budget per study")] = 3.0,
    delta: Annotated[float, typer.Option(help="this site's delta")] = 1e-5,
    max_rounds: Annotated[int, typer.Option(help="most training rounds given to one study")] = 50,
    study: Annotated[
        list[str] | None, typer.Option("--study", help="study name taken part in (repeat)")
    ] = None,
    runtime_port: Annotated[
        int | None, typer.Option(help="local port SuperNode <-> gate [default: 9094]")
    ] = None,
) -> None:
    """Create a site directory: site.toml, an authentication key pair, the coordinator's CA.\f

    (The form feed ending the summary line keeps the rest of this docstring out of --help.)

    Args:
        directory: The site directory to create.
        name: The site's name, as the coordinator will know it.
        data: The site's CSV file; it stays at the site.
        superlink: The coordinator's address, host:port.
        ca: The coordinator's CA certificate, copied in; None to put it there later.
        epsilon: The site's epsilon budget per study.
        delta: The site's delta.
        max_rounds: The most training rounds the site gives one study.
        study: The names of the studies the site takes part in; None for any.
        runtime_port: The local port between the SuperNode and the gate; None for the default.

    Raises:
        typer.Exit: With code 1 when the directory cannot be created (the reason is printed).
    """
    from client.deploy.site_dir import SiteAdminError, init_site
    from pm_common.study.config import StudyConfigError

    try:
        site_dir = init_site(
            directory,
            name,
            data,
            superlink=superlink,
            ca=ca,
            epsilon=epsilon,
            delta=delta,
            max_rounds=max_rounds,
            studies=tuple(study or ()),
            runtime_port=runtime_port,
        )
    except (SiteAdminError, StudyConfigError, OSError) as exc:
        _fail(exc)
    console.print(escape(f"site {name!r} created in {site_dir}"))
    console.print(
        f"  send {site_dir / 'keys' / 'site.pub'} to the coordinator (public key; keep site.key here)"
    )
    if ca is None:
        console.print(escape(f"  put the coordinator's CA certificate in {site_dir / 'tls' / 'ca.crt'}"))
    console.print("  review and approve the study app: pmfl site approve DIR --app SOURCE (or --hash)")


@site_app.command("check")
def check(
    directory: SiteDir,
    study: Annotated[Path, typer.Option(help="the study TOML (its data contract)")],
) -> None:
    """Validate the site's data against the study's contract; prints counts, sends nothing.\f

    Lets a site find problems with its data before it joins a run, without anything leaving it.

    Args:
        directory: The site's directory.
        study: The study TOML whose data contract the data is checked against.

    Raises:
        typer.Exit: With code 2 when the study or site cannot be read, 1 when the check finds problems.
    """
    from client.deploy.site_dir import check_site
    from pm_common.study.config import StudyConfigError

    try:
        report = check_site(directory, study)
    except (StudyConfigError, ApprovalError, OSError) as exc:
        _fail(exc, 2)
    title = f"site {report.site}: study {report.study} (nothing was sent)"
    table = Table(title=escape(title), show_header=False)
    table.add_row("data", escape(str(report.data)))
    skipped = f" ({report.rows_dropped} files skipped)" if report.rows_dropped else ""
    table.add_row("usable rows", f"{report.rows}{skipped}")
    table.add_row("positive labels", str(report.positives))
    table.add_row("train / test rows", f"{report.train_rows} / {report.test_rows}")
    if report.inputs:
        table.add_row("model inputs", str(report.inputs))
    if report.noise_multiplier is not None:
        table.add_row(
            "DP-SGD plan",
            f"ε={report.epsilon:g}, δ={report.delta:g} over {report.planned_rounds} rounds: "
            f"noise multiplier {report.noise_multiplier:.3f}",
        )
    else:
        table.add_row("DP-SGD plan", "[bold red]dp = false: no privacy guarantee[/]")
    table.add_row("study approved", "yes" if report.study_accepted else "[red]no[/]")
    table.add_row("apps approved", str(report.apps_approved))
    console.print(table)
    for problem in report.problems:
        for line in problem.splitlines():
            console.print(f"[red]problem:[/] {escape(line)}", soft_wrap=True, highlight=False)
    if not report.ok:
        raise typer.Exit(1)
    console.print("[green]ok[/]: the data fits the study's contract")


@site_app.command("approve")
def approve(
    directory: SiteDir,
    app_dir: Annotated[Path | None, typer.Option("--app", help="source tree of the study app")] = None,
    fab_hash: Annotated[str | None, typer.Option("--hash", help="SHA-256 of the study app (FAB)")] = None,
    revoke: Annotated[bool, typer.Option(help="withdraw the approval instead")] = False,
) -> None:
    """Approve (or revoke) a study app by its hash: the site runs no other code.\f

    Args:
        directory: The site's directory.
        app_dir: The study app's source tree, hashed as `flwr run` would build it; or give `fab_hash`.
        fab_hash: The app's SHA-256; or give `app_dir`.
        revoke: Withdraw the approval instead of giving it.

    Raises:
        typer.Exit: With code 2 unless exactly one of `app_dir` and `fab_hash` is given, 1 when the
            approval cannot be changed.
    """
    if (app_dir is None) == (fab_hash is None):
        _fail(ValueError("give --app SOURCE_DIR or --hash SHA256"), 2)
    try:
        digest = app_hash(app_dir, directory) if app_dir is not None else str(fab_hash)
        changed = revoke_app(directory, digest) if revoke else approve_app(directory, digest)
    except (ApprovalError, OSError) as exc:
        _fail(exc)
    verb = "revoked" if revoke else "approved"
    console.print(escape(f"{verb}: {digest}" + ("" if changed else " (no change)")))


@site_app.command("status")
def status(directory: SiteDir) -> None:
    """What this site approved, its ledgers so far, and the digest of every roster it signed.\f

    The roster digests are what a hospital hands an auditor to pin a run's roster out of band.

    Args:
        directory: The site's directory (or a simulated site's records, without a site.toml).

    Raises:
        typer.Exit: With code 1 when site.toml cannot be read.
    """
    if (Path(directory) / "site.toml").exists():
        try:
            approval = load_approval(directory)
        except ApprovalError as exc:
            _fail(exc)
        console.print(escape(f"site {approval.site}: studies {list(approval.studies or ['(any)'])}"))
        for digest in approval.apps:
            console.print(escape(f"  approved app {digest}"))
    else:  # a simulated hospital's directory: its records, without a site.toml
        console.print(escape(f"{directory}: no site.toml (a simulated site's records)"))
    for ledger in sorted((Path(directory) / "state").glob("*/ledger.jsonl")):
        lines = ledger.read_text(encoding="utf-8").splitlines()
        console.print(escape(f"  {ledger.parent.name}: {len(lines)} ledger lines in {ledger}"))
        for run, digest in signed_rosters(ledger.parent):
            console.print(escape(f"    run {run}: signed roster {digest} (give it to an auditor: "
                                 "pmfl audit RUN --roster DIGEST)"))


def signed_rosters(study_dir: Path) -> list[tuple[str, str]]:
    """(run, roster digest) of every roster this site signed for a study, oldest first.

    Args:
        study_dir: the site's `state/<study>/` directory.

    Returns:
        One pair per run; unreadable copies are left out (`pmfl audit SITE_DIR` reports them).
    """
    import json

    from pm_common.records.roster import Roster, RosterError

    found = []
    for copy in sorted((study_dir / "rosters").glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            roster = Roster.from_dict(json.loads(copy.read_text(encoding="utf-8"))["roster"])
        except (RosterError, ValueError, KeyError, OSError):
            continue
        found.append((roster.run, roster.digest))
    return found


@site_app.command("start")
def start(
    directory: SiteDir,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="plain HTTP, no authentication: local tests only")
    ] = False,
    superlink: Annotated[str | None, typer.Option(help="override [connection] superlink")] = None,
) -> None:
    """Start the site's SuperNode (TLS + its key) and its gate; runs until stopped (Ctrl-C).\f

    Args:
        directory: The site's directory.
        insecure: Plain HTTP without authentication, for local tests only.
        superlink: An address overriding `[connection] superlink`; None to use it.

    Raises:
        typer.Exit: With code 1 when the site cannot start, otherwise with the processes' exit code.
    """
    if insecure:
        console.print("[bold red]--insecure: no TLS and no authentication. Never with real data.")
    from client.deploy.site_dir import SiteAdminError, start_site
    from pm_common.study.config import StudyConfigError

    try:
        procs = start_site(directory, insecure=insecure, superlink=superlink)
    except (SiteAdminError, StudyConfigError, ApprovalError, OSError) as exc:
        _fail(exc)
    console.print(
        f"site running (SuperNode pid {procs.supernode.pid}, gate pid {procs.gate.pid}); Ctrl-C stops it"
    )
    signal.signal(signal.SIGTERM, lambda *_: procs.stop())
    try:
        code = procs.wait()
    except KeyboardInterrupt:
        procs.stop()
        code = 0
    raise typer.Exit(code)
