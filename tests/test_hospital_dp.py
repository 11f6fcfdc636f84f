"""Hospital-level DP: clipped, noised updates and an aggregate guarantee accounted apart."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import pytest
import torch

from client.app import app as client_app
from pm_common.privacy.hospital_dp import clip_and_noise, hospital_epsilon, site_noise_std
from pm_common.study.config import HospitalDPConfig
from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from tests.conftest import enroll, heart_study, site_context, train_message


def _norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in update.values()))


def test_update_is_clipped_and_noised_with_the_sites_share() -> None:
    update = {"w": torch.full((1000,), 3.0), "b": torch.full((10,), 3.0)}
    clipped = clip_and_noise(update, clip_norm=1.0, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    assert _norm(clipped) == pytest.approx(1.0)
    noisy = clip_and_noise(update, 1.0, noise_std=0.5, generator=torch.Generator().manual_seed(0))
    residual = torch.cat([(noisy[k] - clipped[k]).flatten() for k in update])
    assert residual.std().item() == pytest.approx(0.5, rel=0.1)
    small = {"w": torch.full((4,), 0.1)}
    assert torch.equal(clip_and_noise(small, 1.0, 0.0, torch.Generator())["w"], small["w"])  # no inflation


def test_shares_sum_to_the_aggregates_noise_and_dropouts_weaken_the_guarantee() -> None:
    config = HospitalDPConfig(enabled=True, clip_norm=2.0, noise_multiplier=5.0, delta=1e-5)
    assert 4 * site_noise_std(config, 4) ** 2 == pytest.approx((5.0 * 2.0) ** 2)
    full = hospital_epsilon([4] * 50, 4, config)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(5.0), 50)
    assert full == pytest.approx(accountant.get_epsilon(1e-5))
    assert 6.5 < full < 7.5  # field notes: sigma 5, 4 sites, 50 rounds, delta 1e-5 gives about 7.1
    assert hospital_epsilon([4] * 49 + [2], 4, config) > full
    assert hospital_epsilon([], 4, config) == 0.0


def test_site_sends_a_clipped_update_with_uniform_weight(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, hospital_dp={
        "enabled": True, "clip_norm": 0.05, "noise_multiplier": 0.0})
    context = site_context(path, partition=0)
    msg = train_message(study, 1, run=enroll(study, [context]).run)
    msg.content[p.CONFIG][p.PLANNED_SITES] = 4
    sent = wire.unpacked(msg.content[p.MODEL])
    reply = client_app(msg, context)
    received = wire.unpacked(reply.content[p.MODEL])
    assert _norm({k: torch.from_numpy(received[k] - sent[k]) for k in sent}) <= 0.05 + 1e-6
    assert reply.content[p.TRAIN_METRICS][p.NUM_EXAMPLES] == 1


def test_coordinator_reports_the_hospital_guarantee_apart(tmp_path: Path, heart_sites: list) -> None:
    from server.recorder import RunRecorder, SiteRound

    _, study = heart_study(tmp_path, heart_sites, hospital_dp={"enabled": True, "noise_multiplier": 5.0})
    recorder = RunRecorder(tmp_path / "run", study, {})
    for server_round in (1, 2, 3):
        for site in ("cleveland", "hungary", "switzerland", "va_long_beach"):
            dropped = server_round == 3 and site == "hungary"
            status = "declined" if dropped else "trained"
            recorder.record_site_round(server_round, SiteRound(site, status), "")
    report = recorder.write_hospital_dp()
    assert [r["contributing_sites"] for r in report["rounds"]] == [4, 4, 3]
    assert report["epsilon"] == pytest.approx(hospital_epsilon([4, 4, 3], 4, study.hospital_dp))
    assert "never add" in report["not_additive"]
    assert (tmp_path / "run" / "privacy" / "hospital_dp.json").exists()
