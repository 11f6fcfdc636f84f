"""The empirical privacy check of a simulated study: the one-run audit of Steinke, Nasr and Jagielski.

m synthetic canary patients are made valid under the study's contract; each is put into the audited
site's training rows by a secret fair coin. The real study then runs (real ServerApp, real ClientApp,
Opacus DP-SGD); the coordinator keeps the global model it sent and the audited site's update each
round. Each canary is scored from those alone, the top / bottom scores are guessed in / out, and
`pm_common.audit.one_run` turns the count of right guesses into an epsilon lower bound.

The audit's validity rests on one property, checked before anything runs: the audited site trains
on exactly its usual real training rows plus the included canaries. Sites split their own file with
a seeded stratified split (`split_train_test`), which depends on the file's labels only; the file
written here is arranged so that split puts every included canary in train, keeps the site's real
train rows as they are without canaries, and sends nothing else to train. Toggling one coin then
adds or removes exactly one training record, which is what the site's (epsilon, delta) is about.

The audit trains the study's MLP (`[model] name = "mlp"`, the study's hidden sizes) whatever the
study's model: DP-SGD's guarantee does not depend on the model, and a logistic regression has too
few weights to tell canaries apart. The run's model is therefore an audit model, not the study's.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pm_common.audit.one_run import EmpiricalAuditResult, best_audit_from_scores
from pm_common.data.contract import CategoricalFeature, DataContract, NumericFeature
from pm_common.data.tabular import (
    NumberFormat,
    TabularData,
    load_site_table,
    read_table,
    split_train_test,
    validate_and_encode,
)
from pm_common.models.tabular import build_tabular_model
from pm_common.records.ledger import ledger_path, read_ledger
from pm_common.study.config import SplitConfig, StudyConfig, study_from_dict
from server.recorder import UPDATES_DIR

CONFIDENCE = 0.95


class EmpiricalAuditError(RuntimeError):
    """The audit cannot be set up soundly (e.g. the canaries would not land in training)."""


# -- canaries -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Canaries:
    """m synthetic records: their CSV cells (raw text, as a site exports) and their encoding."""

    frame: pd.DataFrame  # columns: the site file's columns
    x: np.ndarray  # float32 (m, num_inputs)
    y: np.ndarray  # float32 0/1 (m,)
    private_columns: tuple[int, ...]  # encoded inputs no real training row of the site uses

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class _Setting:
    cell: str  # the raw CSV text
    columns: tuple[int, ...]  # encoded inputs it sets (non-zero)


def _feature_settings(contract: DataContract) -> list[list[_Setting]]:
    """Every way a canary may fill each feature, with the encoded inputs each one switches on."""
    indicators = contract.indicator_positions()
    settings: list[list[_Setting]] = []
    offset = 0
    for index, feature in enumerate(contract.features):
        options: list[_Setting] = []
        if isinstance(feature, NumericFeature):
            mid = feature.neutral  # encodes to exactly 0: switches nothing on
            if mid not in feature.missing_values:
                options.append(_Setting(format(mid, ".10g"), ()))
        elif isinstance(feature, CategoricalFeature):
            options += [_Setting(v, (offset + i,)) for i, v in enumerate(feature.values)]
        if feature.missing == "impute":
            options.append(_Setting("", (indicators[index],) if index in indicators else ()))
        settings.append(options)
        offset += feature.width
    return settings


def make_canaries(
    contract: DataContract,
    columns: Sequence[str],
    real_train_x: np.ndarray,
    m: int,
    rng: np.random.Generator,
    switches: int = 3,
) -> Canaries:
    """m distinct patients, valid under `contract`, built to move parameters no real row moves.

    An encoded input that is 0 in every real training row of the site (a missing-indicator of a
    feature the site always records, a category it never sees) gets no gradient from real data in
    the first layer's weights: only canaries write there. Each canary switches on `switches` such
    private inputs (chosen at random) and keeps the rest quiet (numerics at the middle of their
    range, which encodes to 0; categories the site does use); its label is a fair coin. That is
    what lets the coordinator tell included canaries from excluded ones, far beyond what a
    black-box attack on a 39-parameter model could.
    """
    if m < 2:
        raise ValueError("need at least two canaries")
    used = np.flatnonzero(np.any(np.asarray(real_train_x) != 0, axis=0))
    private = tuple(int(c) for c in range(contract.num_inputs) if c not in set(used.tolist()))
    settings = _feature_settings(contract)
    is_private = [[bool(o.columns) and set(o.columns) <= set(private) for o in opts] for opts in settings]
    switchable = [i for i, flags in enumerate(is_private) if any(flags)]
    if not switchable:
        raise EmpiricalAuditError(
            "every encoded input is used by the audited site's real rows: no canary can write to a "
            "private direction (audit a site with an unused category or an always-recorded feature)"
        )
    target = contract.target
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, ...]] = set()
    for _ in range(200 * m):
        if len(rows) == m:
            break
        on = set(rng.choice(switchable, size=min(switches, len(switchable)), replace=False).tolist())
        row = {c: "" for c in columns}
        for index, (feature, options) in enumerate(zip(contract.features, settings, strict=True)):
            pool = [o for o, p in zip(options, is_private[index], strict=True) if p == (index in on)]
            row[feature.name] = pool[int(rng.integers(len(pool)))].cell if pool else options[0].cell
        row[target.name] = (target.positive if rng.integers(2) else target.negative)[0]
        key = tuple(row[c] for c in columns)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    if len(rows) < m:
        raise EmpiricalAuditError(f"the contract and site admit fewer than {m} distinct canaries")
    frame = pd.DataFrame(rows, columns=list(columns), dtype=str)
    encoded = validate_and_encode(frame.copy(), contract, Path("<canaries>"))
    return Canaries(frame, encoded.x, encoded.y, private)


def draw_inclusion(m: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The secret bits: one fair coin per canary (from OS entropy unless a test passes `rng`)."""
    if rng is None:
        rng = np.random.default_rng(secrets.randbits(128))
    return rng.integers(0, 2, size=m).astype(bool)


