"""Bracketed names print as written (issue #14, item 16): rich markup must not eat `[privacy]`.

pmfl's messages name places in TOML syntax (`[privacy].epsilon`, `[[sites]] 'cleveland'`), and sites'
reasons quote their settings (`its [approval] studies`). Printed through rich as markup, every
`[name]` was taken for a style tag and vanished: `[[sites]]` printed as `[]`.
"""

from __future__ import annotations

import copy

import pytest
import tomli_w
from typer.testing import CliRunner

from pm_common.study.config import load_study
from pmfl.cli import app
from tests.conftest import HEART

runner = CliRunner()
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}  # help on one line per option: nothing wraps


def test_errors_show_bracketed_places_as_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Claim: a refusal naming `[[sites]]` and `[privacy]` prints them literally.
    Attack: a study whose first [[sites]] entry has no name and whose [privacy] epsilon is negative."""
    raw = copy.deepcopy(dict(load_study(HEART).raw))
    raw["sites"][0].pop("name")
    raw["privacy"]["epsilon"] = -1.0
    (tmp_path / "study.toml").write_text(tomli_w.dumps(raw), encoding="utf-8")
    result = runner.invoke(app, ["simulate", "--config", str(tmp_path / "study.toml"), "--out",
                                 str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"error: {tmp_path / 'study.toml'}: [privacy].epsilon: got -1.0; expected" in result.output
    assert "[[sites]] #1.name: missing; expected a name" in result.output


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["simulate"], ["replaces [privacy] epsilon and each [[sites]] entry's own", "[study] rounds"]),
        (["coordinator", "run"], ["study TOML (its [[sites]], if any, are not used)"]),
        (["site", "start"], ["override [connection] superlink"]),
        (["site", "init"], ["local port SuperNode <-> gate [default: 9094]"]),
    ],
)
def test_help_shows_bracketed_names_as_written(command: list[str], shown: list[str]) -> None:
    """Claim: `--help` of the researcher's, the coordinator's and the site's commands shows the TOML
    names in its option texts as written.
    Attack: help texts naming `[privacy]`, `[[sites]]`, `[connection]` and `[default: 9094]`."""
    result = runner.invoke(app, [*command, "--help"], env=WIDE)
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())  # the help panel's borders and wrapping
    for phrase in shown:
        assert phrase in text, phrase


def test_progress_lines_show_a_sites_reason_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim: what a site or the coordinator says about a round prints literally, brackets included.
    Attack: a decline quoting the site's `[approval] studies`, a rejection naming `[strategy]
    max_update_norm`, a failure naming `[[sites]]`; a site named like a style tag."""
    from pmfl import cli
    from server.deploy import cli as coordinator_cli
    from server.recorder import RoundProgress

    for console in (cli.console, coordinator_cli.console):
        monkeypatch.setattr(console, "width", 200)  # one line per message

    progress = RoundProgress(
        round=2, num_rounds=5, trained=["a"], failed=0, mean_site_accuracy=0.5, pooled_accuracy=0.5,
        max_epsilon=1.0, declined={"[bold]": "its [approval] studies: ['other']"},
        rejected={"b": "norm 9 exceeds [strategy] max_update_norm"},
    )
    with cli.console.capture() as captured:
        cli._progress_printer(5)(progress)
    printed = captured.get()
    assert "[bold] declined round 2: its [approval] studies: ['other']" in printed
    assert "b's update rejected in round 2: norm 9 exceeds [strategy] max_update_norm" in printed
    entry = {"round": 2, "trained": ["a"], "declined": {"c": "[privacy] budget"},
             "failures": ["node 3: [[sites]] entry refused"]}
    with coordinator_cli.console.capture() as captured:
        coordinator_cli._show_round(entry)
    assert "c declined: [privacy] budget" in captured.get()
    assert "failure: node 3: [[sites]] entry refused" in captured.get()
