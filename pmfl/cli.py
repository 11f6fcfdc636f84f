"""`pmfl`: the command line for researchers, hospitals, coordinators and privacy officers."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import contextlib
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.deploy.cli import site_app
from pm_common.redaction import internal_error_line, is_safe_error
from server.deploy.cli import coordinator_app

DEBUG_ENV = "PMFL_DEBUG"  # "1": an unexpected error shows its traceback (which may show data values)
BAD_INPUT = 2  # exit code of a refused study file, data file or option

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="pmfl: federated learning for precision medicine with honest per-site DP.",
    rich_markup_mode="markdown",  # help texts are Markdown: [privacy] and [[sites]] print as written
    pretty_exceptions_show_locals=False,  # a traceback's local variables can hold patient rows
)
console = Console()
err_console = Console(stderr=True)
contract_app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown",
                           help="Draft a study's data contract from the sites' export files.")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(site_app, name="site")
app.add_typer(contract_app, name="contract")


def _refuse_study(exc: ValueError) -> NoReturn:
    """A study, its data or a scenario name refused before anything starts: one line per problem,
    exit 2, never a traceback.

    Args:
        exc: the refusal (a study's InputError, the sites' SiteDataError, or an unknown scenario).

    Raises:
        typer.Exit: always, with BAD_INPUT.
    """
    from pm_common.study.schema import InputError
    from simulations.preflight import SiteDataError

    if isinstance(exc, InputError):
        _errors(exc.problems if exc.source is None else [f"{exc.source}: {p}" for p in exc.problems])
    elif isinstance(exc, SiteDataError):
        _errors(exc.problems)
    else:
        _errors(str(exc).splitlines())
    raise typer.Exit(BAD_INPUT) from exc


@contextlib.contextmanager
def _run_refusals() -> Iterator[None]:
    """A simulated run's failures as one line each: refused input (a site's data, the study) exits 2,
    a run that did not finish exits 1; never a traceback.

    Raises:
        typer.Exit: with BAD_INPUT or 1.
    """
    from pm_common.data.imaging import ImageDataError
    from pm_common.data.tabular import DataValidationError
    from pm_common.study.config import StudyConfigError
    from simulations.preflight import SiteDataError
    from simulations.runner import SimulationError

    try:
        yield
    except (SiteDataError, DataValidationError, ImageDataError, StudyConfigError) as exc:
        _errors(str(exc).splitlines())
        raise typer.Exit(BAD_INPUT) from exc
    except SimulationError as exc:
        _errors(str(exc).splitlines())
        raise typer.Exit(1) from exc


def _errors(lines: Iterable[str]) -> None:
    """Print one refusal per line on stderr, literally (no markup) and never wrapped."""
    for line in lines:
        err_console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)


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
            *([f"model r{progress.round - 1}: mean site acc {_fmt(progress.mean_site_accuracy)}",
               f"pooled {_fmt(progress.pooled_accuracy)}"] if progress.metric == "accuracy" else
              [f"model r{progress.round - 1}: mean site {progress.metric} {_fmt(progress.mean_site)}",
               f"weighted by test rows {_fmt(progress.weighted_site_mean)}"]),
            f"max ε {_fmt(progress.max_epsilon, 2)}",
        ]
        for site, reason in progress.declined.items():
            parts.append(f"[yellow]{escape(site)} declined[/]")
            console.log(f"[yellow]{escape(site)} declined round {progress.round}: {escape(reason)}")
        for site, reason in progress.rejected.items():
            console.log(f"[red]{escape(site)}'s update rejected in round {progress.round}: {escape(reason)}")
        if progress.failed:
            parts.append(f"[red]{progress.failed} failed[/]")
        console.print("  ".join(parts))

    return show


METRIC_COLUMNS = {"accuracy": "test acc", "balanced_accuracy": "bal. acc", "auc": "AUC",
                  "macro_f1": "macro F1", "mae": "MAE", "rmse": "RMSE", "r2": "R²", "c_index": "C-index",
                  "integrated_brier": "IBS"}
"""How the final table heads each task metric (metrics.json's names)."""


def _print_results(out: Path, metrics: dict[str, Any]) -> None:
    summary = json.loads((out / "privacy" / "summary.json").read_text())
    final = metrics["rounds"][-1]
    table = Table(title=escape(f"{metrics['study']}: final model (round {final['round']})"))
    balanced = any("balanced_accuracy" in m for m in final["sites"].values())  # imaging studies
    shown = metrics.get("metrics_shown") or ["accuracy", *(["balanced_accuracy"] if balanced else []), "auc"]
    for column in ("site", *(METRIC_COLUMNS.get(name, name) for name in shown), "n", "ε (cumulative)",
                   "budget", "δ", "status"):
        table.add_column(column)
    for site, info in summary["sites"].items():
        m = final["sites"].get(site, {})
        eps = "none (no DP)" if not info["dp"] else _fmt(info["epsilon"], 3)
        table.add_row(
            escape(site),
            *(_fmt(m.get(name)) for name in shown),
            str(int(m["n"])) if m else "-",
            eps,
            _fmt(info.get("epsilon_budget"), 2),
            f"{info['delta']:g}",
            escape(info["status"]),
        )
    console.print(table)
    if final.get("mean_site_accuracy") is not None or final.get("metric", "accuracy") == "accuracy":
        console.print(
            f"mean site accuracy (FLamby metric) {_fmt(final['mean_site_accuracy'])}, "
            f"pooled test accuracy {_fmt(final['pooled_accuracy'])}"
        )
    if final.get("metric", "accuracy") != "accuracy":
        console.print(escape(f"{final['metric']}: mean over sites {_fmt(final.get('mean_site'))}, "
                             f"weighted by test rows {_fmt(final.get('weighted_site_mean'))}"))
    for site, m in final["sites"].items():
        if m.get("no_better_than_baseline"):
            console.print(escape(
                f"{site}: no better than the trivial baseline on its test rows "
                f"({final.get('metric', 'accuracy')} {_fmt(m.get(final.get('metric', 'accuracy')))} vs "
                f"baseline {_fmt(m.get('baseline'))})"), style="yellow")
    personal = metrics.get("personalization")
    if personal:
        metric = final.get("metric", "accuracy")
        table = Table(title=escape(f"personal models ({personal['method']}): kept at each site, never sent"))
        for column in ("site", f"global {metric}", f"personal {metric}", "note"):
            table.add_column(escape(column))
        for site, report in personal["sites"].items():
            g, mine = report.get("global") or {}, report.get("personal") or {}
            table.add_row(escape(site), _fmt(g.get(metric)), _fmt(mine.get(metric)),
                          escape(report.get("reason", "")))
        console.print(table)
    if not summary["dp"]:
        console.print(
            "[bold red]NO PRIVACY GUARANTEE: this study ran without differential privacy (--no-dp)."
        )
    console.print(escape(f"results: {out}/ (metrics.json, model.pt, model_card.md, config.toml, privacy/)"))


@app.command()
def simulate(
    scenario: Annotated[
        str | None, typer.Argument(help="built-in scenario, e.g. heart-disease")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="study TOML over your own data")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="run directory")] = Path("runs/latest"),
    rounds: Annotated[int | None, typer.Option(help="number of rounds (replaces [study] rounds)")] = None,
    epsilon: Annotated[float | None, typer.Option(
        help="every site's epsilon budget (replaces [privacy] epsilon and each [[sites]] entry's own)"
    )] = None,
    delta: Annotated[float | None, typer.Option(
        help="every site's delta (replaces [privacy] delta and each [[sites]] entry's own)")] = None,
    strategy: Annotated[
        str | None, typer.Option(help="fedavg, fedprox, fedadam, fedyogi, ... (replaces [strategy] name)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="logreg, mlp or discrete-cox (replaces [model] name)")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="study seed: the initial model (replaces [study] seed)")
    ] = None,
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
    personalization: Annotated[str | None, typer.Option(
        "--personalization", help="none, finetune, fedper or ditto: a personal model per site, under "
        "its one budget (replaces [personalization] method)")] = None,
    training_plan: Annotated[str | None, typer.Option(
        "--training-plan", help="fixed (the study's batch) or auto (each site picks its expected batch "
        "within its budget; replaces [training] plan)")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="check the study, every site's data and each site's DP plan, print the plans, "
        "and start nothing (exit 0: it would run; 2: refused, one line per problem)")] = False,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", help="run once per seed (e.g. 0-9 or 1,4,7) in one engine start: OUT/seed-<s>/ per "
        "seed and OUT/sweep.json with medians and ranges")] = None,
) -> None:
    """Simulate a federated study locally: one simulated hospital per site, real Flower apps."""
    from pm_common.data.imaging import ImageDataError
    from pm_common.data.tabular import DataValidationError
    from pm_common.study.config import StudyConfigError, load_study, with_overrides
    from simulations.preflight import SiteDataError, preflight
    from simulations.scenarios import SYNTHETIC, scenario_study
    from simulations.sweep import parse_seeds

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
            personalization=personalization,
            training_plan=training_plan,
        )
        seed_list = parse_seeds(seeds) if seeds is not None else ()
        if seeds is not None and (resume or empirical_audit or seed is not None):
            raise StudyConfigError("--seeds runs fresh runs, one per seed: not with --resume, "
                                   "--empirical-audit or --seed")
        if empirical_audit and study.secure_aggregation.enabled:
            raise StudyConfigError(
                "--empirical-audit needs the audited site's individual updates, which secure "
                "aggregation hides: run the audit without it"
            )
        if dry_run:
            sites = preflight(study)
    except ValueError as exc:  # InputError, SiteDataError, an unknown scenario name
        _refuse_study(exc)
    if dry_run:
        console.print(escape(f"{study.name}: the study and every site's data check out; {len(study.sites)} "
                             f"sites, {study.rounds} rounds, {study.strategy.name}, {study.model.name} "
                             "(dry run: nothing was started)"), soft_wrap=True, highlight=False)
        for site in sites:
            console.print(escape(f"  {site.describe()}"), soft_wrap=True, highlight=False)
        return
    from simulations.runner import SimulationError
    from simulations.runner import simulate as run

    if scenario in SYNTHETIC:
        console.print(f"[bold yellow]SYNTHETIC DATA: the {escape(str(scenario))} images are generated "
                      f"({escape(str(out))}/synthetic-data), not from patients; results say nothing about "
                      "real disease.")
    if no_dp:
        console.print(
            "[bold red]--no-dp: sites train WITHOUT differential privacy. "
            "Nothing in this run carries a privacy guarantee."
        )
    console.print(
        f"[bold]{escape(study.name)}[/]: {len(study.sites)} sites, {study.rounds} rounds, "
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
                progress=_progress_printer(study.rounds),
                on_run=lambda r: console.print(f"[bold]{escape(str(r))} run"),
            )
        except (SiteDataError, DataValidationError, ImageDataError) as exc:
            _errors(str(exc).splitlines())
            raise typer.Exit(BAD_INPUT) from exc
        except (SimulationError, ea.EmpiricalAuditError) as exc:
            _errors(str(exc).splitlines())
            raise typer.Exit(1) from exc
        _print_results(out.resolve(), json.loads((out / "metrics.json").read_text()))
        for line in ea.summary_lines(audit_data):
            console.print(escape(line))
        return
    if seed_list:
        _sweep(study, out, seed_list, overwrite=overwrite, verbose=verbose)
        return
    with _run_refusals():
        metrics = run(
            study,
            out,
            progress=_progress_printer(study.rounds),
            overwrite=overwrite,
            verbose=verbose,
            resume=resume,
            on_warning=lambda text: console.print(f"[yellow]{escape(text)}[/]", soft_wrap=True),
        )
    _print_results(out.resolve(), metrics)


