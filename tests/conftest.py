"""Shared fixtures: small studies over the built-in heart-disease data, and Flower messages."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# Simulated sites seed their DP noise from this (client/replay.py), so a test that checks a threshold
# replays exactly; `PMFL_REPLAY_SEED=7 make test` replays another draw. Deployed sites ignore it.
os.environ.setdefault("PMFL_REPLAY_SEED", "20261202")

import itertools
import json
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pm_common.models.tabular import build_tabular_model
from pm_common.records.roster import Roster, RosterEntry, study_digest
from pm_common.study.config import StudyConfig, load_study, study_from_dict, study_text_for_sites, write_study
from pm_common.wire import keys as p
from pm_common.wire import packing as wire
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


def train_message(
    study: StudyConfig,
    server_round: int,
    arrays: ArrayRecord | None = None,
    run: str = "",
    attempt: int = 0,
    message_type: str = MessageType.TRAIN,
    **config: Any,
) -> Message:
    """A coordinator's training (or, with `message_type`, evaluation) message for `run`."""
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
                    p.RUN: run,
                    p.ATTEMPT: attempt,
                    **config,
                }
            ),
        }
    )
    return Message(content, dst_node_id=1, message_type=message_type)


def enroll_message(study: StudyConfig, run: str, stage: str, roster: Roster | None = None) -> Message:
    config: dict[str, Any] = {
        p.STAGE: stage,
        p.RUN: run,
        p.ATTEMPT: 0,
        p.STUDY_TOML: study_text_for_sites(study),
        p.NUM_ROUNDS: study.rounds,
    }
    if roster is not None:
        config[p.ROSTER] = json.dumps(roster.to_dict())
    return Message(RecordDict({p.CONFIG: ConfigRecord(config)}), dst_node_id=1, message_type=p.ENROLL_MESSAGE)


def enroll(study: StudyConfig, contexts: Sequence[Context], run: str | None = None) -> Roster:
    """Play the coordinator's enrolment with these sites: each declares itself, then signs the roster."""
    from client.app import app as client_app

    run = run or secrets.token_hex(16)
    entries = []
    for context in contexts:
        reply = client_app(enroll_message(study, run, p.DECLARE), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        entries.append(RosterEntry.from_dict(json.loads(str(reply.content[p.ENROLL][p.ROSTER_ENTRY]))))
    roster = Roster(
        study=study.name,
        run=run,
        rounds=study.rounds,
        study_digest=study_digest(study_text_for_sites(study)),
        created="2026-12-02T00:00:00+00:00",
        sites=tuple(sorted(entries, key=lambda e: e.site)),
    )
    for context in contexts:
        reply = client_app(enroll_message(study, run, p.SIGN, roster), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return roster


def site_context(study_path: Path, partition: int = 0, site_dir: Path | None = None) -> Context:
    """A node's context: a deployed site (`site_dir`) or simulated site `partition` of the study.

    Each call is a new node: a simulated one keeps its records in a fresh directory beside the study
    (reuse the returned context for the same node across rounds).
    """
    node_config: dict[str, Any] = {"partition-id": partition, "num-partitions": 4}
    if site_dir is not None:
        node_config = {"site-dir": str(site_dir)}
    sites_dir = study_path.parent / f"simulated-sites-{next(_NODES)}"
    return Context(
        run_id=1,
        node_id=partition + 1,
        node_config=node_config,
        state=RecordDict(),
        run_config={"study": str(study_path), "sites-dir": str(sites_dir)},
    )


_NODES = itertools.count()


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
