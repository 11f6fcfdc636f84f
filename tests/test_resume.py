"""A coordinator that dies and is restarted resumes its study: no round twice, no spend lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAdam, FedAvgM

from pm_common.audit.directories import audit_directory
from pm_common.privacy.accountant import cumulative_epsilon
from pm_common.records.ledger import LedgerEntry, read_ledger, round_entries
from pm_common.study.config import StrategyConfig
from server.recorder import RoundProgress
from server.resume import load_resume_point, restore_strategy_state, strategy_state
from server.strategies import build_strategy
from simulations.runner import simulate
from tests.conftest import heart_study
from tests.test_privacy import dp_accounting_rdp

SITES = ("cleveland", "hungary", "switzerland", "va_long_beach")


RUN = "ab" * 16


def _entry(site: str, server_round: int, run: str = RUN) -> str:
    entry = LedgerEntry(site, server_round, "trained", 1.0, 0.1, 10, 1.0, 1e-5, 0.5, 3.0, "rdp", run=run)
    return entry.to_json()


def test_resume_point_continues_after_every_round_any_ledger_holds(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    torch.save({"round": 2, "state_dict": {"w": torch.ones(2)}, "strategy_state": {}},
               tmp_path / "checkpoints" / "round-0002.pt")
    torch.save({"round": 1, "state_dict": {"w": torch.zeros(2)}}, tmp_path / "checkpoints" / "round-0001.pt")
    ledger = tmp_path / "privacy" / "ledger-cleveland.jsonl"
    ledger.parent.mkdir()
    earlier_run = _entry("cleveland", 5, run="cd" * 16)  # a resubmitted study: another run's round 5
    ledger.write_text("\n".join([earlier_run, _entry("cleveland", 1), _entry("cleveland", 2)]) + "\n")
    point = load_resume_point(tmp_path, RUN)  # stopped right after checkpointing round 2
    assert (point.checkpoint_round, point.lost, point.round_offset) == (2, {}, 2)
    assert torch.equal(point.state_dict["w"], torch.ones(2))
    with ledger.open("a") as fh:  # stopped after round 3's replies, before its checkpoint
        fh.write(_entry("cleveland", 3) + "\n")
    point = load_resume_point(tmp_path, RUN)
    assert point.checkpoint_round == 2 and list(point.lost) == [3] and point.round_offset == 3


def test_strategy_state_survives_a_checkpoint(tmp_path: Path) -> None:
    adam = FedAdam()
    adam.m_t = {"w": np.array([0.1, -0.2], dtype=np.float32)}
    adam.v_t = {"w": np.array([0.01, 0.04], dtype=np.float32)}
    momentum = FedAvgM(server_momentum=0.9)
    momentum.momentum_vector = [np.array([1.0, 2.0], dtype=np.float32)]
    for saved, fresh in ((adam, FedAdam()), (momentum, FedAvgM(server_momentum=0.9))):
        torch.save({"strategy_state": strategy_state(saved)}, tmp_path / "c.pt")
        restore_strategy_state(fresh, torch.load(tmp_path / "c.pt", weights_only=True)["strategy_state"])
        for name in ("m_t", "v_t"):
            for key, value in (getattr(saved, name, None) or {}).items():
                np.testing.assert_array_equal(getattr(fresh, name)[key], value)
    np.testing.assert_array_equal(fresh.momentum_vector[0], [1.0, 2.0])


def test_history_krum_keeps_each_sites_history_across_a_checkpoint(tmp_path: Path) -> None:
    config = StrategyConfig(name="krum", krum_history=0.5)
    saved, fresh = build_strategy(config, 4), build_strategy(config, 4)
    saved.site_history = {"hungary": np.array([0.5, -1.0]), "cleveland": np.array([2.0, 0.0])}
    saved.site_suspicion = {"hungary": np.array([3.5, 3.0]), "cleveland": np.array([6.0, 3.0])}
    torch.save({"strategy_state": strategy_state(saved)}, tmp_path / "c.pt")
    restore_strategy_state(fresh, torch.load(tmp_path / "c.pt", weights_only=True)["strategy_state"])
    assert set(fresh.site_history) == set(fresh.site_suspicion) == {"hungary", "cleveland"}
    np.testing.assert_array_equal(fresh.site_history["hungary"], [0.5, -1.0])
    np.testing.assert_array_equal(fresh.site_suspicion["cleveland"], [6.0, 3.0])


def _crash_in_round(crash_round: int):  # type: ignore[no-untyped-def]
    def progress(update: RoundProgress) -> None:
        if update.round == crash_round:
            raise RuntimeError(f"coordinator killed in round {crash_round}")

    return progress


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A 3-round FedAdam study whose coordinator dies in round 2, after the sites' replies were
    recorded but before that round's aggregate was checkpointed; then restarted with resume."""
    tmp = tmp_path_factory.mktemp("resume")
    _, study = heart_study(tmp, study={"rounds": 3}, strategy={"name": "fedadam"})
    out = tmp / "run"
    with pytest.raises(RuntimeError, match="coordinator killed"):
        simulate(study, out, progress=_crash_in_round(2))
    crashed = json.loads((out / "metrics.json").read_text())
    return out, crashed, simulate(study, out, resume=True)


def test_resumed_study_continues_round_numbers_from_its_checkpoint(
    resumed_run: tuple[Path, dict, dict],
) -> None:
    out, crashed, metrics = resumed_run
    assert [r["round"] for r in crashed["rounds"]] == [0, 1]
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3]
    assert metrics["rounds"][:2] == crashed["rounds"]  # the record before the crash is kept as it was
    lost = metrics["rounds"][2]
    assert sorted(lost["trained"]) == sorted(SITES)  # their spend happened ...
    assert any("stopped before aggregating" in f for f in lost["failures"])  # ... their updates were lost
    assert sorted(metrics["rounds"][3]["trained"]) == sorted(SITES)
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("round-*.pt"))
    assert checkpoints == ["round-0001.pt", "round-0003.pt"]
    saved = torch.load(out / "checkpoints" / "round-0001.pt", weights_only=True)
    assert {"m_t", "v_t"} <= set(saved["strategy_state"])  # FedAdam's moments travel with the model


def test_resumed_ledgers_hold_each_round_once_and_compose_like_an_uninterrupted_run(
    resumed_run: tuple[Path, dict, dict],
) -> None:
    out, _, _ = resumed_run
    for site in SITES:
        lines = read_ledger(out / "privacy" / f"ledger-{site}.jsonl")
        assert [(e.status, e.attempt) for e in lines] == [
            ("enrolled", 0), ("trained", 0), ("trained", 0), ("trained", 1), ("closed", 1)
        ]  # round 2 ran before the crash (attempt 0), round 3 after the restart (attempt 1)
        entries = round_entries(lines)
        assert [e.round for e in entries] == [1, 2, 3]
        mechanism = (entries[0].noise_multiplier, entries[0].sample_rate, entries[0].steps)
        uninterrupted = cumulative_epsilon([mechanism] * 3, entries[0].delta)  # one plan, three rounds
        assert entries[-1].epsilon == pytest.approx(uninterrupted, rel=1e-6)
        independent = dp_accounting_rdp([mechanism] * 3, entries[0].delta)
        assert entries[-1].epsilon == pytest.approx(independent, rel=1e-2)
    audit = audit_directory(out)
    assert audit.exit_code == 0, audit.findings  # signatures and hash chains unbroken across the restart