# -- the audited site's file ----------------------------------------------------------------------
def _split_positions(y: np.ndarray, split: SplitConfig) -> np.ndarray:
    """Which positions of a table with labels `y` the site's own split sends to train (a mask).

    Calls the site's split itself on a table whose only feature is the row number, so whatever the
    split does, this is what the site will do with a file of these labels.
    """
    rows = TabularData(np.arange(len(y), dtype=np.float32)[:, None], y.astype(np.float32))
    train, _ = split_train_test(rows, test_fraction=split.test_fraction, seed=split.seed)
    mask = np.zeros(len(y), dtype=bool)
    mask[train.x[:, 0].astype(int)] = True
    return mask


def _labels_for(counts: Mapping[int, int], rng: np.random.Generator) -> np.ndarray:
    y = np.concatenate([np.full(n, c, dtype=np.float32) for c, n in sorted(counts.items())])
    return y[rng.permutation(len(y))]


def arrange_site_file(
    real: TabularData,
    canaries: Canaries,
    included: np.ndarray,
    split: SplitConfig,
    rng: np.random.Generator,
    max_padding: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Order the audited file so the site's split trains on its real train rows + included canaries.

    Returns (labels, sources): row i of the file gets label labels[i] and is real row sources[i]
    (>= 0) or canary -1 - sources[i]. The file holds, per class c, the real rows, the included
    canaries and p_c padding rows (copies of real test rows, which stay in test); p_c is searched near
    its expected value so that the split's train count of class c is exactly the real train rows
    plus included canaries.
    """
    real_train = _split_positions(real.y, split)
    included = np.asarray(included, dtype=bool)
    sources: dict[int, tuple[list[int], list[int]]] = {}  # class -> (train sources, test sources)
    for c in (0, 1):
        train_src = [int(i) for i in np.flatnonzero(real_train & (real.y == c))]
        train_src += [-1 - int(i) for i in np.flatnonzero(included & (canaries.y == c))]
        test_src = [int(i) for i in np.flatnonzero(~real_train & (real.y == c))]
        sources[c] = (train_src, test_src)
    estimate = {
        c: round(len(tr) / (1 - split.test_fraction)) - len(tr) - len(te)
        for c, (tr, te) in sources.items()
    }
    window = {c: range(max(0, e - max_padding), max(0, e + max_padding) + 1) for c, e in estimate.items()}
    candidates = sorted(
        ((p0, p1) for p0 in window[0] for p1 in window[1]),
        key=lambda p: abs(p[0] - estimate[0]) + abs(p[1] - estimate[1]),
    )
    for padding in candidates:
        counts = {c: len(sources[c][0]) + len(sources[c][1]) + padding[c] for c in (0, 1)}
        labels = _labels_for(counts, rng)
        train_mask = _split_positions(labels, split)
        if all(int((train_mask & (labels == c)).sum()) == len(sources[c][0]) for c in (0, 1)):
            break
    else:
        raise EmpiricalAuditError(
            "cannot arrange the audited site's file so that its split trains on exactly its real "
            "training rows plus the included canaries"
        )
    out = np.empty(len(labels), dtype=np.int64)
    for c in (0, 1):
        train_src, test_src = sources[c]
        pool = test_src or [int(i) for i in np.flatnonzero(real.y == c)]
        test_src = test_src + [pool[i % len(pool)] for i in range(padding[c])]
        out[np.flatnonzero(train_mask & (labels == c))] = rng.permutation(np.array(train_src, dtype=np.int64))
        out[np.flatnonzero(~train_mask & (labels == c))] = rng.permutation(np.array(test_src, dtype=np.int64))
    return labels, out


def _row_counter(x: np.ndarray, y: np.ndarray) -> Counter[bytes]:
    rows = np.concatenate([x.astype(np.float32), y.astype(np.float32)[:, None]], axis=1)
    return Counter(r.tobytes() for r in rows)


def check_training_rows(
    path: Path, contract: DataContract, split: SplitConfig, expected_x: np.ndarray, expected_y: np.ndarray
) -> None:
    """Load the written file exactly as the site will and insist it trains on exactly the expected rows."""
    table = load_site_table(path, contract)
    train, _ = split_train_test(table, test_fraction=split.test_fraction, seed=split.seed)
    if _row_counter(train.x, train.y) != _row_counter(expected_x, expected_y):
        raise EmpiricalAuditError(
            f"{path}: the site's split would not train on exactly its real training rows plus the "
            "included canaries; the audit would be unsound"
        )


# -- scoring: what the coordinator saw ------------------------------------------------------------
def _first_weight(model: nn.Module) -> str:
    for name, param in model.named_parameters():
        if param.dim() == 2:
            return name
    raise ValueError("the model has no weight matrix")


def clipped_private_gradients(
    model: nn.Module, params: Mapping[str, torch.Tensor], canaries: Canaries, max_grad_norm: float
) -> torch.Tensor:
    """Each canary's DP-SGD contribution (gradient clipped as Opacus clips it) on the private inputs'
    first-layer weights, at `params`: (m, hidden * len(private_columns))."""
    weight = _first_weight(model)
    x = torch.from_numpy(canaries.x).double()
    y = torch.from_numpy(canaries.y).double()

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logit = torch.func.functional_call(model, p, (xi[None],))
        return nn.functional.binary_cross_entropy_with_logits(logit, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(dict(params), x, y)
    norms = torch.sqrt(sum(g.reshape(len(y), -1).pow(2).sum(1) for g in grads.values()))
    clip = (max_grad_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    private = grads[weight][:, :, list(canaries.private_columns)]
    return private.reshape(len(y), -1) * clip[:, None]


def canary_scores(
    model: nn.Module,
    rounds: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
    canaries: Canaries,
    *,
    learning_rate: float,
    batch_size: int,
    max_grad_norm: float,
    ridge: float = 0.03,
) -> np.ndarray:
    """How many times each canary was trained on, estimated from the coordinator's view, summed.

    Per round: the audited site's update minus the global model it was sent, on the private
    inputs' first-layer weights, is (-lr / expected batch) times the sum of the clipped gradients of
    the canaries it sampled plus Gaussian noise; no real row writes there. A ridge least-squares
    fit of that block on every canary's clipped gradient (taken halfway between the model sent and
    the model returned: the site's local steps walk between the two) estimates each canary's
    count (about 1 per local epoch if included, 0 if not). Uses nothing but the arrays the
    coordinator holds and the public canaries; the secret bits are never read here.
    """
    weight = _first_weight(model)
    cols = list(canaries.private_columns)
    total = np.zeros(len(canaries))
    model = model.double()
    for sent, returned in rounds:
        params = {k: torch.as_tensor(np.asarray(v)).double() for k, v in sent.items()}
        params = {k: (v + torch.as_tensor(np.asarray(returned[k])).double()) / 2 for k, v in params.items()}
        a = clipped_private_gradients(model, params, canaries, max_grad_norm)
        step = np.asarray(returned[weight], dtype=np.float64) - np.asarray(sent[weight], dtype=np.float64)
        target = torch.from_numpy(-(batch_size / learning_rate) * step[:, cols].reshape(-1))
        kernel = a @ a.T
        scale = float(kernel.diagonal().mean()) or 1.0
        regularised = kernel + ridge * scale * torch.eye(len(kernel), dtype=kernel.dtype)
        counts = torch.linalg.solve(regularised, a @ target)
        total += counts.numpy()
    return total


def guess_choices(m: int) -> list[tuple[int, int]]:
    """(k_pos, k_neg) tried, fixed before scoring: from 5% of the canaries each way to all of them."""
    return sorted({(k, k) for k in (m // 20, m // 10, m // 5, m // 3, m // 2) if k >= 1})


# -- the audited run ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditedStudy:
    """A study variant with canaries at one site, and what scoring needs (the bits stay secret)."""

    study: StudyConfig
    site: str
    canaries: Canaries
    included: np.ndarray


def _read_site(study: StudyConfig, site: str) -> tuple[pd.DataFrame, TabularData]:
    if study.contract is None:
        raise EmpiricalAuditError("the empirical audit needs a tabular study (a data contract)")
    spec = study.site(site)
    frame = read_table(spec.data, delimiter=spec.delimiter, encoding=spec.encoding)
    frame.columns = [str(c).strip() for c in frame.columns]
    number_format = NumberFormat(spec.thousands, spec.decimal)
    real = validate_and_encode(frame.copy(), study.contract, spec.data, number_format)
    if real.rows_dropped:
        raise EmpiricalAuditError(
            f"{spec.data}: the contract drops rows with missing values; the audit needs every row kept"
        )
    return frame, real


def pick_site(study: StudyConfig) -> str:
    """The site with the most encoded inputs its real training rows never use: the most room for
    canaries that only they can move."""

    def unused(name: str) -> int:
        _, real = _read_site(study, name)
        train_rows = _split_positions(real.y, study.split)
        return int(np.sum(~np.any(real.x[train_rows] != 0, axis=0)))

    return max((s.name for s in study.sites), key=unused)


def with_canaries(
    study: StudyConfig,
    site: str,
    m: int,
    work_dir: Path,
    *,
    rng: np.random.Generator,
    secret_rng: np.random.Generator | None = None,
    model: str = "mlp",
    switches: int = 3,
) -> AuditedStudy:
    """The study with `site` reading a copy of its file plus the canaries the coins included.

    The copy is written to `work_dir` and checked by loading it exactly as the site will.
    """
    frame, real = _read_site(study, site)
    real_train = _split_positions(real.y, study.split)
    canaries = make_canaries(study.contract, list(frame.columns), real.x[real_train], m, rng, switches)
    included = draw_inclusion(m, secret_rng)
    _, sources = arrange_site_file(real, canaries, included, study.split, rng)
    pooled = pd.concat([frame, canaries.frame], ignore_index=True)
    rows = pooled.iloc[np.where(sources >= 0, sources, len(frame) - 1 - sources)]
    path = Path(work_dir) / f"{site}-with-canaries.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(path, index=False, encoding="utf-8")
    check_training_rows(
        path,
        study.contract,
        study.split,
        np.concatenate([real.x[real_train], canaries.x[included]]),
        np.concatenate([real.y[real_train], canaries.y[included]]),
    )
    raw = copy.deepcopy(dict(study.raw))
    for entry in raw.get("sites", []):
        if entry["name"] == site:
            entry.update(data=str(path), delimiter=",", encoding="utf-8")
    raw.setdefault("model", {})["name"] = model
    return AuditedStudy(study_from_dict(raw, Path(".")), site, canaries, included)


def control_of(audited: AuditedStudy) -> AuditedStudy:
    """The positive control: the audited site alone trains without DP (`dp = false`: no clipping,
    no noise, what a site allowed `--no-dp` runs); its claimed epsilon is infinite.

    Not "same clipping, noise multiplier ~0": the budget that calibrates such a multiplier (epsilon
    1e6 gives 0.007) makes `pmfl audit`'s PLD recomputation of that run run out of memory, and on
    this study both controls gave bounds in the same range (1.5 to 2.4 at 200 canaries).
    """
    raw = copy.deepcopy(dict(audited.study.raw))
    for entry in raw.get("sites", []):
        if entry["name"] == audited.site:
            entry["dp"] = False
    return AuditedStudy(study_from_dict(raw, Path(".")), audited.site, audited.canaries, audited.included)


def recorded_rounds(run_dir: Path) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(global model sent, audited site's update) for every round the site's update was accepted."""
    folder = Path(run_dir) / "privacy" / UPDATES_DIR
    pairs = []
    for update in sorted(folder.glob("update-*.npz")):
        sent = folder / update.name.replace("update-", "global-")
        with np.load(sent) as g, np.load(update) as u:
            pairs.append(({k: g[k] for k in g.files}, {k: u[k] for k in u.files}))
    return pairs


def run_audited(
    audited: AuditedStudy, run_dir: Path, *, overwrite: bool = False, **simulate_args: Any
) -> tuple[dict[str, Any], list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]]:
    """Run the real simulation with the coordinator keeping the audited site's updates."""
    from simulations.runner import simulate

    folder = Path(run_dir) / "privacy" / UPDATES_DIR
    if overwrite and folder.is_dir():
        for stale in folder.glob("*.npz"):
            stale.unlink()
    metrics = simulate(audited.study, run_dir, overwrite=overwrite, record_updates_of=audited.site,
                       **simulate_args)
    np.savez(
        folder / "canaries.npz",
        x=audited.canaries.x,
        y=audited.canaries.y,
        included=audited.included,
        private_columns=np.asarray(audited.canaries.private_columns),
    )
    return metrics, recorded_rounds(run_dir)


