"""The hospital's ClientApp: enrol in a run, then each round evaluate the received model, check the
budget and train with DP-SGD; close the ledger at the final evaluation.

Every train reply carries the site's ledger line for the round. A site that would exceed its
budget (or its round limit, or cannot learn from its data) declines: it sends its reason and ledger
line, and no update. A site answers only runs it enrolled in (it signed their roster), never the
same round of the same attempt twice, and nothing of a run after it closed it.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from client import enrollment
from client import secagg_masking as secagg
from client.enrollment import SiteRefusal, append_signed_line
from client.errors import error_reply_mod
from client.personalization import (
    DITTO,
    FEDPER,
    FINETUNE,
    PersonalOutcome,
    ditto_round,
    finetune,
    kept_personal,
    local_layers,
    reserved_steps,
    round_steps,
    save_personal,
    site_model,
    test_evaluation,
)
from client.replay import replay_seed
from client.site import load_site_data, parse_study_text, resolve_site
from client.state import SiteState, StateStore, site_entry
from client.training import RoundOutcome, local_training, pick_device, train_round
from pm_common.models.layers import shared_part
from pm_common.privacy.accountant import (
    BudgetTooLow,
    PrivacyPlan,
    check_next_round,
    cumulative_epsilon,
)
from pm_common.privacy.hospital_dp import clip_and_noise, site_noise_std
from pm_common.privacy.planner import site_plan
from pm_common.records.ledger import CLOSED, DECLINED, TRAINED, LedgerEntry
from pm_common.records.roster import Roster, study_digest
from pm_common.secagg.primitives import Rules
from pm_common.study.config import SiteSpec, StudyConfig
from pm_common.tasks import SiteTensors, few_rows_warning, task_of
from pm_common.wire import keys as p
from pm_common.wire import packing as wire

log = logging.getLogger("pmfl.client")
app = ClientApp(mods=[error_reply_mod])  # outermost: no exception reaches Flower (client/errors.py)

@dataclass(frozen=True)
class RunRequest:
    """What the coordinator asks in one message: the study, the run and the round."""

    study: StudyConfig
    study_text: str
    run: str
    attempt: int
    server_round: int
    num_rounds: int

    @classmethod
    def of(cls, msg: Message) -> RunRequest:
        config = msg.content[p.CONFIG]
        text = str(config[p.STUDY_TOML])
        return cls(
            study=parse_study_text(text),
            study_text=text,
            run=str(config.get(p.RUN, "")),
            attempt=int(config.get(p.ATTEMPT, 0)),
            server_round=int(config.get(p.SERVER_ROUND, 0)),
            num_rounds=int(config.get(p.NUM_ROUNDS, 0)),
        )


def _received(msg: Message) -> dict[str, torch.Tensor]:
    """The global model the coordinator sent (packed: pm_common/wire/packing.py)."""
    return {k: torch.from_numpy(v) for k, v in wire.unpacked(msg.content[p.MODEL]).items()}


def _record(store: StateStore, state: SiteState, entry: LedgerEntry) -> str:
    """Sign the round's ledger line onto the site's hash chain and save the state, before anything
    else can fail: once a mechanism ran, its spend is on the site's books whatever happens next
    (a lost reply, an update the site refuses to send). Returns the signed line."""
    line = append_signed_line(state, store.signing_key(), entry)
    state.rounds.append(entry.round)
    store.save(state)
    return line


def _reply(
    msg: Message,
    site: SiteSpec,
    evaluation: Mapping[str, float] | None,
    files_skipped: int,
    warning: str,
    entry: LedgerEntry,
    line: str,
    update: Mapping[str, ConfigRecord],
    num_examples: int,
    train_loss: float,
    next_round_fits: bool | None,
    extra_metrics: Mapping[str, float] | None = None,
    noise_seeded: bool = False,
) -> Message:
    """The reply to a training message: the site's signed line and report, its evaluation of the
    model it received (riding in the metrics record: each record is one more request to and from
    the SuperLink) and, when it trained, the `update` records."""
    site_record = ConfigRecord({
        p.SITE_NAME: site.name,
        p.STATUS: entry.status,
        p.REASON: entry.reason,
        p.LEDGER_LINE: line,
    })
    if next_round_fits is not None:
        site_record[p.NEXT_ROUND_FITS] = next_round_fits
    if files_skipped:
        site_record[p.FILES_SKIPPED] = files_skipped
    if warning:
        site_record[p.WARNING] = warning
    if noise_seeded:  # tests only (client/replay.py): the run must say its noise was predictable
        site_record[p.NOISE_SEEDED] = True
    loss = train_loss if math.isfinite(train_loss) else 0.0
    train = {p.NUM_EXAMPLES: num_examples, "train-loss": loss, **(extra_metrics or {})}
    content = RecordDict({p.TRAIN_METRICS: wire.metrics_record(train, evaluation), p.SITE: site_record})
    for key, record in update.items():
        content[key] = record
    return Message(content, reply_to=msg)


def _study_problem(state: SiteState, request: RunRequest) -> str:
    """Why the study a message carries is not the one this site enrolled in ('' if it is): the
    roster it signed names the digest of the study's settings; a coordinator may not change them
    after round 1 (another contract, model or training would also spend under a plan made for
    other settings)."""
    signed = state.rosters.get(request.run)
    if signed is not None and signed["roster"]["study_digest"] != study_digest(request.study_text):
        return (f"the study settings sent for run {request.run[:12]} are not those of the roster this "
                "site signed")
    return ""


def _round_limit_reason(site: SiteSpec, state: SiteState) -> str:
    """Why this site will not train another round under its own round limit ('' if it will)."""
    trained = sum(1 for e in state.entries() if e.status == TRAINED)
    limit = site.privacy.max_rounds
    if limit is not None and trained >= limit:
        return f"round limit: the site accepts at most {limit} rounds of training for this study"
    return ""


def _plan(
    state: SiteState, site: SiteSpec, request: RunRequest, n_train: int
) -> tuple[PrivacyPlan | None, str]:
    """The site's DP plan for the study, fixed once before its first round (None without DP), or
    the reason why no plan can keep the study within the site's budget."""
    if not site.privacy.dp:
        return None, ""
    if state.plan is None:
        try:
            state.plan = site_plan(request.study, site, n_train, rounds=request.num_rounds)[1]
        except BudgetTooLow as exc:
            return None, str(exc)
    return state.plan, ""


