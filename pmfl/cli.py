"""`pmfl`: the command line for researchers, hospitals, coordinators and privacy officers."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.cli import site_app
from server.cli import coordinator_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="pmfl: federated learning for precision medicine with honest per-site DP.",
)
console = Console()
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(site_app, name="site")


@app.callback()
def _root() -> None:
    """Simulate studies, run hospital sites and the coordinator, audit privacy ledgers."""


def _fmt(value: float | None, digits: int = 3) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _progress_printer(num_rounds: int):  # type: ignore[no-untyped-def]
    from server.recorder import RoundProgress

    def show(progress: RoundProgress) -> None:
        parts = [
            f"[bold]round {progress.round:>3}/{num_rounds}[/]",
            f"trained {len(progress.trained)}",
            f"model r{progress.round - 1}: mean site acc {_fmt(progress.mean_site_accuracy)}",
            f"pooled {_fmt(progress.pooled_accuracy)}",
            f"max ε {_fmt(progress.max_epsilon, 2)}",
        ]
        for site, reason in progress.declined.items():
            parts.append(f"[yellow]{site} declined[/]")
            console.log(f"[yellow]{site} declined round {progress.round}: {reason}")
        for site, reason in progress.rejected.items():
            console.log(f"[red]{site}'s update rejected in round {progress.round}: {reason}")
        if progress.failed:
            parts.append(f"[red]{progress.failed} failed[/]")
        console.print("  ".join(parts))

    return show


def _print_results(out: Path, metrics: dict[str, Any]) -> None:
    summary = json.loads((out / "privacy" / "summary.json").read_text())
    final = metrics["rounds"][-1]
    table = Table(title=f"{metrics['study']}: final model (round {final['round']})")
    balanced = any("balanced_accuracy" in m for m in final["sites"].values())  # imaging studies
    for column in ("site", "test acc", *(["bal. acc"] if balanced else []), "AUC", "n", "ε (cumulative)",
                   "budget", "δ", "status"):
        table.add_column(column)
    for site, info in summary["sites"].items():
        m = final["sites"].get(site, {})
        eps = "none (no DP)" if not info["dp"] else _fmt(info["epsilon"], 3)
        table.add_row(
            site,
            _fmt(m.get("accuracy")),
            *([_fmt(m.get("balanced_accuracy"))] if balanced else []),
            _fmt(m.get("auc")),
            str(int(m["n"])) if m else "-",
            eps,
            _fmt(info.get("epsilon_budget"), 2),
            f"{info['delta']:g}",
            info["status"],
        )
    console.print(table)
    console.print(
        f"mean site accuracy (FLamby metric) {_fmt(final['mean_site_accuracy'])}, "
        f"pooled test accuracy {_fmt(final['pooled_accuracy'])}"
    )
    if not summary["dp"]:
        console.print(
            "[bold red]NO PRIVACY GUARANTEE: this study ran without differential privacy (--no-dp)."
        )
    console.print(f"results: {out}/ (metrics.json, model.pt, config.toml, privacy/)")


@app.command()
def simulate(
    scenario: Annotated[
        str | None, typer.Argument(help="built-in scenario, e.g. heart-disease")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="study TOML over your own data")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="run directory")] = Path("runs/latest"),
    rounds: Annotated[int | None, typer.Option(help="number of rounds")] = None,
    epsilon: Annotated[float | None, typer.Option(help="every site's epsilon budget")] = None,
    delta: Annotated[float | None, typer.Option(help="every site's delta")] = None,
    strategy: Annotated[
        str | None, typer.Option(help="fedavg, fedprox, fedadam, fedyogi, ...")
    ] = None,
    model: Annotated[str | None, typer.Option(help="logreg or mlp")] = None,
    seed: Annotated[int | None, typer.Option(help="study seed (initial model)")] = None,
    no_dp: Annotated[
        bool, typer.Option("--no-dp", help="train WITHOUT differential privacy")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier run in --out")] = False,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's logs")] = False,
    resume: Annotated[
        bool, typer.Option(help="continue an unfinished run in --out from its last checkpoint")
    ] = False,
    empirical_audit: Annotated[bool, typer.Option(
        "--empirical-audit", help="one-run privacy audit: canaries at one site (an MLP run), plus a "
        "no-DP positive control in OUT/empirical-control; see privacy/empirical_audit.json")] = False,
    canaries: Annotated[int, typer.Option(help="canaries for --empirical-audit")] = 200,
    secure_aggregation: Annotated[bool, typer.Option(
        "--secure-aggregation", help="SecAgg+: the coordinator learns only the sum of the updates")] = False,
) -> None:
    """Simulate a federated study locally: one simulated hospital per site, real Flower apps."""
    from pm_common.config import StudyConfigError, load_study, with_overrides
    from pm_common.imaging import ImageDataError
    from pm_common.tabular import DataValidationError
    from simulations.runner import SimulationError
    from simulations.runner import simulate as run
    from simulations.scenarios import SYNTHETIC, scenario_study

    if (scenario is None) == (config is None):
        raise typer.BadParameter(
            "give a built-in scenario (e.g. heart-disease) or --config STUDY.toml"
        )
    try:
        study = load_study(config) if config else scenario_study(str(scenario), out)
        study = with_overrides(
            study,
            rounds=rounds,
            epsilon=epsilon,
            delta=delta,
            strategy=strategy,
            model=model,
            seed=seed,
            dp=False if no_dp else None,
            secure_aggregation=True if secure_aggregation else None,
        )
        if empirical_audit and study.secure_aggregation.enabled:
            raise StudyConfigError(
                "--empirical-audit needs the audited site's individual updates, which secure "
                "aggregation hides: run the audit without it"
            )
    except (StudyConfigError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    if scenario in SYNTHETIC:
        console.print(f"[bold yellow]SYNTHETIC DATA: the {scenario} images are generated "
                      f"({out}/synthetic-data), not from patients; results say nothing about real disease.")
    if no_dp:
        console.print(
            "[bold red]--no-dp: sites train WITHOUT differential privacy. "
            "Nothing in this run carries a privacy guarantee."
        )
    console.print(
        f"[bold]{study.name}[/]: {len(study.sites)} sites, {study.rounds} rounds, "
        f"{study.strategy.name}, {study.model.name}, "
        + ("" if no_dp else f"Opacus grad_sample_mode {study.training.grad_sample_mode}, ")
        + (
            "no DP"
            if no_dp
            else f"DP-SGD per site (default ε={study.privacy.epsilon:g}, δ={study.privacy.delta:g})"
        )
        + (", secure aggregation" if study.secure_aggregation.enabled else "")
    )
    if empirical_audit:
        from simulations import empirical_audit as ea

        try:
            audit_data = ea.simulate_with_empirical_audit(
                study, out, canaries=canaries, overwrite=overwrite, verbose=verbose,
                progress=_progress_printer(study.rounds), on_run=lambda r: console.print(f"[bold]{r} run")
            )
        except (DataValidationError, SimulationError, ea.EmpiricalAuditError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from exc
        _print_results(out.resolve(), json.loads((out / "metrics.json").read_text()))
        for line in ea.summary_lines(audit_data):
            console.print(line)
        return
    try:
        metrics = run(
            study,
            out,
            progress=_progress_printer(study.rounds),
            overwrite=overwrite,
            verbose=verbose,
            resume=resume,
        )
    except (DataValidationError, ImageDataError, SimulationError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    _print_results(out.resolve(), metrics)


@app.command()
def audit(
    path: Annotated[Path, typer.Argument(help="a run directory (or a hospital's site directory)")],
    roster: Annotated[str | None, typer.Option(
        "--roster", help="the run's roster digest as you got it out of band (e.g. from a hospital's "
        "`pmfl site status`): the run must be that roster's")] = None,
    site: Annotated[list[Path] | None, typer.Option(
        "--site", help="a hospital's own site directory to cross-check the run with (repeat)")] = None,
) -> None:
    """Verify every ledger's signatures and hash chain against the run's roster, recompute each
    site's epsilon independently (Google's dp-accounting, RDP and PLD) and check it against the
    site's budget.

    Writes audit/audit.json and audit/report.html. Exit 0: verified and compliant; 1: a violation;
    2: something could not be verified. The verdict says what the records were verified against.
    """
    from pm_common.audit import NOTE
    from pm_common.audit_run import run_audit

    result = run_audit(path, roster_digest=roster, site_dirs=tuple(site or ()))
    colour = {0: "green", 1: "red"}.get(result.exit_code, "yellow")
    console.print(f"[bold {colour}]{escape(result.verdict)}")
    for finding in result.findings:
        if finding.severity != NOTE:
            console.print(f"  [{finding.severity}] {escape(finding.message)}")
    table = Table(title="Per-site privacy (cumulative over all rounds)")
    for column in ("site", "reported ε", "recomputed ε (RDP)", "tight ε (PLD)", "budget", "δ", "verdict"):
        table.add_column(column)
    for s in result.sites:
        delta = "-" if s.delta is None else f"{s.delta:g}"
        table.add_row(escape(s.site), _fmt(s.reported_epsilon), _fmt(s.rdp_epsilon), _fmt(s.pld_epsilon),
                      _fmt(s.epsilon_budget, 2), delta, s.verdict)
    if result.sites:
        console.print(table)
    if result.roster_digest:
        console.print(f"run {result.run}, roster digest {result.roster_digest}")
    console.print(f"report: {path / 'audit' / 'report.html'}  json: {path / 'audit' / 'audit.json'}")
    raise typer.Exit(result.exit_code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
