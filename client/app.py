"""The hospital's ClientApp: evaluate the received model, check the budget, train with DP-SGD.

Every train reply carries the site's ledger line for the round. A site that would exceed its
budget (or its round limit) declines: it sends its reason and ledger line, and no update.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, replace

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from client import secure_aggregation as secagg
from client.errors import error_reply_mod
from client.site import load_site_data, parse_study_text, resolve_site
from client.state import SiteState, StateStore
from client.training import LocalTraining, pick_device, predict, train_round
from pm_common import protocol as p
from pm_common import wire
from pm_common.config import SiteSpec, StudyConfig
from pm_common.hospital_dp import clip_and_noise, site_noise_std
from pm_common.ledger import DECLINED, TRAINED, LedgerEntry
from pm_common.metrics import reportable
from pm_common.privacy import check_next_round, cumulative_epsilon, plan_study
from pm_common.signing import chain_head, public_key_pem, sign_entry
from pm_common.tasks import SiteTensors, task_of

log = logging.getLogger("pmfl.client")
app = ClientApp(mods=[error_reply_mod])  # outermost: no exception reaches Flower (client/errors.py)


def _study_of(msg: Message) -> tuple[StudyConfig, str]:
    text = str(msg.content[p.CONFIG][p.STUDY_TOML])
    return parse_study_text(text), text


def _received(msg: Message) -> dict[str, torch.Tensor]:
    """The global model the coordinator sent (packed: pm_common/wire.py)."""
    return {k: torch.from_numpy(v) for k, v in wire.unpacked(msg.content[p.MODEL]).items()}


def _model_from(received: Mapping[str, torch.Tensor], study: StudyConfig) -> nn.Module:
    model = task_of(study).build_model(study)
    model.load_state_dict(received)
    return model


def _evaluation(model: nn.Module, data: SiteTensors, study: StudyConfig) -> dict[str, float] | None:
    """Aggregate test metrics of the received model, or None when too few rows to be safe to send."""
    metrics = task_of(study).metrics(predict(model, data.test_x), data.test_y)
    return metrics if reportable(metrics, study.min_report_count) else None


def _record_and_reply(
    msg: Message,
    site: SiteSpec,
    store: StateStore,
    state: SiteState,
    evaluation: Mapping[str, float] | None,
    files_skipped: int,
    entry: LedgerEntry,
    update: Mapping[str, ConfigRecord],
    num_examples: int,
    train_loss: float,
    next_round_fits: bool | None,
    extra_metrics: Mapping[str, float] | None = None,
) -> Message:
    """Sign the round's ledger line onto the site's hash chain, save the state, then reply.

    `update`: the records that carry the site's update (none when it declines). Saving comes
    first: if the reply is lost, the spend is still on the site's books. The evaluation rides in
    the metrics record: each record is one more request to and from the SuperLink.
    """
    key = store.signing_key()
    signed = sign_entry(asdict(entry), chain_head([json.loads(line) for line in state.ledger]), key)
    line = json.dumps(signed, sort_keys=True, allow_nan=False)
    state.rounds.append(entry.round)
    state.ledger.append(line)
    store.save(state)
    site_record = ConfigRecord({
        p.SITE_NAME: site.name,
        p.STATUS: entry.status,
        p.REASON: entry.reason,
        p.LEDGER_LINE: line,
        p.LEDGER_PUBLIC_KEY: public_key_pem(key.public_key()).decode(),
    })
    if next_round_fits is not None:
        site_record[p.NEXT_ROUND_FITS] = next_round_fits
    if files_skipped:
        site_record[p.FILES_SKIPPED] = files_skipped
    loss = train_loss if math.isfinite(train_loss) else 0.0
    train = {p.NUM_EXAMPLES: num_examples, "train-loss": loss, **(extra_metrics or {})}
    content = RecordDict({p.TRAIN_METRICS: wire.metrics_record(train, evaluation), p.SITE: site_record})
    for key, record in update.items():
        content[key] = record
    return Message(content, reply_to=msg)


def _decline_reason(site: SiteSpec, state: SiteState) -> str:
    """Why this site will not train another round, or '' if it will (before the budget check)."""
    trained = sum(1 for line in state.ledger if LedgerEntry.from_json(line).status == TRAINED)
    limit = site.privacy.max_rounds
    if limit is not None and trained >= limit:
        return f"round limit: the site accepts at most {limit} rounds of training for this study"
    return ""


@app.train()
def train(msg: Message, context: Context) -> Message:
    study, study_text = _study_of(msg)
    site, store = resolve_site(context, study.name)
    config = msg.content[p.CONFIG]
    server_round = int(config[p.SERVER_ROUND])
    data = load_site_data(site, study_text)
    received = _received(msg)
    model = _model_from(received, study)
    evaluation = _evaluation(model, data, study)
    state = store.load() or SiteState(study=study.name)
    privacy = site.privacy
    n_train = len(data.train_y)

    if privacy.dp and state.plan is None:
        planned = int(config[p.NUM_ROUNDS])
        if privacy.max_rounds is not None:
            planned = min(planned, privacy.max_rounds)
        state.plan = plan_study(
            epsilon_budget=privacy.epsilon,
            delta=privacy.delta,
            num_examples=n_train,
            batch_size=study.training.batch_size,
            local_epochs=study.training.local_epochs,
            planned_rounds=planned,
            max_grad_norm=study.training.max_grad_norm,
            accountant=privacy.accountant,
        )
    plan = state.plan if privacy.dp else None
    reply = functools.partial(_record_and_reply, msg, site, store, state, evaluation, len(data.skipped))
    reason = _decline_reason(site, state)
    if not reason and plan is not None:
        decision = check_next_round(plan, state.history)
        reason = "" if decision.allowed else decision.reason

    base = LedgerEntry(
        site=site.name,
        round=server_round,
        status=TRAINED,
        noise_multiplier=plan.noise_multiplier if plan else 0.0,
        sample_rate=plan.sample_rate if plan else 0.0,
        steps=0,
        max_grad_norm=plan.max_grad_norm if plan else 0.0,
        delta=privacy.delta,
        epsilon=None,
        epsilon_budget=privacy.epsilon if privacy.dp else None,
        accountant=privacy.accountant if privacy.dp else "none",
        dp=privacy.dp,
    )
    if reason:
        epsilon = (
            cumulative_epsilon(state.history, privacy.delta, privacy.accountant) if plan else None
        )
        entry = replace(base, status=DECLINED, epsilon=epsilon, reason=reason)
        log.warning("site %s declines round %d: %s", site.name, server_round, reason)
        return reply(entry, {}, n_train, float("nan"), next_round_fits=False)

    strategy_mu = float(config.get(p.PROXIMAL_MU, 0.0))
    settings = LocalTraining(
        learning_rate=study.training.learning_rate,
        batch_size=study.training.batch_size,
        local_epochs=study.training.local_epochs,
        momentum=study.training.momentum,
        proximal_mu=strategy_mu,
        grad_sample_mode=study.training.grad_sample_mode,
        max_physical_batch_size=study.training.max_physical_batch_size,
    )
    outcome = train_round(
        model,
        data.train_x,
        data.train_y,
        task_of(study).criterion(),
        settings,
        plan=plan,
        accountant_state=state.accountant,
        device=pick_device(),
    )
    entry = replace(base, steps=outcome.steps, epsilon=outcome.epsilon)
    state.accountant = outcome.accountant
    fits = check_next_round(plan, state.history).allowed if plan else None
    weights, weight = outcome.state_dict, n_train
    if study.hospital_dp.enabled:
        weights = _hospital_dp(msg, received, weights, study)
        weight = 1  # uniform weights: one hospital's influence is bounded by the clip norm alone
    request = msg.content.config_records.get(p.SECAGG)
    if request is None:
        trained = {k: v.detach().cpu().numpy() for k, v in weights.items()}
        update = {p.MODEL: wire.packed_record(trained)}
        return reply(entry, update, weight, outcome.mean_loss, next_round_fits=fits)
    vector = _weighted_delta(received, weights, weight, study, float(request["max-weight"]))
    masked, clipped, keys = secagg.mask_update(request, context.state, vector)
    update = {p.MASKED: wire.packed_record({p.MASKED: masked})}
    if keys:  # this site's public keys for the next round
        update[p.SECAGG] = keys
    clipped_metric = {"secagg-clipped": clipped}
    return reply(entry, update, weight, outcome.mean_loss, next_round_fits=fits, extra_metrics=clipped_metric)


def _weighted_delta(
    received: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    weight: int,
    study: StudyConfig,
    max_weight: float,
) -> np.ndarray:
    """What secure aggregation sums: [w * (trained - received) flattened, w], w = this site's weight
    relative to `max_weight` (1 under hospital-level DP, whose weights are uniform).

    The coordinator cannot check a masked update, so the site applies the study's norm bound itself
    and refuses to send a non-finite one.
    """
    delta = torch.from_numpy(
        wire.flatten({k: (trained[k].cpu().double() - received[k].double()).numpy() for k in received})
    )
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("the trained update holds NaN or Inf values: not sent")
    bound = study.strategy.max_update_norm
    norm = float(delta.norm())
    if bound is not None and norm > bound:
        delta = delta * (bound / norm)
    ratio = 1.0 if study.hospital_dp.enabled else min(1.0, weight / max_weight)
    return np.append(delta.numpy() * ratio, ratio)


def _hospital_dp(
    msg: Message,
    received: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    study: StudyConfig,
) -> dict[str, torch.Tensor]:
    """Clip this hospital's model delta and add its share of the aggregate's Gaussian noise."""
    planned = int(msg.content[p.CONFIG].get(p.PLANNED_SITES, 1))
    delta = {k: trained[k].cpu() - received[k] for k in received}
    noise = site_noise_std(study.hospital_dp, planned)
    generator = torch.Generator().manual_seed(secrets.randbits(63))  # OS entropy, never a known seed
    noisy = clip_and_noise(delta, study.hospital_dp.clip_norm, noise, generator)
    return {k: received[k] + noisy[k] for k in received}


@app.query(p.SECAGG_ACTION)
def secure_aggregation(msg: Message, context: Context) -> Message:
    """Secure aggregation's key stages; the masked update itself goes with the training reply."""
    reply = secagg.handle(msg.content[p.SECAGG], context.state)
    return Message(RecordDict({p.SECAGG: reply}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the site's own test rows; aggregates only."""
    study, study_text = _study_of(msg)
    site, _ = resolve_site(context, study.name)
    data = load_site_data(site, study_text)
    evaluation = _evaluation(_model_from(_received(msg), study), data, study)
    content = RecordDict(
        {
            p.SITE: ConfigRecord({p.SITE_NAME: site.name}),
            p.TRAIN_METRICS: wire.metrics_record({p.NUM_EXAMPLES: len(data.test_y)}, evaluation),
        }
    )
    return Message(content, reply_to=msg)
