"""`pmfl coordinator ...`: certificates, the SuperLink, site registration and deployed studies."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.deploy.coordinator import (
    DEFAULT_PORT,
    Coordinator,
    CoordinatorError,
    collect,
    follow,
    register_site,
    site_status,
    start_superlink,
    submit,
    unregister_site,
)
from server.deploy.pki import PkiError, PkiPaths, check_pki_files, write_pilot_pki

coordinator_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="markdown",  # help texts are Markdown: [[sites]] and [default: ...] print as written
    pretty_exceptions_show_locals=False,  # a traceback's local variables can hold patient rows
    help="Run the coordinator: certificates, the SuperLink, site keys and deployed studies.",
)
console = Console()
err_console = Console(stderr=True)
CoordDir = Annotated[Path, typer.Argument(help="coordinator directory (certificates, database, runs)")]


def _say(text: str) -> None:
    """Print text that is not markup: bracketed names ([[sites]], a site's reason) show as written."""
    console.print(escape(text))


def _fail(exc: Exception) -> None:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        err_console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
    raise typer.Exit(1) from exc


@coordinator_app.command("pki")
def pki(
    directory: CoordDir,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="name or IP the sites dial (repeat); 127.0.0.1 and localhost always"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing certificate set")] = False,
) -> None:
    """Make a pilot CA and the SuperLink's server certificate (SANs = --host values).\f

    Args:
        directory: The coordinator's directory; the certificates go to its pki/ folder.
        host: The names or IPs the sites dial; 127.0.0.1 and localhost are always added.
        overwrite: Replace an existing certificate set.

    Raises:
        typer.Exit: With code 1 when the certificates cannot be made (e.g. they exist already).
    """
    hosts = list(dict.fromkeys([*(host or []), "127.0.0.1", "localhost"]))
    try:
        paths = write_pilot_pki(Coordinator(directory).pki.directory, hosts, overwrite=overwrite)
    except PkiError as exc:
        _fail(exc)
    console.print(escape(f"CA certificate (give to every site): {paths.ca_cert}"))
    console.print(escape(f"server certificate for {', '.join(hosts)}: {paths.server_cert}"))
    console.print(f"[yellow]keep private:[/] {escape(f'{paths.ca_key}, {paths.server_key}')}")


@coordinator_app.command("check-pki")
def check_pki(
    directory: CoordDir,
    host: Annotated[str, typer.Option(help="the address sites dial")] = "127.0.0.1",
) -> None:
    """Check a certificate set (e.g. from the hospital's own PKI) in DIR/pki for --host.\f

    Args:
        directory: The coordinator's directory.
        host: The address the sites dial, which the server certificate must be valid for.

    Raises:
        typer.Exit: With code 1 when the set is incomplete or not valid for `host`.
    """
    try:
        cert = check_pki_files(PkiPaths(Coordinator(directory).pki.directory), host)
    except PkiError as exc:
        _fail(exc)
    valid = f"{cert.subject.rfc4514_string()} is valid for {host}, until {cert.not_valid_after_utc}"
    console.print(f"[green]ok[/]: {escape(valid)}")


@coordinator_app.command("start")
def start(
    directory: CoordDir,
    host: Annotated[
        str,
        typer.Option(
            help="address to listen on: this host's address the sites dial, or 0.0.0.0 for every interface"
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTPS port (Fleet, Control and Runtime APIs)")] = DEFAULT_PORT,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="plain HTTP, no site authentication: local tests only")
    ] = False,
    remote_control: Annotated[
        bool,
        typer.Option(
            "--remote-control",
            help="also answer the Control and Runtime APIs (no user authentication) to other hosts",
        ),
    ] = False,
) -> None:
    """Start the SuperLink: TLS, site-key authentication, state in DIR/state/superlink.db.

    Sites reach its Fleet API on HOST:PORT; its Control API (runs, site keys) and Runtime API answer
    this host only, unless --remote-control.\f

    Args:
        directory: The coordinator's directory.
        host: The address to listen on.
        port: The HTTPS port of the Fleet, Control and Runtime APIs.
        insecure: Plain HTTP without site authentication, for local tests only.
        remote_control: Also answer the Control and Runtime APIs (no user authentication) to other hosts.

    Raises:
        typer.Exit: With code 1 when the SuperLink cannot start, otherwise with its exit code.
    """
    coord = Coordinator(directory.resolve())
    if insecure:
        console.print("[bold red]--insecure: no TLS and no site authentication. Never with real data.")
    if remote_control:
        console.print("[bold red]--remote-control: whoever reaches the port can run code here and add sites.")
    try:
        proc = start_superlink(coord, host, port, insecure, remote_control=remote_control)
    except (PkiError, CoordinatorError) as exc:
        _fail(exc)
    _say(f"SuperLink on {host}:{port} (pid {proc.pid}); state in {coord.database}; Ctrl-C stops it")
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    raise typer.Exit(code)


@coordinator_app.command("register")
def register(
    directory: CoordDir,
    public_key: Annotated[Path, typer.Argument(help="the site's keys/site.pub")],
    name: Annotated[str, typer.Option(help="the site's name")],
) -> None:
    """Register a site's public key: only registered sites can connect.\f

    Args:
        directory: The coordinator's directory.
        public_key: The site's keys/site.pub.
        name: The site's name.

    Raises:
        typer.Exit: With code 1 when the key cannot be registered.
    """
    try:
        node = register_site(Coordinator(directory.resolve()), public_key, name)
    except CoordinatorError as exc:
        _fail(exc)
    console.print(f"[green]registered[/] {escape(name)} as node {node}")


@coordinator_app.command("unregister")
def unregister(directory: CoordDir, name: Annotated[str, typer.Option(help="the site's name")]) -> None:
    """Remove a site's key: it can no longer connect.\f

    Args:
        directory: The coordinator's directory.
        name: The site's name.

    Raises:
        typer.Exit: With code 1 when the site cannot be removed (e.g. it is not registered).
    """
    try:
        unregister_site(Coordinator(directory.resolve()), name)
    except CoordinatorError as exc:
        _fail(exc)
    console.print(escape(f"unregistered {name}"))


@coordinator_app.command("sites")
def sites(directory: CoordDir) -> None:
    """Every node the SuperLink has registered and whether it is online; nodes pmfl did not enrol (registered
    directly through the Control API on this host) are flagged.\f

    Args:
        directory: The coordinator's directory.

    Raises:
        typer.Exit: With code 1 when the SuperLink's registry cannot be read.
    """
    try:
        rows = site_status(Coordinator(directory.resolve()))
    except CoordinatorError as exc:
        _fail(exc)
    table = Table("site", "node", "status", "enrolled by pmfl")
    for row in rows:
        site = row["site"] or f"({row['name'] or 'no name'})"
        enrolled = "yes" if row["enrolled"] else f"[bold red]{escape(row['flag'])}[/]"
        table.add_row(escape(str(site)), str(row["node_id"]), escape(str(row["status"])), enrolled)
    console.print(table)
    _warn_not_enrolled(rows)


def _warn_not_enrolled(rows: list[dict[str, Any]]) -> None:
    strangers = [r for r in rows if not r["enrolled"]]
    if strangers:
        nodes = ", ".join(str(r["node_id"]) for r in strangers)
        console.print(
            f"[bold red]{len(strangers)} node(s) not enrolled by pmfl[/] ({nodes}): they receive every study "
            "like a site. Remove them with `flwr supernode unregister NODE_ID` if nobody here should "
            "have registered them, and check who can run processes on this host."
        )


def _show_round(entry: dict[str, Any]) -> None:
    acc = entry.get("mean_site_accuracy")
    parts = [f"round {entry['round']:>3}", f"trained: {', '.join(entry['trained']) or '-'}"]
    if acc is not None:
        parts.append(f"model r{entry['round']}: mean site acc {acc:.3f}")
    console.print(escape("  ".join(parts)))
    for site, reason in entry.get("declined", {}).items():
        console.print(f"  [yellow]{escape(site)} declined:[/] {escape(reason)}", soft_wrap=True)
    for text in entry.get("failures", []):
        console.print(f"  [red]failure:[/] {escape(text)}", soft_wrap=True)


@coordinator_app.command("run")
def run(
    directory: CoordDir,
    study: Annotated[Path, typer.Option(help="study TOML (its [[sites]], if any, are not used)")],
    out: Annotated[Path, typer.Option(help="run directory")],
    app_dir: Annotated[Path, typer.Option("--app", help="source of the study app sent to the sites")] = Path(
        "."
    ),
    expected_sites: Annotated[
        int | None, typer.Option(help="sites to wait for before round 1 [default: those online now]")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
    round_timeout: Annotated[float | None, typer.Option(
        help="seconds to wait for a round's replies [default: 3600]")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue the run in --out after the coordinator crashed: its last checkpoint, "
        "the same roster, every site's ledger completed from the site's own")] = False,
) -> None:
    """Submit a study to the SuperLink, follow it to the end, and collect its run directory.\f

    Args:
        directory: The coordinator's directory.
        study: The study TOML (its [[sites]], if any, are not used).
        out: The run directory.
        app_dir: The source of the study app sent to the sites.
        expected_sites: Sites to wait for before round 1; None for those online now.
        timeout: Seconds after which to give up; None to wait for the end.
        round_timeout: Seconds to wait for a round's replies; None for the default.
        resume: Continue the run in `out` after the coordinator crashed.

    Raises:
        typer.Exit: With code 1 when the run cannot be submitted, followed or collected.
        SystemExit: With code 1 when the run did not complete.
    """
    coord = Coordinator(directory.resolve())
    try:
        rows = site_status(coord)
        _warn_not_enrolled(rows)
        online = [s["site"] for s in rows if s["status"] == "online" and s["enrolled"] and s["site"]]
        expected = len(online) if expected_sites is None else expected_sites
        run_id = submit(coord, study, out, app_dir, expected, resume=resume, round_timeout=round_timeout)
        _say(f"run {run_id} submitted; waiting for {expected} sites (online: {', '.join(online)})")
        info = follow(coord, run_id, out, on_round=_show_round, timeout=timeout)
        deployment = collect(coord, run_id, out, info)
    except CoordinatorError as exc:
        _fail(exc)
    status = deployment["status"]
    colour = "green" if status == "finished:completed" else "red"
    fab = escape(str(deployment["fab_hash"]))
    console.print(f"[{colour}]{escape(f'run {run_id}: {status}')}[/]; app {fab}")
    if deployment["dropped_out"]:
        console.print(f"[yellow]dropped out:[/] {escape(', '.join(deployment['dropped_out']))}")
    refused = sorted({f["site"] or "?" for f in deployment["failures"] if "refuse" in f["reason"]})
    if refused:
        console.print(f"[yellow]refused the study or app:[/] {escape(', '.join(refused))}")
    _say(f"results: {out}/ (metrics.json, model.pt, privacy/, deployment.json, serverapp.log)")
    if status != "finished:completed":
        sys.exit(1)
