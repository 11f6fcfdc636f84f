"""The hospital's ClientApp, called as Flower calls it: enrolment, budget checks, declines, plain keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, MessageType

from client.app import app as client_app
from pm_common.models.tabular import build_tabular_model
from pm_common.privacy.accountant import cumulative_epsilon
from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from tests.conftest import enroll, heart_study, site_context, train_message


def _enrolled(path: Path, study, **where) -> tuple[Context, str]:  # type: ignore[no-untyped-def]
    """A site's context after it enrolled in a fresh run of `study`, and that run's id."""
    context = site_context(path, **where)
    return context, enroll(study, [context]).run


def _run_round(study, context: Context, server_round: int, run: str, attempt: int = 0):  # type: ignore[no-untyped-def]
    reply = client_app(train_message(study, server_round, run=run, attempt=attempt), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    site = reply.content[p.SITE]
    return reply, site, json.loads(str(site[p.LEDGER_LINE]))


def test_site_trains_sends_plain_keys_and_its_ledger_line(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 5})
    context, run = _enrolled(path, study, partition=0)
    reply, site, entry = _run_round(study, context, 1, run)
    model_keys = set(build_tabular_model("logreg", study.contract.num_inputs).state_dict())
    assert set(wire.unpacked(reply.content[p.MODEL])) == model_keys  # no Opacus "_module." prefix
    assert site[p.SITE_NAME] == "cleveland" and site[p.STATUS] == "trained"
    assert entry["steps"] == 13 and entry["sample_rate"] == pytest.approx(1 / 13)
    assert entry["run"] == run and entry["attempt"] == 0
    assert entry["epsilon"] == pytest.approx(
        cumulative_epsilon([(entry["noise_multiplier"], entry["sample_rate"], 13)], entry["delta"])
    )
    train, evaluation = wire.split_metrics(reply.content[p.TRAIN_METRICS])
    assert train[p.NUM_EXAMPLES] > 0 and "train-loss" in train and evaluation is not None
    assert evaluation["n"] == 102 and 0 <= evaluation["accuracy"] <= 1 and "auc" in evaluation


def test_site_declines_past_its_budget_and_sends_no_update(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 3})
    context, run = _enrolled(path, study, partition=2)  # Switzerland
    epsilons = []
    for server_round in (1, 2, 3):
        _, site, entry = _run_round(study, context, server_round, run)
        assert site[p.STATUS] == "trained"
        epsilons.append(entry["epsilon"])
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 3.0  # cumulative, within budget
    assert site[p.NEXT_ROUND_FITS] is False
    reply, site, entry = _run_round(study, context, 4, run)  # the coordinator asks for one round more
    assert site[p.STATUS] == "declined" and "privacy budget" in site[p.REASON]
    assert p.MODEL not in reply.content
    assert entry["steps"] == 0 and entry["epsilon"] == pytest.approx(epsilons[-1])


def test_site_round_limit_is_the_sites_setting(tmp_path: Path, heart_sites: list) -> None:
    heart_sites[0]["max_rounds"] = 1
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 10})
    context, run = _enrolled(path, study, partition=0)
    assert _run_round(study, context, 1, run)[1][p.STATUS] == "trained"
    _, site, _ = _run_round(study, context, 2, run)
    assert site[p.STATUS] == "declined" and "at most 1 rounds" in site[p.REASON]


def test_no_dp_site_says_there_is_no_guarantee(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, privacy={"dp": False})
    context, run = _enrolled(path, study, partition=1)
    _, site, entry = _run_round(study, context, 1, run)
    assert site[p.STATUS] == "trained"
    assert entry["dp"] is False and entry["epsilon"] is None and entry["accountant"] == "none"


def test_small_test_sets_send_no_metrics(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, study={"min_report_count": 50})
    context, run = _enrolled(path, study, partition=2)
    reply, _, _ = _run_round(study, context, 1, run)  # 41 test rows < 50
    assert wire.split_metrics(reply.content[p.TRAIN_METRICS])[1] is None


def test_deployed_site_keeps_state_in_its_directory(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 4})
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "site.toml").write_text(
        f'[site]\nname = "hungary"\ndata = "{heart_sites[1]["data"]}"\n'
        "[privacy]\nepsilon = 2.0\ndelta = 1e-5\n"
    )
    _, run = _enrolled(path, study, site_dir=site_dir)
    for server_round in (1, 2):  # a new Context each time: nothing survives but the directory
        _, _, entry = _run_round(study, site_context(path, site_dir=site_dir), server_round, run)
    ledger = (site_dir / "state" / study.name / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in ledger] == ["enrolled", "trained", "trained"]
    assert [json.loads(line)["round"] for line in ledger] == [0, 1, 2]
    assert entry["epsilon_budget"] == 2.0 and entry["epsilon"] > json.loads(ledger[1])["epsilon"]
    assert (site_dir / "state" / study.name / "rosters" / f"{run}.json").exists()  # its signed copy


def test_final_evaluation_closes_the_run_and_sends_the_whole_ledger(tmp_path: Path, heart_sites: list) -> None:  # noqa: E501
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 2})
    context, run = _enrolled(path, study, partition=0)
    _run_round(study, context, 1, run)
    close = train_message(study, 2, run=run, message_type=MessageType.EVALUATE, **{p.CLOSE: True})
    for _ in range(2):  # a repeated closing request closes nothing twice
        reply = client_app(close, context)
        assert not reply.has_error()
        lines = [json.loads(str(line)) for line in reply.content[p.SITE][p.LEDGER_LINES]]
        assert [e["status"] for e in lines] == ["enrolled", "trained", "closed"]
    assert wire.split_metrics(reply.content[p.TRAIN_METRICS])[1] is not None  # it evaluated too
    refused = client_app(train_message(study, 2, run=run), context)  # nothing after the close
    assert refused.has_error() and "closed" in refused.error.reason


def test_site_answers_only_runs_it_enrolled_in_and_each_round_once(tmp_path: Path, heart_sites: list) -> None:
    """A repeated round (same run, round and attempt) is refused, never trained twice; a re-run of
    the round under a new attempt (a restarted coordinator) is a new ledger line."""
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 5})
    context, run = _enrolled(path, study, partition=0)
    refused = client_app(train_message(study, 1, run="0" * 32), context)
    assert refused.has_error() and "not enrolled" in refused.error.reason
    _run_round(study, context, 1, run)
    refused = client_app(train_message(study, 1, run=run), context)
    assert refused.has_error() and "already answered" in refused.error.reason
    _, _, entry = _run_round(study, context, 1, run, attempt=1)
    assert (entry["round"], entry["attempt"]) == (1, 1)


def test_budget_that_cannot_be_met_declines_with_its_reason(tmp_path: Path, heart_sites: list) -> None:
    """Issue 14.12: a budget no noise can meet is a decline with the reason in the ledger, every
    round; the site spends nothing, and stays visible."""
    heart_sites[2]["epsilon"] = 0.01
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 20})
    context, run = _enrolled(path, study, partition=2)
    for server_round in (1, 2):
        reply, site, entry = _run_round(study, context, server_round, run)
        assert site[p.STATUS] == "declined" and "privacy budget too low" in site[p.REASON]
        assert entry["steps"] == 0 and entry["epsilon"] == 0.0 and p.MODEL not in reply.content


def test_site_with_one_class_declines_and_tiny_site_warns(tmp_path: Path, heart_sites: list) -> None:
    """Issue 14.17: a site that cannot learn says so instead of training on nothing."""
    rows = (Path(heart_sites[0]["data"])).read_text().splitlines()
    header, body = rows[0], rows[1:]
    target = header.split(",").index("num")
    negatives = [r for r in body if r.split(",")[target] == "0"]
    one_class = tmp_path / "one_class.csv"
    one_class.write_text("\n".join([header, *negatives[:60]]) + "\n")
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("\n".join([header, *body[:24]]) + "\n")
    heart_sites[0]["data"], heart_sites[1]["data"] = str(one_class), str(tiny)
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 3, "min_report_count": 1})
    context, run = _enrolled(path, study, partition=0)
    _, site, entry = _run_round(study, context, 1, run)
    assert site[p.STATUS] == "declined" and "same label" in site[p.REASON] and entry["steps"] == 0
    context, run = _enrolled(path, study, partition=1)
    _, site, entry = _run_round(study, context, 1, run)
    assert site[p.STATUS] == "trained" and "training rows" in site[p.WARNING]


def test_replay_seed_makes_a_simulated_sites_noise_replayable_and_nothing_else(
    tmp_path: Path, heart_sites: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test-only hook (client/replay.py): the same seed gives a simulated site the same DP-SGD
    draw, so a threshold test replays; a deployed site (its own directory) never uses it."""
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 5})

    def update(seed: str | None, **where) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
        if seed is None:
            monkeypatch.delenv("PMFL_REPLAY_SEED", raising=False)
        else:
            monkeypatch.setenv("PMFL_REPLAY_SEED", seed)
        context, run = _enrolled(path, study, **where)
        reply, site, _ = _run_round(study, context, 1, run)
        return wire.unpacked(reply.content[p.MODEL]), dict(site)

    first, record = update("5", partition=0)
    again, _ = update("5", partition=0)
    other, _ = update("6", partition=0)
    assert all((first[k] == again[k]).all() for k in first) and record[p.NOISE_SEEDED] is True
    assert any((first[k] != other[k]).any() for k in first)
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "site.toml").write_text(f'[site]\nname = "cleveland"\ndata = "{heart_sites[0]["data"]}"\n')
    deployed, record = update("5", site_dir=site_dir)
    assert p.NOISE_SEEDED not in record and any((first[k] != deployed[k]).any() for k in first)


