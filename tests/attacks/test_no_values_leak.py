"""Errors never carry patient values away from where they happened (issue #14, item 13).

A marker value (chol = 4242.4242, outside the contract's 80-700 mg/dl) is planted in one hospital's
rows, or in a handler's message and local variables; it may appear in the site's own log and
nowhere else: not in the site's error reply, not in the coordinator's metrics.json, not on the
command line. Tracebacks stay where they happened too.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import tomli_w
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from pm_common.study.config import StudyConfigError, load_study
from tests.conftest import HEART, heart_study, site_context, train_message

REPO = Path(__file__).resolve().parents[2]
MARKER = "4242.4242"


def _with_marker(source: Path, dest: Path, row: int = 4) -> Path:
    """A copy of a hospital's table whose row `row` has chol = 4242.4242 (an impossible value)."""
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    frame.loc[row, "chol"] = MARKER
    frame.to_csv(dest, index=False)
    return dest


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PMFL_DEBUG"}
    return {**env, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "COLUMNS": "120", **extra}


def test_a_sites_error_reply_names_the_problem_but_no_patient_value(
    tmp_path: Path, heart_sites: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Claim: when a hospital's data fails the contract inside a round, its error reply says what kind
    of problem in which of the contract's columns, and nothing of the rows; the full traceback with
    the cell values stays in the site's own log.
    Attack: a deployed site (site.toml) whose table holds chol = 4242.4242; the coordinator asks it to
    train. Flower's own reply would carry `str(exception)`, which quotes the cell."""
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 3})
    data = _with_marker(Path(heart_sites[1]["data"]), tmp_path / "hungary-export.csv")
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "site.toml").write_text(f'[site]\nname = "hungary"\ndata = "{data}"\n', encoding="utf-8")
    from client.app import app as client_app

    with caplog.at_level(logging.ERROR, logger="pmfl.client"):
        reply = client_app(train_message(study, 1), site_context(path, site_dir=site_dir))
    assert reply.has_error()
    reason = reply.error.reason
    assert reason == ("the site's data does not fit the study's contract: 1 problem(s) in columns ['chol'] "
                      "(details in the site's log)")
    assert MARKER not in reason and str(tmp_path) not in reason
    logged = "\n".join(caplog.text.splitlines())
    # the details (column, data row) stay at the site's log; no cell value is written even there
    assert "column 'chol': 1 row outside the plausible range" in logged and "Traceback" in logged
    assert MARKER not in logged


def test_any_handler_exception_becomes_a_reply_without_its_message(caplog: pytest.LogCaptureFixture) -> None:
    """Claim: whatever a ClientApp handler raises, the reply's reason carries no message text of an
    unknown exception (it can quote a local variable), no traceback and no path; pmfl's own refusals
    keep their message, paths removed.
    Attack: a handler raising KeyError with a patient row in its message and in a local variable; a
    study refusal naming the site's own file path."""
    from client.errors import error_reply_mod

    app = ClientApp(mods=[error_reply_mod])

    @app.train()
    def leaky(msg: Message, context: Context) -> Message:
        patient_row = {"age": 0.0975, "chol": float(MARKER)}
        raise KeyError(f"no column for {patient_row}")

    @app.evaluate()
    def refusing(msg: Message, context: Context) -> Message:
        raise StudyConfigError(f"site 'hungary' does not take part in study 'x' (see {REPO}/site.toml)")

    study = load_study(HEART)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with caplog.at_level(logging.ERROR, logger="pmfl.client"):
        reply = app(train_message(study, 1), context)
    assert reply.has_error() and reply.error.reason == "KeyError at the site (details in the site's log)"
    assert MARKER in caplog.text and "patient_row" in caplog.text  # the traceback, at the site only
    evaluate = Message(train_message(study, 1).content, dst_node_id=1, message_type=MessageType.EVALUATE)
    refused = app(evaluate, context)
    assert refused.error.reason == "site 'hungary' does not take part in study 'x' (see <path>)"


def test_the_coordinator_records_one_line_whatever_a_reply_says(tmp_path: Path) -> None:
    """Claim: metrics.json `failures` hold one short line per failure: never a traceback, a path or
    the message of an exception that escaped a site's ClientApp.
    Attack: error replies as a ClientApp without pmfl's mod (Flower's `<class 'T'>:<'message'>`
    wrapper of a DataValidationError), a site sending a raw traceback, and one naming its files."""
    from server.recorder import RunRecorder

    _, study = heart_study(tmp_path)
    recorder = RunRecorder(tmp_path / "run", study, {"model": "logreg"})
    wrapped = ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException "
               "occurred. Message: 1 problem(s) in /hospital/exports/cleveland.csv:\n  /hospital/exports/"
               f"cleveland.csv, row 5, column 'chol': {MARKER} is outside the plausible range [80, 700]'>")
    traceback = (f'Traceback (most recent call last):\n  File "/srv/site/app.py", line 9, in train\n    '
                 f"chol = {MARKER}\nValueError: could not use {MARKER}")
    for node, reason in ((7, wrapped), (8, traceback), (9, f"bad table /hospital/exports/{MARKER}.csv")):
        recorder.record_failure(1, f"node {node}: {reason}")
    metrics = recorder.write_metrics()
    failures = metrics["rounds"][1]["failures"]
    assert failures == [
        "node 7: ClientAppException at the site (message withheld: an exception escaped the ClientApp "
        "and may quote data; details in the site's log)",
        "node 8: ValueError (traceback withheld)",
        "node 9: bad table <path>",
    ]
    text = (tmp_path / "run" / "metrics.json").read_text()
    assert MARKER not in text and "/hospital" not in text and "Traceback" not in text