def score(
    audited: AuditedStudy,
    rounds: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
    confidence: float = CONFIDENCE,
) -> EmpiricalAuditResult:
    """Scores from the coordinator's view first; only then are the secret bits used, to count."""
    study = audited.study
    if not rounds:
        raise EmpiricalAuditError(f"the coordinator holds no update of {audited.site}: nothing to score")
    model = build_tabular_model(study.model.name, study.contract.num_inputs, study.model.hidden)
    scores = canary_scores(
        model,
        rounds,
        audited.canaries,
        learning_rate=study.training.learning_rate,
        batch_size=study.training.batch_size,
        max_grad_norm=study.training.max_grad_norm,
    )
    m = len(audited.canaries)
    delta = study.site(audited.site).privacy.delta
    return best_audit_from_scores(scores, audited.included, guess_choices(m), delta, confidence)


def _reported(run_dir: Path, site: str) -> tuple[float | None, float | None]:
    """The site's own cumulative epsilon and noise multiplier, from its ledger at the coordinator."""
    entries = read_ledger(ledger_path(Path(run_dir) / "privacy", site))
    return (entries[-1].epsilon, entries[-1].noise_multiplier) if entries else (None, None)


def simulate_with_empirical_audit(
    study: StudyConfig,
    out_dir: Path,
    *,
    canaries: int = 200,
    site: str | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    on_run: Callable[[str], None] | None = None,
    **simulate_args: Any,
) -> dict[str, Any]:
    """The honest DP run (in `out_dir`) and the positive control (in `out_dir`/empirical-control),
    each with its own canaries and secret coins; writes `out_dir`/privacy/empirical_audit.json.

    The copies of the site's file (real rows + canaries) live in a temporary directory only for
    the runs. `seed` fixes canaries and coins (tests only: a known seed means known bits).
    """
    import tempfile

    out_dir = Path(out_dir)
    site = site or pick_site(study)
    seeds = np.random.SeedSequence(seed if seed is not None else secrets.randbits(128)).spawn(4)
    items = []
    with tempfile.TemporaryDirectory(prefix="pmfl-canaries-") as work:
        honest = with_canaries(
            study, site, canaries, Path(work) / "honest",
            rng=np.random.default_rng(seeds[0]), secret_rng=np.random.default_rng(seeds[1]),
        )
        fresh = with_canaries(
            study, site, canaries, Path(work) / "control",
            rng=np.random.default_rng(seeds[2]), secret_rng=np.random.default_rng(seeds[3]),
        )
        control = control_of(fresh)
        for label, audited, run_dir in (
            ("honest", honest, out_dir),
            ("control", control, out_dir / "empirical-control"),
        ):
            if on_run is not None:
                on_run(label)
            _, rounds = run_audited(audited, run_dir, overwrite=overwrite, **simulate_args)
            result = score(audited, rounds)
            epsilon, sigma = _reported(run_dir, site)
            item: dict[str, Any] = {
                **result.to_dict(),
                "site": site,
                "model": audited.study.model.name,
                "rounds": len(rounds),
                "noise_multiplier": sigma,
                "epsilon_reported": epsilon,  # the site's own ledger figure
                "run": os.path.relpath(run_dir, out_dir),
            }
            if label == "control":
                item.update(control=True, epsilon_claimed=None, dp=False)  # no DP: infinite epsilon
            items.append(item)
    data = {
        "audits": items,
        "design": (
            f"{canaries} canaries at {site}, each in its training rows by a secret fair coin; each "
            "switches on inputs no real training row of the site uses, so only canaries move those "
            "first-layer weights. Score: ridge least-squares estimate of how often each canary was "
            "trained on, from the update the coordinator received minus the model it sent, summed "
            "over rounds. Positive control: the same audit with that site alone trained without DP "
            "(no clipping, no noise; claimed epsilon infinite)."
        ),
    }
    path = out_dir / "privacy" / "empirical_audit.json"
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return data


def summary_lines(data: Mapping[str, Any]) -> list[str]:
    """One plain line per audit in `empirical_audit.json`, for the command line."""
    lines = []
    for item in data.get("audits", []):
        bound = "inf" if item.get("unbounded") else f"{item['epsilon_lower_bound']:.2f}"
        reported = item.get("epsilon_reported")
        claimed = "inf (no DP)" if item.get("control") else "-" if reported is None else f"{reported:.2f}"
        lines.append(
            f"{'positive control' if item.get('control') else 'DP run'} at {item['site']}: "
            f"{item['correct']} of {item['guesses']} guesses right on {item['canaries']} canaries, "
            f"{item['rounds']} rounds: epsilon >= {bound} at {item['confidence']:.0%} (claimed {claimed})"
        )
    return lines