def test_site_refuses_study_settings_other_than_the_roster_it_signed(tmp_path: Path, heart_sites: list) -> None:  # noqa: E501
    """A coordinator may not change the study after round 1: the roster names its digest."""
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 5})
    context, run = _enrolled(path, study, partition=0)
    changed = {"learning_rate": 5.0}
    _, other = heart_study(tmp_path / "other", heart_sites, study={"rounds": 5}, training=changed)
    refused = client_app(train_message(other, 1, run=run), context)
    assert refused.has_error() and "not those of the roster" in refused.error.reason
    _run_round(study, context, 1, run)  # the study it signed still runs


def test_spend_is_recorded_even_when_the_update_cannot_be_built(
    tmp_path: Path, heart_sites: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once DP-SGD ran, its line is on the site's books before anything else can fail."""
    import client.app as site_app

    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 5})
    context, run = _enrolled(path, study, partition=0)

    def broken(arrays):  # type: ignore[no-untyped-def]
        raise RuntimeError("the update cannot be packed")

    message = train_message(study, 1, run=run)
    monkeypatch.setattr(site_app.wire, "packed_record", broken)
    reply = client_app(message, context)
    assert reply.has_error()
    monkeypatch.undo()
    _, _, entry = _run_round(study, context, 2, run)  # the next round composes round 1's spend
    history = [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])] * 2
    assert entry["epsilon"] == pytest.approx(cumulative_epsilon(history, entry["delta"]))