def test_a_site_failing_inside_a_simulated_round_leaks_nothing(tmp_path: Path) -> None:
    """Claim: a site whose data fails inside a round (as in a deployment, where nobody checks a
    hospital's data before the round) costs the study that site, and its cell values appear neither
    in metrics.json nor in `pmfl simulate`'s output, which shows no traceback.
    Attack: Cleveland's table holds chol = 4242.4242 and the up-front data check is skipped, so the
    value meets the real ClientApp in Flower's Simulation Engine (whose own error path logs the
    exception and its traceback, and puts its message in the reply)."""
    raw = dict(load_study(HEART).raw)
    raw["sites"] = [dict(s) for s in raw["sites"]]
    raw["sites"][0]["data"] = str(_with_marker(Path(raw["sites"][0]["data"]), tmp_path / "cleveland.csv"))
    raw["study"] = {**raw["study"], "rounds": 1}
    study_path = tmp_path / "study.toml"
    study_path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    out = tmp_path / "run"
    code = (
        "import sys\n"
        "import simulations.runner as runner\n"
        "runner.check_sites = runner.preflight = lambda study, **_: []  # no up-front check\n"
        "from pmfl.cli import main\n"
        f"sys.argv = ['pmfl', 'simulate', '--config', {str(study_path)!r}, '--out', {str(out)!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert MARKER not in output and "Traceback" not in output
    metrics_text = (out / "metrics.json").read_text()
    assert MARKER not in metrics_text
    failures = [f for r in json.loads(metrics_text)["rounds"] for f in r["failures"]]
    assert len(failures) == 2  # round 1's training and the final evaluation
    assert all("does not fit the study's contract: 1 problem(s) in columns ['chol']" in f for f in failures)


def _site_check_crash(tmp_path: Path, debug: bool) -> subprocess.CompletedProcess[str]:
    """`pmfl site check` whose check raises a KeyError holding a patient row, in its message and in a
    local variable."""
    code = (
        "import sys\n"
        "import client.deploy.site_dir\n"
        "def crash(site_dir, study_path):\n"
        f"    secret_row = [[0.0975, {MARKER}]]\n"
        "    raise KeyError(f'no column for {secret_row}')\n"
        "client.deploy.site_dir.check_site = crash\n"
        "from pmfl.cli import main\n"
        f"sys.argv = ['pmfl', 'site', 'check', {str(tmp_path)!r}, '--study', 'study.toml']\n"
        "main()\n"
    )
    env = _env(PMFL_DEBUG="1") if debug else _env()
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_unexpected_error_prints_one_line_without_values_or_locals(tmp_path: Path) -> None:
    """Claim: an exception no command expected prints one line on stderr (its type and where, never
    its message) and exits 1; PMFL_DEBUG=1 shows the traceback, still without local variables.
    Attack: an internal error whose message and local variable hold a patient row (Typer's pretty
    exceptions printed every local, `x=array([[0.0975...`)."""
    proc = _site_check_crash(tmp_path, debug=False)
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("pmfl: internal error (KeyError in client/deploy/cli.py:")
    assert line.endswith("set PMFL_DEBUG=1 to see the traceback, which may show data values")
    debug = _site_check_crash(tmp_path, debug=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "secret_row" not in debug.stderr  # Typer's pretty traceback, without its locals panel


def test_pmfls_own_errors_keep_their_safe_message(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Claim: one of pmfl's own errors that escapes a command keeps its message (written to be safe),
    one line each, exit 1.
    Fault: a SiteAdminError raised where no command catches it."""
    import client.deploy.site_dir
    from pmfl import cli

    def refuse(site_dir: Path, study_path: Path) -> None:
        raise client.deploy.site_dir.SiteAdminError("[connection].runtime_port: got 0\n[site].name: missing")

    monkeypatch.setattr(client.deploy.site_dir, "check_site", refuse)
    monkeypatch.setattr(sys, "argv", ["pmfl", "site", "check", "anywhere", "--study", "study.toml"])
    monkeypatch.delenv("PMFL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "pmfl: error: [connection].runtime_port: got 0", "pmfl: error: [site].name: missing"]
