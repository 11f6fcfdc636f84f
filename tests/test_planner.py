"""The privacy-utility planner: the sites' own plan (one helper), its noise-to-signal and advice."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from typer.testing import CliRunner

from pm_common.privacy.planner import (
    drowning_threshold,
    model_parameters,
    site_plan,
    site_report,
    utility,
)
from pm_common.study.config import PersonalizationConfig
from pmfl.cli import BAD_INPUT, app
from tests.conftest import heart_study
from tests.test_client_app import _enrolled, _run_round


def test_the_site_trains_by_the_plan_the_planner_shows(tmp_path: Path, heart_sites: list) -> None:
    """One helper: the plan a site saves before round 1 is `site_plan`'s, personal steps included."""
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 3},
                              personalization={"method": "finetune", "epochs": 1})
    context, run = _enrolled(path, study, partition=2)
    _, _, line = _run_round(study, context, 1, run)
    state = Path(context.run_config["sites-dir"]) / "switzerland" / "state" / study.name / "state.json"
    saved = json.loads(state.read_text())["plan"]
    rows = round(1 / line["sample_rate"]) * study.training.batch_size  # any count with the same batches
    _, plan = site_plan(study, study.site("switzerland"), rows)
    assert plan is not None and plan.personal_steps > 0
    assert saved == plan.to_dict()


def test_noise_to_signal_is_sigma_over_expected_batch_and_flags_small_sites(tmp_path: Path,
                                                                              heart_sites: list) -> None:
    _, study = heart_study(tmp_path, heart_sites, privacy={"epsilon": 1.0})
    site = study.site("cleveland")
    parameters = model_parameters(study)
    assert parameters == study.contract.num_inputs + 1  # logistic regression: weights and bias
    small = site_report(study, site, 60, parameters)
    u = small.utility
    assert u is not None and math.isclose(u.noise_to_signal, u.noise_multiplier / (u.sample_rate * 60))
    assert u.threshold == drowning_threshold(parameters) and u.drowned
    assert small.advice  # and the advice lowers the ratio it names first
    first = float(small.advice[0].rsplit("noise-to-signal ", 1)[1])
    assert first < u.noise_to_signal
    large = site_report(replace(study, training=replace(study.training, batch_size=256)),
                        replace(site, privacy=replace(site.privacy, epsilon=8.0)), 5000, parameters)
    assert large.utility is not None and not large.utility.drowned and large.advice == []


def test_personal_steps_count_in_the_planned_steps(tmp_path: Path, heart_sites: list) -> None:
    _, study = heart_study(tmp_path, heart_sites)
    site = study.site("hungary")
    _, plain = site_plan(study, site, 200)
    _, personal = site_plan(replace(study, personalization=PersonalizationConfig("finetune", 3)), site, 200)
    assert plain is not None and personal is not None
    assert personal.planned_steps == plain.planned_steps + 3 * plain.steps_per_round
    assert utility(personal, 200, 39).steps == personal.planned_steps
    assert personal.noise_multiplier > plain.noise_multiplier


def test_plan_command_prints_every_site_and_refuses_bad_input(tmp_path: Path, heart_sites: list) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "heart-disease", "--rows", "60", "--epsilon", "1"])
    assert result.exit_code == 0, result.output
    assert "this-site" in result.output and "noise will drown the signal" in result.output
    path, _ = heart_study(tmp_path, heart_sites)
    text = path.read_text().replace("batch_size = 16", "batch_size = 0")
    path.write_text(text)
    refused = runner.invoke(app, ["plan", str(path)])
    assert refused.exit_code == BAD_INPUT and "[training].batch_size" in refused.output
    assert "Traceback" not in refused.output


def test_auto_plan_picks_a_larger_batch_within_the_budget_and_the_site_trains_by_it(
    tmp_path: Path, heart_sites: list
) -> None:
    from pm_common.privacy.accountant import cumulative_epsilon
    from pm_common.privacy.planner import AUTO_MARGIN, batch_candidates

    assert batch_candidates(16, 100) == [16, 32, 64, 100]
    path, study = heart_study(tmp_path, heart_sites, study={"rounds": 2}, training={"plan": "auto"})
    site = study.site("hungary")
    _, plan = site_plan(study, site, 130)
    assert plan is not None and plan.batch_size in batch_candidates(16, 130)
    fixed = site_plan(replace(study, training=replace(study.training, plan="fixed")), site, 130)[1]
    assert fixed is not None and fixed.batch_size == 0
    d = model_parameters(study)
    chosen, default = utility(plan, 130, d).noise_to_signal, utility(fixed, 130, d).noise_to_signal
    assert chosen <= default
    if plan.batch_size > 16:  # it went past the study's batch only because that one was too noisy
        assert default > AUTO_MARGIN * drowning_threshold(d)
    spent = [(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)]
    assert cumulative_epsilon(spent, plan.delta) <= site.privacy.epsilon
    # the site trains at the batch it chose, and its ledger line says so
    context, run = _enrolled(path, study, partition=1)
    _, _, line = _run_round(study, context, 1, run)
    saved = json.loads((Path(context.run_config["sites-dir"]) / "hungary" / "state" / study.name
                        / "state.json").read_text())["plan"]
    assert saved["batch_size"] > 0 and f"expected batch {saved['batch_size']}" in line["reason"]
    assert line["sample_rate"] == saved["sample_rate"] and line["steps"] == saved["steps_per_round"]
