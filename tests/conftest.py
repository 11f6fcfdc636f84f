"""Shared fixtures: small studies over the built-in heart-disease data, and Flower messages."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pm_common import protocol as p
from pm_common import wire
from pm_common.config import StudyConfig, load_study, study_from_dict, study_text_for_sites, write_study
from pm_common.models import build_tabular_model
from simulations.scenarios import scenario_path

HEART = scenario_path("heart-disease")

# Flower's runtime sets the task identity before an app builds messages; unit tests do it here.
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def heart_study(
    tmp_path: Path, sites: list[dict[str, Any]] | None = None, **sections: Any
) -> tuple[Path, StudyConfig]:
    """The built-in study with `sections` merged in (e.g. study={"rounds": 3}); written to tmp_path."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in load_study(HEART).raw.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    if sites is not None:
        raw["sites"] = sites
    study = study_from_dict(raw, tmp_path)
    path = tmp_path / "study.toml"
    write_study(study, path)
    return path, study


def train_message(study: StudyConfig, server_round: int, arrays: ArrayRecord | None = None) -> Message:
    if arrays is None:
        model = build_tabular_model(study.model.name, study.contract.num_inputs, study.model.hidden)
        arrays = ArrayRecord(model.state_dict())
    content = RecordDict(
        {
            p.MODEL: wire.packed_record({k: a.numpy() for k, a in arrays.items()}),
            p.CONFIG: ConfigRecord(
                {
                    p.SERVER_ROUND: server_round,
                    p.NUM_ROUNDS: study.rounds,
                    p.STUDY_TOML: study_text_for_sites(study),
                }
            ),
        }
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def site_context(study_path: Path, partition: int = 0, site_dir: Path | None = None) -> Context:
    node_config: dict[str, Any] = {"partition-id": partition, "num-partitions": 4}
    if site_dir is not None:
        node_config = {"site-dir": str(site_dir)}
    return Context(
        run_id=1,
        node_id=partition + 1,
        node_config=node_config,
        state=RecordDict(),
        run_config={"study": str(study_path)},
    )


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a busy shared CPU, OpenMP threads spin-waiting for each other
    make small models 10-40x slower; one thread keeps these tests fast and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def heart_sites() -> list[dict[str, Any]]:
    return [dict(s) for s in load_study(HEART).raw["sites"]]