def _unlearnable_reason(data: SiteTensors, study: StudyConfig) -> str:
    """Why training on this site's rows could teach the model nothing ('' if it could)."""
    return task_of(study).unlearnable(data.train_y)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Answer one round: evaluate the received model, then decline with the reason or train with
    DP-SGD and send the update, always with one signed ledger line.

    Args:
        msg: the coordinator's training message.
        context: this node's context (who the site is: client/site.py).

    Returns:
        The reply: the site's report and ledger line, its evaluation and, when it trained, its update.

    Raises:
        SiteRefusal: a request this site does not answer (not its run, a repeated round, other study
            settings than the roster it signed, a relay it refuses); error_reply_mod turns it into
            an error reply.
    """
    request = RunRequest.of(msg)
    study = request.study
    site, store = resolve_site(context, study.name)
    data = load_site_data(site, request.study_text)
    received = shared_part(_received(msg), local_layers(study))  # fedper: local layers never come in
    model = site_model(study, received, store, request.run)
    evaluation = test_evaluation(model, data, study)
    warning = few_rows_warning(len(data.train_y))
    if warning:
        log.warning("site %s: %s", site.name, warning)
    with store.locked():
        state = store.load() or SiteState(study=study.name)
        if refusal := state.refusal(request.run, request.server_round, request.attempt) or _study_problem(
            state, request
        ):
            raise SiteRefusal(refusal)
        return _answer_round(_Round(msg, context, request, site, store, state, data, received, model,
                                    evaluation, warning))


@dataclass
class _Round:
    """One training request as this site answers it: what it was asked and what it holds."""

    msg: Message
    context: Context
    request: RunRequest
    site: SiteSpec
    store: StateStore
    state: SiteState
    data: SiteTensors
    received: Mapping[str, torch.Tensor]
    model: nn.Module
    evaluation: Mapping[str, float] | None
    warning: str

    @property
    def study(self) -> StudyConfig:
        return self.request.study

    def seed(self, purpose: str) -> int | None:
        """The test-only replay seed of this round's `purpose` (client/replay.py); None otherwise."""
        return replay_seed(self.context, self.site.name, self.request.server_round, self.request.attempt,
                           purpose)

    def reply(self, entry: LedgerEntry, line: str, update: Mapping[str, ConfigRecord], weight: int,
              loss: float, **report: Any) -> Message:
        """The reply to the training message (see `_reply`)."""
        return _reply(self.msg, self.site, self.evaluation, len(self.data.skipped), self.warning, entry,
                      line, update, weight, loss, **report)