def _sweep(study: Any, out: Path, seeds: Sequence[int], *, overwrite: bool, verbose: bool) -> None:
    """`pmfl simulate --seeds`: every seed's run, then the medians and ranges over seeds."""
    from simulations.sweep import SUMMARY, seed_dir, simulate_seeds

    def finished(seed: int, metrics: dict[str, Any]) -> None:
        last = metrics["rounds"][-1]
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in last.items() if isinstance(v, float))
        console.print(escape(f"seed {seed}: {figures} ({seed_dir(out, seed)})"), soft_wrap=True,
                      highlight=False)

    with _run_refusals():
        summary = simulate_seeds(
            study, out, seeds, overwrite=overwrite, verbose=verbose, on_run=finished,
            on_warning=lambda text: console.print(f"[yellow]{escape(text)}[/]", soft_wrap=True),
        )
    table = Table(title=f"{study.name}: {len(seeds)} seeds, final model")
    for column in ("metric", "median", "min", "max"):
        table.add_column(column)
    for key, stats in summary["final"].items():
        table.add_row(escape(key), _fmt(stats["median"]), _fmt(stats["min"]), _fmt(stats["max"]))
    console.print(table)
    console.print(escape(f"runs: {out}/seed-<s>/ (each audited like any run); summary: {out}/{SUMMARY}"))


