"""A site's personal model, kept in the site's directory and never sent.

`finetune`: the final global model fine-tuned on the site's own rows, with DP-SGD under the site's
one budget. `fedper`: the study's local layers never leave the site; the site trains the whole
model in the federation's DP-SGD steps (no extra spend), sends only the shared layers, and keeps
its model (shared layers as last received, its own local layers) between rounds. `ditto`: each
round, after training the global model, the site trains its own personal model, pulled towards the
global model it received, with DP-SGD at the same sigma and q; both stretches are one mechanism and
go into the round's one ledger line (steps = both), and its plan paid for both.

Why it is honest: the steps run at the plan's own sigma and sampling rate, were reserved when the
plan fixed sigma (pm_common/privacy/planner.py `site_plan`), are checked against the budget before
they run, and are signed into the site's ledger as a `trained` line of phase "personal" before the
model is saved: the auditor composes them with the federation's rounds unchanged. How many steps
run is the site's plan's figure, never the coordinator's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from client.enrollment import SiteRefusal, append_signed_line
from client.state import SiteState, StateStore, site_entry
from client.training import RoundOutcome, local_training, pick_device, predict, train_round
from pm_common.models.layers import is_local, local_layer_problems, local_part, shared_part
from pm_common.privacy.accountant import PrivacyPlan, check_next_round
from pm_common.records.ledger import PERSONAL, TRAINED
from pm_common.study.config import SiteSpec, StudyConfig
from pm_common.tasks import SiteTensors, evaluate_with_baseline, task_of
from pm_common.tasks.metrics import reportable

log = logging.getLogger("pmfl.client")

FINETUNE = "finetune"
FEDPER = "fedper"
DITTO = "ditto"


def local_layers(study: StudyConfig) -> tuple[str, ...]:
    """The layers that stay at the site (fedper's), () for every other method."""
    personal = study.personalization
    return personal.local_layers if personal.method == FEDPER else ()


def site_model(study: StudyConfig, received: Mapping[str, torch.Tensor], store: StateStore, run: str
               ) -> nn.Module:
    """The model the site trains and evaluates: the arrays received; under fedper only their shared
    part, with the site's own local layers (from its saved personal model, or the initial ones
    before its first round). A coordinator cannot set a site's local layers.

    Raises:
        SiteRefusal: the local layers do not fit the model, or shared arrays are missing.
    """
    model = task_of(study).build_model(study)
    layers = local_layers(study)
    if not layers:
        model.load_state_dict(received)
        return model
    if problems := local_layer_problems(model.state_dict(), layers, study.model.name):
        raise SiteRefusal(problems[0])
    arrays = shared_part(received, layers)
    path = store.personal_model_path(run)
    if path.exists():
        arrays.update(local_part(torch.load(path, weights_only=True)["state_dict"], layers))
    loaded = model.load_state_dict(arrays, strict=False)
    missing = [k for k in loaded.missing_keys if not is_local(k, layers)]
    if missing or loaded.unexpected_keys:
        raise SiteRefusal(f"the model received does not match the study's model ({len(missing)} shared "
                          f"arrays missing, {len(loaded.unexpected_keys)} unexpected)")
    return model


def save_personal(store: StateStore, run: str, study: StudyConfig, state: Mapping[str, torch.Tensor]) -> Path:
    """Write the site's personal model of `run` into its directory (atomically); returns where."""
    path = store.personal_model_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"study": study.name, "task": task_of(study).name, "method": study.personalization.method,
                "run": run, "state_dict": {k: v.detach().cpu() for k, v in state.items()}}, tmp)
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class PersonalOutcome:
    """What the site reports of its personal model: where it lies and its test metrics, or why
    there is none."""

    path: Path | None
    evaluation: dict[str, float] | None
    reason: str = ""


def round_steps(study: StudyConfig, plan: PrivacyPlan) -> int | None:
    """The DP-SGD steps one federated round spends when personalisation adds to them (Ditto's
    personal epochs double them); None: the plan's own steps per round."""
    return plan.steps_per_round * 2 if study.personalization.method == DITTO else None


def reserved_steps(study: StudyConfig, plan: PrivacyPlan | None, state: SiteState, run: str) -> int:
    """Personal steps the site still owes `run` after the federation (finetune's): a federated round
    may not spend them.

    Args:
        study: the study (only finetune reserves steps for after the rounds).
        plan: the site's plan (None: no DP, nothing to reserve).
        state: the site's state.
        run: the run.

    Returns:
        The plan's personal steps until the site's personal line for `run` is signed, then 0.
    """
    if plan is None or not plan.personal_steps or study.personalization.method != FINETUNE:
        return 0
    return 0 if _trained_personal(state, run) else plan.personal_steps


def _trained_personal(state: SiteState, run: str) -> bool:
    return any(e.run == run and e.phase == PERSONAL for e in state.entries())


def test_evaluation(model: nn.Module, data: SiteTensors, study: StudyConfig) -> dict[str, float] | None:
    """Aggregate test metrics of `model` on the site's test rows, with the site's trivial baseline
    beside them (pm_common/tasks/base.py), or None when too few rows to be safe to send."""
    metrics = evaluate_with_baseline(task_of(study), predict(model, data.test_x), data.train_y, data.test_y)
    return metrics if reportable(metrics, study.min_report_count) else None