def _answer_round(r: _Round) -> Message:
    """Decline with the reason, or train one round and send the update: always one signed line.

    The steps, in an order that keeps the books honest: decide; check a secure-aggregation relay
    before any training (a relay the site refuses costs no budget); train; record the spend; only
    then build what leaves the site.
    """
    plan, reason = _round_decision(r)
    base = _ledger_base(r, plan)
    if reason:
        return _decline(r, base, reason)
    relay = _checked_relay(r)
    entry, line, outcome, seeded = _train_and_record(r, plan, base)
    weights, weight = _outgoing(r, plan, outcome.state_dict)
    fits = None
    if plan is not None:  # tells the coordinator whether to count on this site next round
        reserve = reserved_steps(r.study, plan, r.state, r.request.run)
        fits = check_next_round(plan, r.state.history, reserve, steps=round_steps(r.study, plan)).allowed
    if relay is None:
        trained = {k: v.detach().cpu().numpy() for k, v in weights.items()}
        return r.reply(entry, line, {p.MODEL: wire.packed_record(trained)}, weight, outcome.mean_loss,
                       next_round_fits=fits, noise_seeded=seeded)
    secagg_request, rules, identity = relay
    vector = _weighted_delta(r.received, weights, weight, r.study, rules.max_weight)
    masked, clipped, keys = secagg.mask_update(secagg_request, r.context.state, vector, identity)
    update = {p.MASKED: wire.packed_record({p.MASKED: masked})}
    if keys:  # this site's public keys for the next round
        update[p.SECAGG] = keys
    return r.reply(entry, line, update, weight, outcome.mean_loss, next_round_fits=fits,
                   extra_metrics={"secagg-clipped": clipped}, noise_seeded=seeded)


def _round_decision(r: _Round) -> tuple[PrivacyPlan | None, str]:
    """The site's DP plan, and why it declines this round ('' when it trains): no plan fits its
    budget, its own round limit, data that cannot teach, or a round that would not fit."""
    plan, plan_problem = _plan(r.state, r.site, r.request, len(r.data.train_y))
    reason = plan_problem or _round_limit_reason(r.site, r.state) or _unlearnable_reason(r.data, r.study)
    if not reason and plan is not None:
        reserve = reserved_steps(r.study, plan, r.state, r.request.run)
        decision = check_next_round(plan, r.state.history, reserve, steps=round_steps(r.study, plan))
        reason = "" if decision.allowed else decision.reason
    return plan, reason


def _ledger_base(r: _Round, plan: PrivacyPlan | None) -> LedgerEntry:
    """The round's ledger line before it is decided: the mechanism's parameters, no steps yet."""
    return site_entry(r.site.privacy, r.site.name, plan, round=r.request.server_round, status=TRAINED,
                      run=r.request.run, attempt=r.request.attempt)


def _decline(r: _Round, base: LedgerEntry, reason: str) -> Message:
    """The signed decline: the reason, the unchanged cumulative ε, and no update."""
    privacy = r.site.privacy
    epsilon = cumulative_epsilon(r.state.history, privacy.delta, privacy.accountant) if privacy.dp else None
    entry = replace(base, status=DECLINED, epsilon=epsilon, reason=reason)
    log.warning("site %s declines round %d: %s", r.site.name, r.request.server_round, reason)
    return r.reply(entry, _record(r.store, r.state, entry), {}, len(r.data.train_y), float("nan"),
                   next_round_fits=False)


def _checked_relay(
    r: _Round,
) -> tuple[ConfigRecord, Rules, secagg.SiteIdentity] | None:
    """The secure-aggregation relay of this round, checked against the study's rules before any
    training (a relay the site refuses costs no budget); None without secure aggregation.

    Raises:
        SiteRefusal: a relay for another round, or one that breaks the study's rules.
    """
    secagg_request = r.msg.content.config_records.get(p.SECAGG)
    if secagg_request is None:
        return None
    identity = _secagg_identity(r.site, r.store, r.state, r.request.run)
    if int(secagg_request["round"]) != r.request.server_round:
        raise SiteRefusal(f"secure-aggregation relay for round {secagg_request['round']} with the "
                          f"training message of round {r.request.server_round}")
    rules = secagg.relay_rules(secagg_request, r.context.state, identity)  # the study's rules
    return secagg_request, rules, identity


