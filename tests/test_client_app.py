"""The hospital's ClientApp, called as Flower calls it: budget checks, declines, plain keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context

from client.app import app as client_app
from pm_common import protocol as p
from pm_common import wire
from pm_common.models import build_tabular_model
from pm_common.privacy import cumulative_epsilon
from tests.conftest import heart_study, site_context, train_message


def _run_round(study, context: Context, server_round: int):  # type: ignore[no-untyped-def]
    reply = client_app(train_message(study, server_round), context)
    assert not reply.has_error()
    site = reply.content[p.SITE]
    return reply, site, json.loads(str(site[p.LEDGER_LINE]))


def test_site_trains_sends_plain_keys_and_its_ledger_line(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 5})
    reply, site, entry = _run_round(study, site_context(path, partition=0), 1)
    model_keys = set(build_tabular_model("logreg", study.contract.num_inputs).state_dict())
    assert set(wire.unpacked(reply.content[p.MODEL])) == model_keys  # no Opacus "_module." prefix
    assert site[p.SITE_NAME] == "cleveland" and site[p.STATUS] == "trained"
    assert entry["steps"] == 13 and entry["sample_rate"] == pytest.approx(1 / 13)
    assert entry["epsilon"] == pytest.approx(
        cumulative_epsilon([(entry["noise_multiplier"], entry["sample_rate"], 13)], entry["delta"])
    )
    train, evaluation = wire.split_metrics(reply.content[p.TRAIN_METRICS])
    assert train[p.NUM_EXAMPLES] > 0 and "train-loss" in train and evaluation is not None
    assert evaluation["n"] == 102 and 0 <= evaluation["accuracy"] <= 1 and "auc" in evaluation


def test_site_declines_past_its_budget_and_sends_no_update(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 3})
    context = site_context(path, partition=2)  # Switzerland
    epsilons = []
    for server_round in (1, 2, 3):
        _, site, entry = _run_round(study, context, server_round)
        assert site[p.STATUS] == "trained"
        epsilons.append(entry["epsilon"])
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 3.0  # cumulative, within budget
    assert site[p.NEXT_ROUND_FITS] is False
    reply, site, entry = _run_round(study, context, 4)  # the coordinator asks for one round more
    assert site[p.STATUS] == "declined" and "privacy budget" in site[p.REASON]
    assert p.MODEL not in reply.content
    assert entry["steps"] == 0 and entry["epsilon"] == pytest.approx(epsilons[-1])


def test_site_round_limit_is_the_sites_setting(tmp_path: Path, heart_sites: list) -> None:
    heart_sites[0]["max_rounds"] = 1
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 10})
    context = site_context(path, partition=0)
    assert _run_round(study, context, 1)[1][p.STATUS] == "trained"
    _, site, _ = _run_round(study, context, 2)
    assert site[p.STATUS] == "declined" and "at most 1 rounds" in site[p.REASON]


def test_no_dp_site_says_there_is_no_guarantee(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, privacy={"dp": False})
    _, site, entry = _run_round(study, site_context(path, partition=1), 1)
    assert site[p.STATUS] == "trained"
    assert entry["dp"] is False and entry["epsilon"] is None and entry["accountant"] == "none"


def test_small_test_sets_send_no_metrics(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, study={"min_report_count": 50})
    reply, _, _ = _run_round(study, site_context(path, partition=2), 1)  # 41 test rows < 50
    assert wire.split_metrics(reply.content[p.TRAIN_METRICS])[1] is None


def test_deployed_site_keeps_state_in_its_directory(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 4})
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "site.toml").write_text(
        f'[site]\nname = "hungary"\ndata = "{heart_sites[1]["data"]}"\n'
        "[privacy]\nepsilon = 2.0\ndelta = 1e-5\n"
    )
    for server_round in (1, 2):  # a new Context each time: nothing survives but the directory
        _, _, entry = _run_round(study, site_context(path, site_dir=site_dir), server_round)
    ledger = (site_dir / "state" / study.name / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in ledger] == [1, 2]
    assert entry["epsilon_budget"] == 2.0 and entry["epsilon"] > json.loads(ledger[0])["epsilon"]