@app.command()
def plan(
    study_file: Annotated[str, typer.Argument(
        help="a study TOML, or a built-in scenario (e.g. heart-disease)", metavar="STUDY")],
    rows: Annotated[int | None, typer.Option(
        help="plan one site with this many training rows and the study's [privacy] budget (a hospital "
        "planning on its own count, without the study's [[sites]] files)")] = None,
    epsilon: Annotated[float | None, typer.Option(help="every site's epsilon budget")] = None,
    rounds: Annotated[int | None, typer.Option(help="number of rounds (replaces [study] rounds)")] = None,
    personalization: Annotated[str | None, typer.Option(
        "--personalization", help="none, finetune, fedper or ditto (replaces [personalization] method)"
    )] = None,
    training_plan: Annotated[str | None, typer.Option(
        "--training-plan", help="fixed (the study's batch) or auto (each site picks its expected batch "
        "within its budget; replaces [training] plan)")] = None,
) -> None:
    """Privacy-utility planner: per site, the DP-SGD plan its ClientApp will fix and whether noise will
    drown the signal, with the change that helps most. Starts nothing, sends nothing."""
    from pm_common.privacy.planner import drowning_threshold, model_parameters, site_report
    from pm_common.study.config import SiteSpec, load_study, with_overrides
    from simulations.preflight import preflight
    from simulations.scenarios import scenario_study

    try:
        path = Path(study_file)
        study = load_study(path) if path.suffix == ".toml" or path.exists() else scenario_study(
            study_file, Path("runs/plan"))
        study = with_overrides(study, epsilon=epsilon, rounds=rounds, personalization=personalization,
                               training_plan=training_plan)
        if rows is not None:
            if rows < 1:
                raise typer.BadParameter("--rows must be at least 1")
            counted = [(SiteSpec("this-site", Path("."), study.privacy), rows)]
        else:
            counted = [(s.site, s.train_rows) for s in preflight(study, plans=False)]
    except ValueError as exc:  # InputError, SiteDataError, an unknown scenario name
        _refuse_study(exc)
    parameters = model_parameters(study)
    reports = [site_report(study, site, n, parameters) for site, n in counted]
    batch = "auto" if study.training.plan == "auto" else study.training.batch_size
    table = Table(title=f"{study.name}: {study.rounds} rounds, batch {batch}, "
                  f"{study.training.local_epochs} local epoch(s), personalisation "
                  f"{study.personalization.method}")
    for column in ("site", "rows", "ε", "σ", "q", "E[batch]", "steps", "σ/E[batch]"):
        table.add_column(escape(column), justify="left" if column == "site" else "right", no_wrap=True)
    for r in reports:
        u = r.utility
        figures = ("-",) * 5 if u is None else (
            f"{u.noise_multiplier:.3g}", f"{u.sample_rate:.3g}", f"{u.expected_batch:.1f}", str(u.steps),
            f"[red]{u.noise_to_signal:.3g}[/]" if u.drowned else f"{u.noise_to_signal:.3g}")
        budget = "no DP" if r.epsilon_budget is None else f"{r.epsilon_budget:g}"
        table.add_row(escape(r.site), str(r.train_rows), budget, *figures)
    console.print(table)
    console.print(escape(
        f"σ/E[batch]: noise per coordinate relative to the largest averaged clipped gradient a step carries. "
        f"Flagged at ≥ {drowning_threshold(parameters):.3g} = 1/√{parameters} (the model's parameters): "
        "there the noise vector is as long as the largest possible signal (Ponomareva et al. 2023, "
        "\"How to DP-fy ML\"; De et al. 2022)."), soft_wrap=True, highlight=False)
    for r in reports:
        if r.declines:
            console.print(escape(f"{r.site}: DECLINES: {r.declines}"), soft_wrap=True, highlight=False)
        elif r.utility is not None and r.utility.drowned:
            console.print(escape(f"{r.site}: noise will drown the signal; what would help most:"),
                          soft_wrap=True, highlight=False)
        for line in r.advice:
            console.print(escape(f"  - {line}"), soft_wrap=True, highlight=False)