def _train_and_record(
    r: _Round, plan: PrivacyPlan | None, base: LedgerEntry
) -> tuple[LedgerEntry, str, RoundOutcome, bool]:
    """DP-SGD on the received model (and ditto's personal model), then the spend signed into the
    ledger before anything else can fail.

    Returns:
        The ledger entry, its signed line, the federated training's outcome, and whether the noise
        was seeded (tests only).
    """
    study = r.study
    proximal_mu = float(r.msg.content[p.CONFIG].get(p.PROXIMAL_MU, 0.0))
    settings = local_training(study, plan, proximal_mu=proximal_mu)
    seed = r.seed("dp-sgd")
    outcome = train_round(r.model, r.data.train_x, r.data.train_y, task_of(study).criterion(), settings,
                          plan=plan, accountant_state=r.state.accountant, seed=seed, device=pick_device())
    personal = None
    if study.personalization.method == DITTO:  # nothing of either model leaves the site before the line
        personal = ditto_round(study, r.store, r.request.run, r.data, r.received, plan, outcome.accountant,
                               r.seed("personal"))
    spent = personal or outcome  # its accountant and epsilon compose both stretches
    notes = [f"auto plan: expected batch {plan.batch_size}" if plan and plan.batch_size else "",
             f"ditto: {outcome.steps} federated + {personal.steps} personal steps" if personal else ""]
    entry = replace(base, steps=outcome.steps + (personal.steps if personal else 0), epsilon=spent.epsilon,
                    reason="; ".join(n for n in notes if n))
    r.state.accountant = spent.accountant
    line = _record(r.store, r.state, entry)  # the spend first: building the update may still fail
    if personal is not None:
        save_personal(r.store, r.request.run, study, personal.state_dict)
    return entry, line, outcome, seed is not None


def _outgoing(
    r: _Round, plan: PrivacyPlan | None, trained: Mapping[str, torch.Tensor]
) -> tuple[Mapping[str, torch.Tensor], int]:
    """What leaves the site, and its aggregation weight: fedper keeps its local layers (the whole
    model saved here); hospital-level DP clips and noises the update and weighs every site alike."""
    if layers := local_layers(r.study):
        save_personal(r.store, r.request.run, r.study, trained)
    weights, weight = shared_part(trained, layers), len(r.data.train_y)
    if r.study.hospital_dp.enabled:
        weights = _hospital_dp(r.msg, r.received, weights, r.study, r.seed("hospital-dp"))
        weight = 1  # uniform weights: one hospital's influence is bounded by the clip norm alone
    return weights, weight


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
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """Clip this hospital's model delta and add its share of the aggregate's Gaussian noise
    (`seed`: tests only, client/replay.py; otherwise OS entropy, never a known seed)."""
    planned = int(msg.content[p.CONFIG].get(p.PLANNED_SITES, 1))
    delta = {k: trained[k].cpu() - received[k] for k in received}
    noise = site_noise_std(study.hospital_dp, planned)
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    noisy = clip_and_noise(delta, study.hospital_dp.clip_norm, noise, generator)
    return {k: received[k] + noisy[k] for k in received}


@app.query(p.ENROLL_ACTION)
def enroll(msg: Message, context: Context) -> Message:
    """Before round 1: declare this site (name, ledger key, budget), then sign the run's roster."""
    request = RunRequest.of(msg)
    site, store = resolve_site(context, request.study.name)  # refuses a study the site did not approve
    stage = str(msg.content[p.CONFIG][p.STAGE])
    if stage == p.DECLARE:
        reply = enrollment.declare(store, site, request.run)
    elif stage == p.SIGN:
        reply = enrollment.sign(store, site, msg.content[p.CONFIG], request.study.name, request.study_text)
    else:
        raise SiteRefusal(f"unknown enrolment stage {stage[:40]!r}")
    return Message(RecordDict({p.ENROLL: reply}), reply_to=msg)


def _secagg_identity(site: SiteSpec, store: StateStore, state: SiteState, run: str) -> secagg.SiteIdentity:
    """This site in `run`: its ledger key and the run's roster it signed (refused if it did not)."""
    signed = state.rosters.get(run)
    if signed is None:
        raise SiteRefusal(f"this site is not enrolled in run {run[:12]}: no roster to know its peers by")
    return secagg.SiteIdentity(site.name, store.signing_key(), Roster.from_dict(signed["roster"]))


