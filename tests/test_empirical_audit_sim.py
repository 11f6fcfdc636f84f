"""The empirical check end to end: canaries at one site, the real apps, the one-run audit."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from client.site import load_site_data
from pm_common.audit.directories import run_audit
from pm_common.models.tabular import build_tabular_model
from pm_common.study.config import load_study, study_text_for_sites, with_overrides
from pm_common.tasks import task_of
from simulations.empirical_audit import (
    canary_scores,
    clipped_private_gradients,
    simulate_with_empirical_audit,
    with_canaries,
)
from tests.conftest import HEART


def _rows(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> Counter[bytes]:
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32)
    return Counter(np.concatenate([x, y[:, None]], axis=1)[i].tobytes() for i in range(len(y)))


def test_the_site_trains_on_its_own_rows_plus_exactly_the_included_canaries(tmp_path: Path) -> None:
    study = load_study(HEART)
    audited = with_canaries(study, "cleveland", 120, tmp_path, rng=np.random.default_rng(0),
                            secret_rng=np.random.default_rng(1))
    canaries, included = audited.canaries, audited.included
    assert 0 < included.sum() < len(included)
    # what the site's own loader (validation against the contract, seeded split) trains on
    site = load_site_data(audited.study.site("cleveland"), study_text_for_sites(audited.study))
    real = task_of(study).load_site(study.site("cleveland"), study)  # the same site without canaries
    assert _rows(site.train_x, site.train_y) == _rows(real.train_x, real.train_y) + _rows(
        canaries.x[included], canaries.y[included])
    excluded = _rows(canaries.x[~included], canaries.y[~included])
    assert not set(_rows(site.train_x, site.train_y)) & set(excluded)
    # every canary writes to inputs that no real training row of the site uses
    private = list(canaries.private_columns)
    assert private and not real.train_x[:, private].any()
    assert (canaries.x[:, private] != 0).any(axis=1).all()
    assert audited.study.model.name == "mlp"


def test_scores_recover_the_canaries_a_noiseless_step_used(tmp_path: Path) -> None:
    """Against an update built as DP-SGD without noise builds it, the fit ranks every included
    canary above every excluded one (real rows write nothing on the private inputs)."""
    study = load_study(HEART)
    audited = with_canaries(study, "cleveland", 60, tmp_path, rng=np.random.default_rng(2),
                            secret_rng=np.random.default_rng(3))
    canaries, included = audited.canaries, audited.included
    model = build_tabular_model("mlp", study.contract.num_inputs, (32,), 0).double()
    sent = {k: v.detach().clone() for k, v in model.named_parameters()}
    lr, batch = 0.5, 16
    contribution = clipped_private_gradients(model, sent, canaries, 1.0)[torch.from_numpy(included)].sum(0)
    weight = sent["net.0.weight"].clone()
    weight[:, list(canaries.private_columns)] -= (lr / batch) * contribution.reshape(len(weight), -1)
    returned = {**sent, "net.0.weight": weight}
    rounds = [({k: v.numpy() for k, v in sent.items()}, {k: v.numpy() for k, v in returned.items()})]
    scores = canary_scores(model, rounds, canaries, learning_rate=lr, batch_size=batch, max_grad_norm=1.0)
    assert scores[included].min() > scores[~included].max()


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two real simulations (3 rounds each): the honest DP run and the no-DP positive control."""
    study = with_overrides(load_study(HEART), rounds=3)
    out = tmp_path_factory.mktemp("empirical") / "run"
    return out, simulate_with_empirical_audit(study, out, canaries=200, seed=7)


def test_positive_control_shows_a_clear_lower_bound(audited_run: tuple[Path, dict]) -> None:
    out, data = audited_run
    (control,) = [a for a in data["audits"] if a.get("control")]
    assert control["dp"] is False and control["epsilon_claimed"] is None  # claimed epsilon: infinite
    assert control["canaries"] == 200 and control["rounds"] == 3
    assert control["epsilon_lower_bound"] > 0.5, control
    assert (out / "empirical-control" / "privacy" / "empirical" / "update-0003.npz").exists()


def test_honest_dp_run_stays_below_its_reported_epsilon(audited_run: tuple[Path, dict]) -> None:
    out, data = audited_run
    (honest,) = [a for a in data["audits"] if not a.get("control")]
    summary = json.loads((out / "privacy" / "summary.json").read_text())
    reported = summary["sites"][honest["site"]]["epsilon"]
    assert honest["epsilon_reported"] == pytest.approx(reported)
    assert 0 < reported <= 3.0
    assert honest["epsilon_lower_bound"] < reported, honest
    assert honest["rounds"] == 3 and honest["model"] == "mlp" and honest["noise_multiplier"] > 0.5
    on_disk = json.loads((out / "privacy" / "empirical_audit.json").read_text())
    assert on_disk["audits"] == data["audits"]
    assert sorted(p.name for p in (out / "privacy" / "empirical").glob("update-*.npz")) == [
        "update-0001.npz", "update-0002.npz", "update-0003.npz"]


def test_the_audit_reads_both_results(audited_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = audited_run
    result = run_audit(out)
    assert result.exit_code == 0, result.verdict
    assert result.empirical is not None and len(result.empirical) == 2
    assert "positive control" in (out / "audit" / "report.html").read_text(encoding="utf-8")
    # the same run with a lower bound above the accounted epsilon would be a proven violation
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("empirical-control", "audit"))
    path = copy / "privacy" / "empirical_audit.json"
    data = json.loads(path.read_text())
    for item in data["audits"]:
        if not item.get("control"):
            item["epsilon_lower_bound"] = item["epsilon_reported"] + 1.0
    path.write_text(json.dumps(data))
    assert run_audit(copy, report=False).exit_code == 1