@app.command("predict")
def predict_command(
    model: Annotated[Path, typer.Argument(
        help="a run's model.pt, or a site's personal model", metavar="MODEL")],
    data: Annotated[Path, typer.Option(
        "--data", help="new patients' rows (CSV or Parquet); outcome optional")],
    out: Annotated[Path, typer.Option(
        "--out", help="where to write the predictions")] = Path("predictions.csv"),
    study_file: Annotated[Path | None, typer.Option(
        "--study", help="the study file (default: config.toml beside MODEL, as in a run directory)")] = None,
    delimiter: Annotated[str, typer.Option(help="the data file's delimiter")] = ",",
    encoding: Annotated[str, typer.Option(help="the data file's text encoding")] = "utf-8",
    thousands: Annotated[str, typer.Option(help="the data file's thousands separator, as the site's")] = "",
    decimal: Annotated[str, typer.Option(help="the data file's decimal mark, as the site's")] = ".",
) -> None:
    """Apply a model to new rows at this site, by the study's contract; nothing is sent anywhere.
    One line per row: the task's prediction (probability and class, each class's probability, the
    value in the target's unit, or survival at the study's horizons and the risk the C-index ranks).
    Rows that fail the contract are listed by data row and column with what is allowed (never their
    values). Tabular studies only."""
    from client.predict import load_model, predict_file, write_predictions
    from pm_common.data.tabular import DataValidationError, NumberFormat
    from pm_common.study.config import load_study
    from pm_common.study.schema import InputError

    try:
        study = load_study(study_file or model.parent / "config.toml")
        predictions = predict_file(load_model(model, study), study, data, delimiter=delimiter,
                                   encoding=encoding, number_format=NumberFormat(thousands, decimal))
    except InputError as exc:
        _errors(exc.problems if exc.source is None else [f"{exc.source}: {p}" for p in exc.problems])
        raise typer.Exit(BAD_INPUT) from exc
    except DataValidationError as exc:
        _errors(p.describe(exc.path) for p in exc.problems)
        raise typer.Exit(BAD_INPUT) from exc
    write_predictions(predictions, out)
    _errors(predictions.refused)
    console.print(escape(f"{len(predictions.rows)} row(s) predicted into {out}; {predictions.refused_rows} "
                         "row(s) refused by the contract (no prediction)"), soft_wrap=True, highlight=False)


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
    from pm_common.audit.directories import run_audit
    from pm_common.audit.rules import NOTE

    result = run_audit(path, roster_digest=roster, site_dirs=tuple(site or ()))
    colour = {0: "green", 1: "red"}.get(result.exit_code, "yellow")
    console.print(f"[bold {colour}]{escape(result.verdict)}")
    for finding in result.findings:
        if finding.severity != NOTE:
            console.print(escape(f"  [{finding.severity}] {finding.message}"))
    table = Table(title="Per-site privacy (cumulative over all rounds)")
    for column in ("site", "reported ε", "recomputed ε (RDP)", "tight ε (PLD)", "budget", "δ", "verdict"):
        table.add_column(column)
    for s in result.sites:
        delta = "-" if s.delta is None else f"{s.delta:g}"
        table.add_row(escape(s.site), _fmt(s.reported_epsilon), _fmt(s.rdp_epsilon), _fmt(s.pld_epsilon),
                      _fmt(s.epsilon_budget, 2), delta, escape(s.verdict))
    if result.sites:
        console.print(table)
    if result.roster_digest:
        console.print(escape(f"run {result.run}, roster digest {result.roster_digest}"))
    console.print(escape(f"report: {path / 'audit' / 'report.html'}  json: {path / 'audit' / 'audit.json'}"))
    raise typer.Exit(result.exit_code)