@app.query(p.SECAGG_ACTION)
def secure_aggregation(msg: Message, context: Context) -> Message:
    """Secure aggregation's key stages; the masked update itself goes with the training reply."""
    request = msg.content[p.SECAGG]
    study, run = str(request.get("study", "")), str(request.get("run", ""))
    site, store = resolve_site(context, study)  # refuses a study the site did not approve
    state = store.load() or SiteState(study=study)
    if state.closed(run):
        raise SiteRefusal(f"run {run[:12]} of study {study!r} is closed at this site")
    reply = secagg.handle(request, context.state, _secagg_identity(site, store, state, run))
    return Message(RecordDict({p.SECAGG: reply}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the site's own test rows (aggregates only); at the study's
    final evaluation also close the site's ledger for the run and send the whole ledger, so the
    run's copy can be completed from the site's own."""
    request = RunRequest.of(msg)
    site, store = resolve_site(context, request.study.name)
    state = store.load()
    if state is not None and (problem := _study_problem(state, request)):
        raise SiteRefusal(problem)
    data = load_site_data(site, request.study_text)
    received = shared_part(_received(msg), local_layers(request.study))
    model = site_model(request.study, received, store, request.run)
    evaluation = test_evaluation(model, data, request.study)
    site_record = ConfigRecord({p.SITE_NAME: site.name})
    content = RecordDict()
    if bool(msg.content[p.CONFIG].get(p.CLOSE, False)):
        if request.study.personalization.enabled:
            method = request.study.personalization.method
            personal = (_personalize(context, request, site, store, data, received) if method == FINETUNE
                        else kept_personal(request.study, store, request.run, data,
                                           model if method == FEDPER else None))
            if personal.path is not None:
                site_record[p.PERSONAL_MODEL] = str(personal.path)
                content[p.PERSONAL_METRICS] = wire.metrics_record({p.NUM_EXAMPLES: len(data.test_y)},
                                                                  personal.evaluation)
            if personal.reason:
                site_record[p.PERSONAL_REASON] = personal.reason
        site_record[p.LEDGER_LINES] = _close(store, site, request)
    content[p.SITE] = site_record
    content[p.TRAIN_METRICS] = wire.metrics_record({p.NUM_EXAMPLES: len(data.test_y)}, evaluation)
    return Message(content, reply_to=msg)


def _personalize(
    context: Context,
    request: RunRequest,
    site: SiteSpec,
    store: StateStore,
    data: SiteTensors,
    received: Mapping[str, torch.Tensor],
) -> PersonalOutcome:
    """At the final evaluation, before the site closes the run: its personal model
    (client/personalization.py)."""
    with store.locked():
        state = store.load() or SiteState(study=request.study.name)
        if request.run not in state.rosters:
            raise SiteRefusal(f"this site is not enrolled in run {request.run[:12]}")
        seed = replay_seed(context, site.name, request.server_round, request.attempt, "personal")
        return finetune(study=request.study, site=site, store=store, state=state, data=data,
                        received=received, run=request.run, attempt=request.attempt,
                        server_round=request.server_round, seed=seed)


def _close(store: StateStore, site: SiteSpec, request: RunRequest) -> list[str]:
    """Append the run's `closed` line once (a repeated request appends nothing); the whole ledger."""
    with store.locked():
        state = store.load() or SiteState(study=request.study.name)
        if request.run not in state.rosters:
            raise SiteRefusal(f"this site is not enrolled in run {request.run[:12]}")
        if problem := _study_problem(state, request):
            raise SiteRefusal(problem)
        if not state.closed(request.run):
            append_signed_line(state, store.signing_key(), _closed_entry(site, state, request))
            store.save(state)
        return list(state.ledger)


def _closed_entry(site: SiteSpec, state: SiteState, request: RunRequest) -> LedgerEntry:
    privacy, plan = site.privacy, state.plan
    return LedgerEntry(
        site=site.name,
        round=request.server_round,
        status=CLOSED,
        noise_multiplier=plan.noise_multiplier if plan else 0.0,
        sample_rate=plan.sample_rate if plan else 0.0,
        steps=0,
        max_grad_norm=plan.max_grad_norm if plan else 0.0,
        delta=privacy.delta,
        epsilon=cumulative_epsilon(state.history, privacy.delta, privacy.accountant) if privacy.dp else None,
        epsilon_budget=privacy.epsilon if privacy.dp else None,
        accountant=privacy.accountant if privacy.dp else "none",
        dp=privacy.dp,
        reason=f"closed run {request.run[:12]}",
        run=request.run,
        attempt=request.attempt,
    )