def kept_personal(study: StudyConfig, store: StateStore, run: str, data: SiteTensors,
                  model: nn.Module | None = None) -> PersonalOutcome:
    """At the final evaluation, the personal model the site kept through the rounds (fedper, ditto):
    nothing is trained. Fedper's is `model` (the final shared layers with the site's own local ones,
    from `site_model`), saved again; Ditto's is the one saved after its last round."""
    path = store.personal_model_path(run)
    if not path.exists():
        return PersonalOutcome(None, None, "the site trained no round of this run: it has no personal model")
    if model is not None:
        return PersonalOutcome(save_personal(store, run, study, model.state_dict()),
                               test_evaluation(model, data, study))
    kept = task_of(study).build_model(study)
    kept.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return PersonalOutcome(path, test_evaluation(kept, data, study))


def ditto_round(study: StudyConfig, store: StateStore, run: str, data: SiteTensors,
                received: Mapping[str, torch.Tensor], plan: PrivacyPlan | None,
                accountant_state: Mapping, seed: int | None) -> RoundOutcome:
    """One round of Ditto's personal training, after the global model's: the site's personal model
    (the received global model in its first round) trained with DP-SGD at the plan's sigma and q,
    pulled towards `received` by lambda (a post-processing step, pm_common: client/training.py).

    Args:
        study: the study (its [personalization] lambda, its training settings).
        store: the site's store (where its personal model lies).
        run: the run.
        data: the site's rows.
        received: the global model received this round.
        plan: the site's plan (None: no DP).
        accountant_state: the accountant after this round's global training.
        seed: tests only; None: OS entropy.

    Returns:
        The personal model's outcome: its steps and the cumulative accountant and epsilon.
    """
    task = task_of(study)
    model = task.build_model(study)
    path = store.personal_model_path(run)
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"] if path.exists() else received)
    settings = local_training(study, plan, proximal_mu=study.personalization.ditto_lambda)
    return train_round(model, data.train_x, data.train_y, task.criterion(), settings, plan=plan,
                       accountant_state=accountant_state, seed=seed, device=pick_device(), anchor=received)


def finetune(
    *,
    study: StudyConfig,
    site: SiteSpec,
    store: StateStore,
    state: SiteState,
    data: SiteTensors,
    received: Mapping[str, torch.Tensor],
    run: str,
    attempt: int,
    server_round: int,
    seed: int | None,
) -> PersonalOutcome:
    """Fine-tune the final global model `received` on the site's training rows (call with the
    site's state locked); once per run: a repeated request reuses the saved model.

    Args:
        study: the study (its [personalization] epochs; the training settings).
        site: the site, with its privacy settings.
        store: the site's state store (the ledger, the personal model's place).
        state: the site's state, loaded under the lock.
        data: the site's rows.
        received: the final global model.
        run: the run.
        attempt: the coordinator's attempt.
        server_round: the final round (the personal line is numbered one after it).
        seed: tests only (client/replay.py); None: noise from OS entropy.

    Returns:
        The personal model's place and metrics, or the reason the site trained none.
    """
    path = store.personal_model_path(run)
    task = task_of(study)
    model = task.build_model(study)
    if _trained_personal(state, run):  # a repeated request: report the saved model, never train twice
        if not path.exists():
            return PersonalOutcome(None, None, "this run's personal model was trained but is not on disk")
        model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        return PersonalOutcome(path, test_evaluation(model, data, study))
    if state.closed(run):  # nothing trains after the site closed the run
        return PersonalOutcome(None, None, f"run {run[:12]} is closed at this site")
    privacy, plan = site.privacy, state.plan
    if privacy.dp and plan is None:
        return PersonalOutcome(None, None, "no DP-SGD plan: the site declined the study")
    if reason := task.unlearnable(data.train_y):
        return PersonalOutcome(None, None, reason)
    settings = local_training(study, plan, local_epochs=study.personalization.epochs)
    if plan is not None:
        decision = check_next_round(plan, state.history, steps=plan.personal_steps)
        if not decision.allowed:
            log.warning("site %s trains no personal model: %s", site.name, decision.reason)
            return PersonalOutcome(None, None, decision.reason)
    model.load_state_dict(received)
    outcome = train_round(model, data.train_x, data.train_y, task.criterion(), settings, plan=plan,
                          accountant_state=state.accountant, seed=seed, device=pick_device())
    entry = site_entry(
        privacy, site.name, plan,
        round=server_round + 1,
        status=TRAINED,
        steps=outcome.steps,
        epsilon=outcome.epsilon,  # cumulative: the federation's rounds and these steps, composed
        reason=f"personalisation: {FINETUNE}, {settings.local_epochs} epoch(s) on the final global model",
        run=run,
        attempt=attempt,
        phase=PERSONAL,
    )
    state.accountant = outcome.accountant
    append_signed_line(state, store.signing_key(), entry)  # the spend first, then the model
    store.save(state)
    return PersonalOutcome(save_personal(store, run, study, outcome.state_dict),
                           test_evaluation(model, data, study))
