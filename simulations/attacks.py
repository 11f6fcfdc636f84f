"""Poisoned sites for robustness experiments: simulation only, never in the hospital's ClientApp.

A study names its attackers in a simulation-only table (never sent to sites):

    [simulation]
    attacks = { cleveland = "sign-flip" }   # or "sign-flip:K", "scale:K"

`attack_mod` is a Flower ClientApp mod the runner wraps around the real ClientApp: the site trains
honestly (and spends its budget honestly), then the mod rewrites the update in the reply of the
sites named. With the global model g sent and the honest model w, the update is d = w - g:

- "sign-flip[:K]" sends g - K d (K = 1 by default): gradient ascent on the site's loss;
- "scale:K" sends g + K d: a boosted update that dominates a plain average;
- "nan" sends a model of NaNs (a broken client): the coordinator's validation rejects it, so the
  run shows what the study reaches without that site's updates (and with its evaluations);
- "drop-out:R" is not an attack but a failure: the site vanishes in round R when its training
  message arrives (after any secure-aggregation key sharing), and answers again from round R + 1.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from pm_common.study.config import MAX_ROUNDS, StudyConfig, StudyConfigError, study_from_dict
from pm_common.study.schema import key_place, show
from pm_common.wire import keys as p
from pm_common.wire import packing as wire

KINDS = ("sign-flip", "scale", "nan", "drop-out")


@dataclass(frozen=True)
class Attack:
    kind: str
    factor: float = 1.0

    def __str__(self) -> str:
        return f"{self.kind}:{self.factor:g}"


DROP_OUT_REASON = "simulated drop-out: the site went silent mid-round"
MAX_FACTOR = 1e6  # K of "sign-flip:K" and "scale:K": larger only overflows the model to inf


def parse_attack(spec: str, place: str = "[simulation].attacks") -> Attack:
    """"sign-flip", "sign-flip:K", "scale:K" (0 < K <= 1e6), "nan" or "drop-out:R" (R: a round).

    Raises:
        StudyConfigError: one line naming `place`, what was found and what is allowed.
    """
    allowed = "'sign-flip', 'sign-flip:K', 'scale:K' (0 < K <= 1e6), 'nan' or 'drop-out:R' (R: a round)"
    if not isinstance(spec, str):
        raise StudyConfigError(f"{place}: got {show(spec)}; expected {allowed}")
    kind, _, factor = spec.partition(":")
    if kind not in KINDS or (kind in ("scale", "drop-out") and not factor) or (kind == "nan" and factor):
        raise StudyConfigError(f"{place}: got {show(spec)}; expected {allowed}")
    if kind == "drop-out":
        if not factor.isdigit() or not 1 <= int(factor) <= MAX_ROUNDS:
            raise StudyConfigError(f"{place}: {spec!r}: R must be a round from 1 to {MAX_ROUNDS}")
        return Attack(kind, float(int(factor)))
    try:
        value = float(factor) if factor else 1.0
    except ValueError as exc:
        raise StudyConfigError(f"{place}: {spec!r}: K must be a number") from exc
    if not 0 < value <= MAX_FACTOR:  # also refuses nan and inf
        raise StudyConfigError(f"{place}: {spec!r}: K must be positive and at most {MAX_FACTOR:g}")
    return Attack(kind, value)


def study_attacks(study: StudyConfig) -> dict[str, Attack]:
    """The study's attackers by site name; every name must be one of its simulated sites.

    Raises:
        StudyConfigError: every problem of `[simulation] attacks`, one line each.
    """
    table = study.raw.get("simulation", {})
    attacks = table.get("attacks", {}) if isinstance(table, Mapping) else {}
    if not isinstance(attacks, Mapping):
        raise StudyConfigError("[simulation].attacks must be a table: { site = \"sign-flip\" }")
    names = {site.name for site in study.sites}
    problems, parsed = [], {}
    for site, spec in attacks.items():
        place = key_place("[simulation].attacks", site)
        if site not in names:
            problems.append(f"{place}: no simulated site named {site!r}; the [[sites]] are {sorted(names)}")
            continue
        try:
            parsed[site] = parse_attack(spec, place)
        except StudyConfigError as exc:
            problems.extend(exc.problems)
        else:
            if parsed[site].kind == "drop-out" and parsed[site].factor > study.rounds:
                problems.append(f"{place}: {spec!r}: the study has only {study.rounds} rounds")
    if problems:
        raise StudyConfigError(problems)
    return parsed


def with_attacks(study: StudyConfig, attacks: Mapping[str, str]) -> StudyConfig:
    """A copy of `study` whose [simulation] attacks are `attacks` (empty: a clean run)."""
    raw: dict[str, Any] = copy.deepcopy(dict(study.raw))
    raw.setdefault("simulation", {})["attacks"] = dict(attacks)
    return study_from_dict(raw, Path("."))


def poison(
    update: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], attack: Attack
) -> dict[str, np.ndarray]:
    """The malicious model a site sends instead of its honest `update` to the global model `sent`."""
    if attack.kind == "nan":
        return {name: np.full_like(w, np.nan) for name, w in update.items()}
    sign = -1.0 if attack.kind == "sign-flip" else 1.0
    return {
        name: (sent[name] + sign * attack.factor * (w - sent[name])).astype(w.dtype)
        for name, w in update.items()
    }


def attack_mod(attacks: Mapping[str, Attack], site_names: Sequence[str] = ()) -> Mod:
    """A ClientApp mod that poisons the train replies of the sites in `attacks` (or drops them);
    `site_names`: the simulated sites in partition order."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not attacks:
            return call_next(msg, context)
        partition = int(context.node_config.get("partition-id", -1))
        planned = attacks.get(site_names[partition]) if 0 <= partition < len(site_names) else None
        if planned is not None and planned.kind == "drop-out":
            if int(msg.content[p.CONFIG][p.SERVER_ROUND]) == int(planned.factor):
                # an error reply, as Flower sends for a ClientApp that fails, with pmfl's own reason
                error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, DROP_OUT_REASON)
                return Message(error, reply_to=msg)
            return call_next(msg, context)
        sent = wire.unpacked(msg.content[p.MODEL])
        reply = call_next(msg, context)
        if reply.has_error() or p.MODEL not in reply.content.config_records:
            return reply
        attack = attacks.get(str(reply.content[p.SITE][p.SITE_NAME]))
        if attack is not None:
            honest = wire.unpacked(reply.content[p.MODEL])
            reply.content[p.MODEL] = wire.packed_record(poison(honest, sent, attack))
        return reply

    return mod