@contract_app.command("draft")
def contract_draft(
    files: Annotated[list[Path], typer.Argument(help="one export file per site (CSV or Parquet)")],
    target: Annotated[str | None, typer.Option(
        help="the outcome column (binary, multiclass, regression)")] = None,
    time: Annotated[str | None, typer.Option(help="survival: the follow-up time column")] = None,
    event: Annotated[str | None, typer.Option(help="survival: the event column")] = None,
    task: Annotated[str | None, typer.Option(help="override the task inferred from the target")] = None,
    ignore: Annotated[list[str] | None, typer.Option(help="a column to leave out (repeat)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the study here (default: print it)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing --out file")] = False,
) -> None:
    """Write a complete, runnable study from the sites' files: one [[sites]] per file, a typed
    contract, and comments on every line read from the data (review them before sharing the study)."""
    from pm_common.data.draft import draft_study
    from pm_common.study.schema import InputError

    if out is not None and out.exists() and not overwrite:
        _errors([f"{out}: exists; pass --overwrite to replace it"])
        raise typer.Exit(BAD_INPUT)
    try:
        text = draft_study(files, target=target, time=time, event=event, task=task,
                           ignore=tuple(ignore or ()), out=out)
    except InputError as exc:
        _errors(exc.problems)
        raise typer.Exit(BAD_INPUT) from exc
    if out is None:
        print(text, end="")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    console.print(escape(f"wrote {out}: review the lines marked \"read from this site's data\" before "
                         "sharing it; then `pmfl simulate --config` runs it"),
                  soft_wrap=True, highlight=False)


def main() -> None:
    """The `pmfl` entry point: any exception a command did not expect becomes one line on stderr
    and exit code 1. Its message is shown only for pmfl's own error types, whose messages never
    quote data; otherwise its type and place (PMFL_DEBUG=1 shows the traceback, without locals)."""
    try:
        app()
    except Exception as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if is_safe_error(exc):
            for line in str(exc).splitlines() or [type(exc).__name__]:
                print(f"pmfl: error: {line}", file=sys.stderr)
        else:
            print(internal_error_line(exc), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
