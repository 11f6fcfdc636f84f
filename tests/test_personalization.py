"""Personalised models: every personal step is DP-SGD under the site's one budget, in its signed
ledger, recomputed by the audit; the model stays at the site; the coordinator cannot buy more."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import MessageType

from client.app import app as client_app
from pm_common.audit.rules import EXIT_OK, audit_site, verdict
from pm_common.privacy.accountant import cumulative_epsilon, plan_study
from pm_common.records.ledger import PERSONAL, read_ledger
from pm_common.records.signing import load_public_key
from pm_common.study.config import StudyConfigError, load_study
from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from tests.conftest import heart_study, train_message
from tests.test_client_app import _enrolled, _run_round

FINETUNE = {"method": "finetune", "epochs": 2}


def _close(study, context, run: str, final_round: int):  # type: ignore[no-untyped-def]
    reply = client_app(train_message(study, final_round, run=run, message_type=MessageType.EVALUATE,
                                     **{p.CLOSE: True}), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


def _ledger_rows(reply) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(str(line)) for line in reply.content[p.SITE][p.LEDGER_LINES]]


@pytest.mark.parametrize(("model", "settings", "place", "words"), [
    ("mlp", {"method": "fedper"}, "[personalization].local_layers", "missing"),
    ("mlp", {"method": "finetune", "local_layers": ["net.2"]}, "[personalization].local_layers",
     '"fedper" only'),
    ("mlp", {"method": "fedper", "local_layers": ["head"]}, "[personalization].local_layers", '"net.2"'),
    ("logreg", {"method": "finetune", "lambda": 0.5}, "[personalization].lambda", '"ditto" only'),
    ("logreg", {"method": "fedper", "local_layers": ["linear"]}, "[personalization].local_layers",
     "nothing would be federated"),
])
def test_fedper_layers_are_checked_before_anything_starts(
    tmp_path: Path, heart_sites: list, model: str, settings: dict, place: str, words: str
) -> None:
    from simulations.preflight import SiteDataError, preflight

    with pytest.raises((StudyConfigError, SiteDataError)) as refused:
        _, study = heart_study(tmp_path, heart_sites, model={"name": model}, personalization=settings)
        preflight(study, plans=False)
    lines = refused.value.problems
    assert len(lines) == 1 and lines[0].startswith(place) and words in lines[0], lines


def test_fedper_never_sends_nor_takes_the_local_layers(tmp_path: Path, heart_sites: list) -> None:
    import torch
    from flwr.app import ArrayRecord

    from pm_common.models.tabular import build_tabular_model

    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 3},
                              model={"name": "mlp", "hidden": [8]},
                              personalization={"method": "fedper", "local_layers": ["net.2"]})
    context, run = _enrolled(path, study, partition=1)
    full = build_tabular_model("mlp", study.contract.num_inputs, (8,))
    state = full.state_dict()
    state["net.2.weight"] = torch.full_like(state["net.2.weight"], 99.0)  # a coordinator sets the head
    arrays = ArrayRecord(state)
    sent_keys = []
    for r in (1, 2):
        reply = client_app(train_message(study, r, arrays, run=run), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        sent_keys.append(set(wire.unpacked(reply.content[p.MODEL])))
        assert json.loads(str(reply.content[p.SITE][p.LEDGER_LINE]))["status"] == "trained"
    assert sent_keys == [{"net.0.weight", "net.0.bias"}] * 2  # only the shared layers ever leave
    kept = Path(context.run_config["sites-dir"]) / "hungary" / "state" / study.name / "personal" / f"{run}.pt"
    head = torch.load(kept, weights_only=True)["state_dict"]["net.2.weight"]
    assert head.abs().max() < 50  # the site's own head, trained from its own start, not the coordinator's
    final = _close(study, context, run, 3)
    assert Path(str(final.content[p.SITE][p.PERSONAL_MODEL])) == kept
    assert not [e for e in _ledger_rows(final) if e.get("phase") == PERSONAL]  # fedper spends nothing extra


def test_unknown_method_and_bad_epochs_are_refused(tmp_path: Path, heart_sites: list) -> None:
    with pytest.raises(StudyConfigError) as refused:
        heart_study(tmp_path, heart_sites, personalization={"method": "magic", "epochs": 0})
    text = "\n".join(refused.value.problems)
    assert "[personalization].method" in text and '"ditto"' in text and "[personalization].epochs" in text


def test_plan_reserves_the_personal_steps_up_front() -> None:
    args = dict(epsilon_budget=3.0, delta=1e-5, num_examples=200, batch_size=16, local_epochs=1,
                planned_rounds=5, max_grad_norm=1.0)
    plain, personal = plan_study(**args), plan_study(**args, personal_epochs=2)
    assert personal.personal_steps == 2 * 13 and personal.planned_steps == 5 * 13 + 26
    assert personal.noise_multiplier > plain.noise_multiplier  # more steps in the same budget: more noise
    everything = [(personal.noise_multiplier, personal.sample_rate, personal.planned_steps)]
    assert cumulative_epsilon(everything, 1e-5) <= 3.0
    # without the reserve, the same steps would overrun: the plan must be the one that pays for them
    overrun = [(plain.noise_multiplier, plain.sample_rate, personal.planned_steps)]
    assert cumulative_epsilon(overrun, 1e-5) > 3.0


def test_finetune_is_one_signed_ledger_line_the_audit_recomputes(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 2}, personalization=FINETUNE)
    context, run = _enrolled(path, study, partition=1)
    for r in (1, 2):
        _run_round(study, context, r, run)
    reply = _close(study, context, run, 2)
    rows = _ledger_rows(reply)
    assert [(e["status"], e.get("phase", "")) for e in rows] == [
        ("enrolled", ""), ("trained", ""), ("trained", ""), ("trained", PERSONAL), ("closed", "")]
    federated, personal = rows[2], rows[3]
    assert personal["steps"] > 0 and personal["noise_multiplier"] == federated["noise_multiplier"]
    assert personal["epsilon"] > federated["epsilon"]  # the personal steps compose into the figure
    assert personal["epsilon"] <= personal["epsilon_budget"]
    # the auditor recomputes every line, the personal one included, unchanged
    store = Path(context.run_config["sites-dir"]) / "hungary"
    key = load_public_key(store / "keys" / "ledger_ed25519.pub")
    audit = audit_site("hungary", rows, key)
    findings = [f.message for f in audit.findings]
    assert verdict(audit.findings, [audit], ["the site key"])[0] == EXIT_OK, findings
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in rows]
    assert audit.rdp_epsilon == pytest.approx(cumulative_epsilon(history, 1e-5), rel=1e-3)
    assert audit.rdp_epsilon > cumulative_epsilon(history[:3], 1e-5)
    # the personal model stays at the site: the reply says where, and carries no model arrays
    where = Path(str(reply.content[p.SITE][p.PERSONAL_MODEL]))
    assert where.is_file() and store in where.parents
    assert p.MODEL not in reply.content and not reply.content.array_records
    assert wire.split_metrics(reply.content[p.PERSONAL_METRICS])[1]["n"] > 0
    # a repeated final evaluation trains nothing twice
    again = _ledger_rows(_close(study, context, run, 2))
    assert again == rows


def test_extra_rounds_cannot_eat_the_personal_reserve(tmp_path: Path, heart_sites: list) -> None:
    """The adversary: a coordinator asking for rounds past the plan must not spend the personal
    steps; the site declines the round, then still trains its personal model within its budget."""
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 2}, personalization=FINETUNE)
    context, run = _enrolled(path, study, partition=1)
    for r in (1, 2):
        _run_round(study, context, r, run)
    _, _, line = _run_round(study, context, 3, run)  # a round the plan did not count
    assert line["status"] == "declined" and "personal steps" in line["reason"]
    rows = _ledger_rows(_close(study, context, run, 3))
    personal = [e for e in rows if e.get("phase") == PERSONAL]
    assert len(personal) == 1 and personal[0]["epsilon"] <= personal[0]["epsilon_budget"]


def test_site_whose_budget_is_spent_trains_no_personal_model(tmp_path: Path, heart_sites: list) -> None:
    heart_sites[1]["epsilon"] = 0.5
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 2}, personalization=FINETUNE)
    context, run = _enrolled(path, study, partition=1)
    for r in (1, 2):
        _run_round(study, context, r, run)
    state = Path(context.run_config["sites-dir"]) / "hungary" / "state" / study.name / "state.json"
    saved = json.loads(state.read_text())
    saved["accountant"]["history"].append([0.5, 0.1, 500])  # spent elsewhere (e.g. a crashed retry)
    state.write_text(json.dumps(saved))
    reply = _close(study, context, run, 2)
    assert "privacy budget" in str(reply.content[p.SITE][p.PERSONAL_REASON])
    assert p.PERSONAL_MODEL not in reply.content[p.SITE]
    assert not [e for e in _ledger_rows(reply) if e.get("phase") == PERSONAL]


def test_simulation_with_finetune_reports_global_and_personal(tmp_path: Path, heart_sites: list) -> None:
    from pm_common.audit.directories import audit_directory
    from simulations.runner import simulate

    _, study = heart_study(tmp_path, heart_sites[:2], study={"rounds": 2}, personalization=FINETUNE)
    out = tmp_path / "run"
    metrics = simulate(study, out)
    sites = metrics["personalization"]["sites"]
    assert metrics["personalization"]["method"] == "finetune" and set(sites) == {"cleveland", "hungary"}
    for name, report in sites.items():
        assert report["global"]["n"] == report["personal"]["n"] > 0
        model = Path(report["model"])
        assert model.is_file() and (out / "simulated-sites" / name) in model.parents
        ledger = read_ledger(out / "privacy" / f"ledger-{name}.jsonl")
        assert [e.phase for e in ledger].count(PERSONAL) == 1
        assert ledger[-1].epsilon <= ledger[-1].epsilon_budget
    summary = json.loads((out / "privacy" / "summary.json").read_text())["sites"]
    assert all(s["personal_steps"] > 0 and s["rounds_trained"] == 2 for s in summary.values())
    assert audit_directory(out).exit_code == EXIT_OK
    card = (out / "model_card.md").read_text()  # beside model.pt: what it is, what it cost, what not to do
    for name, s in summary.items():
        assert f"| {name} | {sites[name]['global']['n']:.0f} |" in card and f"{s['epsilon']:.3f}" in card
    assert "## Must not be used for" in card and "personalisation: finetune" in card
    assert load_study(out / "config.toml").personalization.method == "finetune"


def test_ditto_pays_for_its_personal_steps_in_each_rounds_line(tmp_path: Path, heart_sites: list) -> None:
    import torch

    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 2},
                              personalization={"method": "ditto", "lambda": 0.5})
    context, run = _enrolled(path, study, partition=1)
    sent = []
    for r in (1, 2):
        reply, _, line = _run_round(study, context, r, run)
        sent.append(wire.unpacked(reply.content[p.MODEL]))
    state = Path(context.run_config["sites-dir"]) / "hungary" / "state" / study.name
    plan = json.loads((state / "state.json").read_text())["plan"]
    assert plan["personal_steps"] == 2 * plan["steps_per_round"]  # planned up front: both stretches
    assert line["steps"] == 2 * plan["steps_per_round"] and "personal" in line["reason"]
    rows = _ledger_rows(_close(study, context, run, 2))
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in rows]
    assert rows[-1]["epsilon"] == pytest.approx(cumulative_epsilon(history, 1e-5))
    assert rows[-1]["epsilon"] <= 3.0
    key = load_public_key(Path(context.run_config["sites-dir"]) / "hungary" / "keys" / "ledger_ed25519.pub")
    audit = audit_site("hungary", rows, key)
    assert verdict(audit.findings, [audit], ["the site key"])[0] == EXIT_OK, audit.findings
    personal = torch.load(state / "personal" / f"{run}.pt", weights_only=True)["state_dict"]
    assert all(not torch.equal(personal[k], torch.from_numpy(sent[-1][k])) for k in personal)  # never sent


def test_resuming_a_fedper_run_is_refused_in_one_line_before_anything_starts(
    tmp_path: Path, heart_sites: list
) -> None:
    from simulations.runner import simulate

    _, study = heart_study(tmp_path, heart_sites, model={"name": "mlp"},
                           personalization={"method": "fedper", "local_layers": ["net.2"]})
    with pytest.raises(StudyConfigError, match="resuming a fedper run is not supported yet") as refused:
        simulate(study, tmp_path / "run", resume=True)
    assert "\n" not in str(refused.value) and not (tmp_path / "run").exists()
