"""The study config (TOML): task, data contract, model, training, strategy and, for simulations, sites.

One file describes a study. `effective` copies with the command line's overrides applied are
written into every run directory, so a run can be reproduced from its own `config.toml`.
"""

from __future__ import annotations

import codecs
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w

from pm_common.data.contract import DataContract, check_contract
from pm_common.data.imaging import FORMATS, ImageSpec
from pm_common.data.targets import TABULAR_TASKS, task_of_target
from pm_common.models.images import IMAGE_MODELS
from pm_common.models.tabular import AUTO_MODE, OPACUS_MODES, TABULAR_MODELS, resolve_grad_sample_mode
from pm_common.privacy.accountant import DEFAULT_ACCOUNTANT
from pm_common.redaction import one_line
from pm_common.study.schema import (
    NAME_PATTERN,
    Boolean,
    Choice,
    InputError,
    Integer,
    Items,
    Nested,
    Number,
    Rule,
    Text,
    check_table,
    key_place,
    quote_name,
    read_toml,
    show,
    table_place,
)

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")
ROBUST_STRATEGIES = ("trimmed-mean", "median", "krum")  # Byzantine-robust: see docs/robustness.md


class StudyConfigError(InputError):
    """The study config is malformed: `problems` holds one line per problem, naming `[table].key`,
    what was found and what is allowed. A ValueError, as it always was."""

    def __init__(self, problems: str | Sequence[str], source: object = None) -> None:
        super().__init__(problems, source)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "logreg"
    hidden: tuple[int, ...] = (32,)


@dataclass(frozen=True)
class TrainingConfig:
    local_epochs: int = 1
    batch_size: int = 16  # expected size of a Poisson-sampled batch
    learning_rate: float = 0.1
    momentum: float = 0.0
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "auto"  # or an Opacus mode; "auto": the model's fastest (pm_common.models)
    max_physical_batch_size: int = 0  # > 0: Opacus' BatchMemoryManager splits larger Poisson batches
    plan: str = "fixed"  # "auto": each site picks its own expected batch (pm_common/privacy/planner.py)


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx
    # FedAvgM's step along its momentum (unset: 1.0), or FedAdam / FedYogi / FedAdagrad's eta (unset: 0.1).
    # The server only rescales the sites' DP updates: post-processing, no privacy cost.
    server_learning_rate: float | None = None
    server_momentum: float = 0.9  # FedAvgM
    tau: float = 1e-3  # FedOpt adaptivity
    min_sites: int = 1  # fewest replying sites a round needs
    max_update_norm: float | None = None  # reject updates (site model - model sent) of larger L2 norm
    trim_fraction: float = 0.25  # trimmed-mean: share cut at each end per coordinate (4 sites: 1 each)
    krum_malicious: int = 1  # krum: sites assumed malicious (f)
    krum_select: int = 1  # krum: updates averaged (1: Krum; more: Multi-Krum)
    krum_history: float = 0.0  # krum: 0 scores this round's updates; in (0, 1) each site's history
    krum_outlier_ratio: float = 1.3  # history-Krum: leave out sites this much more suspect than the median
    krum_aggregate: str = "fedavg"  # history-Krum: combine the sites it keeps by "fedavg" or "median"
    krum_score: str = "nearest"  # history-Krum: distance to the "nearest" other histories or their "median"


@dataclass(frozen=True)
class PrivacySettings:
    """A site's own budget. Simulated sites take these defaults unless their entry overrides them."""

    dp: bool = True
    epsilon: float = 3.0
    delta: float = 1e-5
    max_rounds: int | None = None
    accountant: str = DEFAULT_ACCOUNTANT


@dataclass(frozen=True)
class SiteSpec:
    """A simulated site: its data file and its own privacy settings."""

    name: str
    data: Path
    privacy: PrivacySettings
    delimiter: str = ","
    encoding: str = "utf-8"
    thousands: str = ""  # how the site's export writes numbers: "265,000" (thousands ",")
    decimal: str = "."  # "3,5" (decimal ",")
    image_source: tuple[tuple[str, Any], ...] = ()  # imaging: format, manifest, windowing, on_bad_file
    test_data: Path | None = None  # the site's own test rows (a fixed split); None: split `data`


IMAGE_SOURCE_KEYS = ("format", "manifest", "window_center", "window_width", "on_bad_file", "npz_val")
IMAGE_TASK = "image-classification"
TASKS = (*TABULAR_TASKS, IMAGE_TASK)


@dataclass(frozen=True)
class HospitalDPConfig:
    """Hospital-level DP of the aggregate (DP-FedAvg); see pm_common.privacy.hospital_dp."""

    enabled: bool = False
    clip_norm: float = 1.0  # bound on each hospital's update (L2 over all parameters)
    noise_multiplier: float = 1.0  # of the aggregate's noise, relative to clip_norm
    delta: float = 1e-5


@dataclass(frozen=True)
class SecureAggregationConfig:
    """SecAgg+ (pm_common.secagg.primitives): the coordinator learns only the sum of the updates."""

    enabled: bool = False
    neighbours: int = 0  # share holders per site, itself included; 0: every site (SecAgg)
    threshold: float = 0.6  # share of holders needed to unmask (always a strict majority)
    clip_range: float = 2.0  # each coordinate of a weighted update is clipped to +-clip_range
    max_weight: float = 10000.0  # a site's weight is min(n, max_weight) / max_weight


PERSONALIZATION_METHODS = ("none", "finetune", "fedper", "ditto")


@dataclass(frozen=True)
class PersonalizationConfig:
    """[personalization]: a model of its own for each site, trained under the site's one budget.

    `finetune`: after the final round each site continues DP-SGD on the final global model for
    `epochs` local epochs at the federation's sampling rate and noise; its plan reserves those steps
    up front (pm_common/privacy/accountant.py `plan_study`).
    `fedper`: the `local_layers` (module paths of the model, pm_common/models/layers.py) stay at each
    site; only the other layers are sent and aggregated. No extra steps: the whole model trains in
    the federation's DP-SGD steps.
    `ditto`: each round each site also trains a personal model of its own (`local_epochs` epochs of
    DP-SGD at the plan's sigma and q) pulled towards the global model it received by `lambda`
    (Li et al. 2021, "Ditto"); its plan pays for twice the federation's steps.
    """

    method: str = "none"
    epochs: int = 1  # finetune: local epochs of DP-SGD after the federation
    local_layers: tuple[str, ...] = ()  # fedper: the layers that never leave the site
    ditto_lambda: float = 0.1  # ditto: strength of the personal model's pull to the global one

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass(frozen=True)
class SplitConfig:
    test_fraction: float = 1 / 3
    seed: int = 42


@dataclass(frozen=True)
class StudyConfig:
    name: str
    rounds: int
    seed: int
    task: str
    contract: DataContract | None  # tabular studies
    images: ImageSpec | None  # imaging studies
    model: ModelConfig
    training: TrainingConfig
    strategy: StrategyConfig
    privacy: PrivacySettings
    split: SplitConfig
    hospital_dp: HospitalDPConfig
    secure_aggregation: SecureAggregationConfig
    sites: tuple[SiteSpec, ...]
    min_report_count: int  # metrics over fewer records than this are not sent
    raw: Mapping[
        str, Any
    ]  # the TOML as loaded, paths resolved: written back as the effective config
    personalization: PersonalizationConfig = PersonalizationConfig()

    def site(self, name: str) -> SiteSpec:
        for spec in self.sites:
            if spec.name == name:
                return spec
        raise KeyError(f"no site named {name!r} in study {self.name!r}")


# -- what every key accepts ------------------------------------------------------------------
# The upper bounds refuse absurd magnitudes before anything starts; each says what it guards.
MAX_ROUNDS = 10_000  # federated rounds (and a site's max_rounds): a study of days, not years
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64-bit seeds
MAX_SPLIT_SEED = 2**32 - 1  # scikit-learn's random_state is a 32-bit seed
MAX_MIN_REPORT_COUNT = 1_000_000
MAX_LOCAL_EPOCHS = 100  # per round: steps = epochs * ceil(rows / batch_size)
MAX_BATCH_SIZE = 100_000  # expected Poisson batch; per-sample gradients are batch x parameters
MAX_HIDDEN_WIDTH = 1024  # MLP units per layer
MAX_HIDDEN_LAYERS = 8
MAX_LEARNING_RATE = 100.0
MAX_CLIP_NORM = 1e4  # max_grad_norm and hospital-level clip_norm
MAX_EPSILON = 100.0  # beyond it DP-SGD's noise calibration loses its meaning (and its precision)
MAX_DELTA = 0.1  # a delta this large already protects almost nothing
MAX_SITES = 1000  # [[sites]] entries, min_sites, krum sizes, secure-aggregation neighbours
MAX_NOISE_MULTIPLIER = 1e4
MAX_UPDATE_NORM = 1e9
MAX_SECAGG_WEIGHT = 1e9
MAX_SECAGG_CLIP = 1e6
MAX_PATH_LENGTH = 4096
DELIMITERS = (",", ";", "\t", "|")  # what a CSV export uses (and what the reader can sniff)
THOUSANDS_SEPARATORS = ("", ",", ".", " ", "'", "\u00a0", "\u202f")  # none, or what exports group digits with
DECIMAL_MARKS = (".", ",")
ACCOUNTANTS = ("rdp", "prv")  # Opacus accountants the audit can recompute (pm_common.audit.rules)
TOP_LEVEL = ("study", "model", "training", "strategy", "privacy", "split", "contract", "images",
             "hospital_dp", "secure_aggregation", "personalization", "simulation", "sites")
SITE_NAME = Text(max_length=64, pattern=NAME_PATTERN)
STUDY_NAME = Text(max_length=100, pattern=NAME_PATTERN)
PATH = Text(max_length=MAX_PATH_LENGTH, what="a file path")
GRAD_SAMPLE_MODES = (AUTO_MODE, *OPACUS_MODES)
KRUM_AGGREGATES = ("fedavg", "median")
KRUM_SCORES = ("nearest", "median")

STUDY_RULES: dict[str, Rule] = {
    "name": STUDY_NAME,
    "task": Choice(TASKS),
    "rounds": Integer(1, MAX_ROUNDS),
    "seed": Integer(0, MAX_SEED),
    "min_report_count": Integer(1, MAX_MIN_REPORT_COUNT),
}
MODEL_RULES: dict[str, Rule] = {
    "name": Nested("a model name"),  # one of the study task's models: checked below
    "hidden": Items(Integer(1, MAX_HIDDEN_WIDTH), 1, MAX_HIDDEN_LAYERS),
}
TRAINING_RULES: dict[str, Rule] = {
    "local_epochs": Integer(1, MAX_LOCAL_EPOCHS),
    "batch_size": Integer(1, MAX_BATCH_SIZE),
    "learning_rate": Number(0, MAX_LEARNING_RATE, low_open=True),
    "momentum": Number(0, 1, high_open=True),
    "max_grad_norm": Number(0, MAX_CLIP_NORM, low_open=True),
    "grad_sample_mode": Choice(GRAD_SAMPLE_MODES),
    "max_physical_batch_size": Integer(0, MAX_BATCH_SIZE),
    "plan": Choice(("fixed", "auto")),
}
STRATEGY_RULES: dict[str, Rule] = {
    "name": Choice(STRATEGIES + ROBUST_STRATEGIES),
    "proximal_mu": Number(0, 1000),
    "server_learning_rate": Number(0, MAX_LEARNING_RATE, low_open=True),
    "server_momentum": Number(0, 1, high_open=True),
    "tau": Number(0, 10, low_open=True),
    "min_sites": Integer(1, MAX_SITES),
    "max_update_norm": Number(0, MAX_UPDATE_NORM, low_open=True),
    "trim_fraction": Number(0, 0.5, high_open=True),
    "krum_malicious": Integer(0, MAX_SITES),
    "krum_select": Integer(1, MAX_SITES),
    "krum_history": Number(0, 1, high_open=True),
    "krum_outlier_ratio": Number(1, 1e6),
    "krum_aggregate": Choice(KRUM_AGGREGATES),
    "krum_score": Choice(KRUM_SCORES),
}
PRIVACY_RULES: dict[str, Rule] = {
    "dp": Boolean(),
    "epsilon": Number(0, MAX_EPSILON, low_open=True),
    "delta": Number(0, MAX_DELTA, low_open=True),
    "max_rounds": Integer(1, MAX_ROUNDS),
    "accountant": Choice(ACCOUNTANTS),
}
SPLIT_RULES: dict[str, Rule] = {
    "test_fraction": Number(0, 1, low_open=True, high_open=True),
    "seed": Integer(0, MAX_SPLIT_SEED),
}
HOSPITAL_DP_RULES: dict[str, Rule] = {
    "enabled": Boolean(),
    "clip_norm": Number(0, MAX_CLIP_NORM, low_open=True),
    "noise_multiplier": Number(0, MAX_NOISE_MULTIPLIER),
    "delta": Number(0, MAX_DELTA, low_open=True),
}
SECURE_AGGREGATION_RULES: dict[str, Rule] = {
    "enabled": Boolean(),
    "neighbours": Integer(0, MAX_SITES),
    "threshold": Number(0.5, 1),
    "clip_range": Number(1, MAX_SECAGG_CLIP),
    "max_weight": Number(0, MAX_SECAGG_WEIGHT, low_open=True),
}
SITE_RULES: dict[str, Rule] = {
    "name": SITE_NAME,
    "data": PATH,
    "test_data": PATH,
    "delimiter": Choice(DELIMITERS),
    "encoding": Text(max_length=40, what="a text encoding name"),
    "thousands": Choice(THOUSANDS_SEPARATORS),
    "decimal": Choice(DECIMAL_MARKS),
    **PRIVACY_RULES,
}
IMAGE_SOURCE_RULES: dict[str, Rule] = {
    "format": Choice(FORMATS),
    "manifest": PATH,
    "window_center": Number(-1e6, 1e6),
    "window_width": Number(0, 1e6, low_open=True),
    "on_bad_file": Choice(("stop", "skip")),
    "npz_val": Choice(("train", "ignore")),
}
PERSONALIZATION_RULES: dict[str, Rule] = {
    "method": Choice(PERSONALIZATION_METHODS),
    "epochs": Integer(1, MAX_LOCAL_EPOCHS),
    "local_layers": Items(Text(max_length=200, what="a layer's module path"), 1, 64, unique=True),
    "lambda": Number(0, 1000),
}
SIMULATION_RULES: dict[str, Rule] = {
    "attacks": Nested("a table { site = \"attack\" }"),
    # simulations/faults.py: the simulated coordinator is killed once this round's replies are in
    "crash_coordinator_after": Integer(1, MAX_ROUNDS),
}
DENSENET_MIN_SIDE = 32  # DenseNet121 halves its input five times


def site_place(name: Any, index: int | None = None) -> str:
    """How a refusal names a `[[sites]]` entry: by its name when it has a usable one.

    Args:
        name: the entry's `name` as found.
        index: the entry's position (0-based), used when the name is unusable.

    Returns:
        e.g. `[[sites]] 'cleveland'` or `[[sites]] #2`.
    """
    if isinstance(name, str) and NAME_PATTERN.match(name) and len(name) <= 64:
        return f"[[sites]] {quote_name(name)}"
    return f"[[sites]] #{(index or 0) + 1}"


def number_format_problem(values: Mapping[str, Any], place: str) -> str | None:
    """The refusal of a site's `thousands` and `decimal` that cannot both hold, or None.

    Args:
        values: the site's accepted settings.
        place: how the refusal names the site's table.

    Returns:
        e.g. `[[sites]] 'a'.thousands: "," is also the decimal mark; ...`, or None.
    """
    thousands, decimal = values.get("thousands", ""), values.get("decimal", ".")
    if thousands == decimal:
        return (f"{place}.thousands: {thousands!r} is also the decimal mark; a site writes either "
                "265,000.5 (thousands = \",\", decimal = \".\") or 265.000,5 "
                "(thousands = \".\", decimal = \",\")")
    return None


def text_encoding(name: str) -> bool:
    """True for a codec that decodes bytes to text (not 'hex', 'rot13', ...)."""
    try:
        info = codecs.lookup(name)
    except LookupError:
        return False
    return bool(getattr(info, "_is_text_encoding", True)) and info.name not in {"idna", "punycode"}


class _Study:
    """One pass over a study table: every problem collected, the typed settings built at the end."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.problems: list[str] = []

    def table(
        self, key: str, rules: Mapping[str, Rule], required: tuple[str, ...] = ()
    ) -> dict[str, Any] | None:
        """The checked values of top-level table `key` ({} when absent), None when it has problems."""
        before = len(self.problems)
        values = check_table(self.raw.get(key, {}), rules, f"[{key}]", self.problems, required=required)
        return values if values is not None and len(self.problems) == before else None

    def refuse(self, place: str, message: str) -> None:
        self.problems.append(f"{place}: {message}")


def _top_level(study: _Study) -> None:
    for key, value in study.raw.items():
        if key not in TOP_LEVEL:
            what = "table" if isinstance(value, Mapping) else "top-level key"
            allowed = ", ".join("[[sites]]" if k == "sites" else f"[{k}]" for k in TOP_LEVEL)
            study.refuse(table_place(key), f"unknown {what}; allowed: {allowed}")


def _inferred_task(raw: Mapping[str, Any]) -> str:
    """The task a study asks when `[study] task` is omitted: the contract target's form, or images
    when the study has an `[images]` table and no `[contract]` (with both, the contract decides and
    the stray table is refused by name)."""
    if "images" in raw and "contract" not in raw:
        return IMAGE_TASK
    contract = raw.get("contract")
    target = contract.get("target") if isinstance(contract, Mapping) else None
    return task_of_target(target) or "binary-classification"


def _task(study: _Study) -> tuple[dict[str, Any] | None, str]:
    values = study.table("study", STUDY_RULES)
    task = (values or {}).get("task") or _inferred_task(study.raw)
    if values is None and isinstance(study.raw.get("study"), Mapping):
        raw_task = study.raw["study"].get("task", task)
        task = raw_task if raw_task in TASKS else task
    return values, task


def _contract(study: _Study, task: str) -> DataContract | None:
    """The tabular data contract: inline `[contract]`, or `contract = "path.toml"` (then inlined)."""
    table: Any = study.raw.get("contract")
    if task == IMAGE_TASK:
        if table is not None:
            study.refuse("[contract]", f"applies to tabular studies only; [study].task is {task!r}")
        return None
    if table is None:
        study.refuse("[contract]", "missing: a tabular study needs a table, or the path of a contract TOML")
        return None
    if isinstance(table, str):
        try:
            loaded = read_toml(Path(table))
        except InputError as exc:
            why = one_line("; ".join(exc.problems), 200)
            study.refuse("[contract]", f"cannot read the contract file {show(table)}: {why}")
            return None
        table = loaded.get("contract", loaded)
        study.raw["contract"] = table  # inline it: the effective config stands on its own
    contract = check_contract(table, study.problems)
    explicit = isinstance(study.raw.get("study"), Mapping) and "task" in study.raw["study"]
    if contract is not None and contract.task != task and explicit:
        study.refuse("[study].task", f"{task!r} does not match [contract].target, whose form declares "
                     f"{contract.task!r}; omit [study] task to take the target's")
        return None
    return contract


def _images(study: _Study, task: str) -> ImageSpec | None:
    table = study.raw.get("images")
    if task != IMAGE_TASK:
        if table is not None:
            study.refuse("[images]", f"applies to image studies only; [study].task is {task!r}")
        return None
    try:
        return ImageSpec.from_mapping(table if table is not None else {})
    except InputError as exc:
        study.problems.extend(exc.problems)
        return None


def _model(study: _Study, task: str, images: ImageSpec | None) -> ModelConfig | None:
    values = study.table("model", MODEL_RULES)
    table = study.raw.get("model", {})
    allowed = IMAGE_MODELS if task == IMAGE_TASK else TABULAR_MODELS
    name = table.get("name", allowed[0]) if isinstance(table, Mapping) else allowed[0]
    if name not in allowed or not isinstance(name, str):
        study.refuse("[model].name", f"got {show(name)}; expected one of "
                     + ", ".join(f'"{m}"' for m in allowed) + f" (the models of task {task!r})")
        return None
    if name == "densenet121" and images is not None and min(images.size) < DENSENET_MIN_SIDE:
        study.refuse("[images].size", f"{list(images.size)} is too small for densenet121: it needs at least "
                     f"{DENSENET_MIN_SIDE} pixels per side")
    if values is None:
        return None
    return ModelConfig(name=name, hidden=values.get("hidden", ModelConfig.hidden))


def _training(study: _Study, model: ModelConfig | None) -> TrainingConfig | None:
    """[training] with "auto" resolved for the model; `raw` keeps "auto", so `--model` re-resolves it."""
    values = study.table("training", TRAINING_RULES)
    if values is None or model is None:
        return None
    training = TrainingConfig(**values)
    return replace(training, grad_sample_mode=resolve_grad_sample_mode(training.grad_sample_mode, model.name))


def server_learning_rate(strategy: StrategyConfig) -> float:
    """The server's learning rate, or the strategy's own default when the study sets none."""
    if strategy.server_learning_rate is not None:
        return strategy.server_learning_rate
    return 1.0 if strategy.name == "fedavgm" else 0.1


def _strategy(study: _Study) -> StrategyConfig | None:
    values = study.table("strategy", STRATEGY_RULES)
    if values is None:
        return None
    strategy = StrategyConfig(**values)
    if strategy.krum_history > 0 and strategy.krum_select != 1:
        study.refuse("[strategy].krum_select", "does not apply with krum_history: history-Krum leaves out at "
                     "most krum_malicious sites, those whose suspicion exceeds krum_outlier_ratio")
    for key, default in (("krum_aggregate", "fedavg"), ("krum_score", "nearest")):
        if getattr(strategy, key) != default and strategy.krum_history == 0:
            study.refuse(f"[strategy].{key}", "applies to history-Krum only (krum_history > 0)")
    return strategy


def _hospital_dp(study: _Study, strategy: StrategyConfig | None) -> HospitalDPConfig | None:
    values = study.table("hospital_dp", HOSPITAL_DP_RULES)
    if values is None:
        return None
    config = HospitalDPConfig(**values)
    if config.enabled and strategy is not None and strategy.name in ROBUST_STRATEGIES:
        study.refuse("[hospital_dp]", f"cannot combine with strategy {strategy.name!r}: its guarantee needs "
                     "the sum of every site's noise share, and a robust aggregator keeps only some of them")
    return config


def _secure_aggregation(study: _Study, strategy: StrategyConfig | None) -> SecureAggregationConfig | None:
    values = study.table("secure_aggregation", SECURE_AGGREGATION_RULES)
    if values is None:
        return None
    config = SecureAggregationConfig(**values)
    if config.neighbours == 1:
        study.refuse("[secure_aggregation].neighbours", "got 1; expected 0 (every site) or at least 2")
    if config.enabled and strategy is not None and strategy.name in ROBUST_STRATEGIES:
        study.refuse("[secure_aggregation]", f"cannot combine with strategy {strategy.name!r}: robust "
                     "aggregators inspect each update, which secure aggregation hides from the coordinator")
    return config


def _personalization(study: _Study) -> PersonalizationConfig | None:
    """[personalization]: the method and only the settings that method uses."""
    values = study.table("personalization", PERSONALIZATION_RULES)
    if values is None:
        return None
    if "lambda" in values:
        values["ditto_lambda"] = values.pop("lambda")
    config = PersonalizationConfig(**values)
    if config.method == "fedper" and not config.local_layers:
        study.refuse("[personalization].local_layers", "missing: fedper needs the layers that stay at the "
                     "sites, e.g. local_layers = [\"net.2\"] (the output layer of the default mlp)")
        return None
    if config.local_layers and config.method != "fedper":
        study.refuse("[personalization].local_layers", f"applies to method \"fedper\" only; method is "
                     f"{config.method!r}")
        return None
    if "ditto_lambda" in values and config.method != "ditto":
        study.refuse("[personalization].lambda", f"applies to method \"ditto\" only; method is "
                     f"{config.method!r}")
        return None
    if "epochs" in values and config.method != "finetune":
        study.refuse("[personalization].epochs", f"applies to method \"finetune\" only; method is "
                     f"{config.method!r}")
        return None
    return config


def _privacy(values: Mapping[str, Any], defaults: PrivacySettings) -> PrivacySettings:
    return replace(defaults, **{k: v for k, v in values.items() if k in PrivacySettings.__dataclass_fields__})


def _sites(study: _Study, privacy: PrivacySettings | None, task: str) -> tuple[SiteSpec, ...]:
    entries = study.raw.get("sites", [])
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        study.refuse("[[sites]]", f"got {show(entries)}; expected an array of tables ([[sites]] entries)")
        return ()
    if len(entries) > MAX_SITES:
        study.refuse("[[sites]]", f"{len(entries)} entries; at most {MAX_SITES}")
        return ()
    imaging = task == IMAGE_TASK
    rules = {**SITE_RULES, **(IMAGE_SOURCE_RULES if imaging else {})}
    required = ("name", "data", "format") if imaging else ("name", "data")
    sites, names = [], []
    for i, entry in enumerate(entries):
        place = site_place(entry.get("name"), i)
        before = len(study.problems)
        values = check_table(entry, rules, place, study.problems, required=required)
        if values is None:
            continue
        if "encoding" in values and not text_encoding(values["encoding"]):
            study.refuse(f"{place}.encoding", f"got {show(values['encoding'])}; expected the name of a text "
                         "encoding Python knows (e.g. \"utf-8\", \"latin-1\", \"cp1252\")")
        number_problem = number_format_problem(values, place)
        if number_problem:
            study.problems.append(number_problem)
        if ("window_center" in values) != ("window_width" in values):
            study.refuse(f"{place}.window_center", "window_center and window_width must be given together")
        if "name" in values:
            names.append(values["name"])
        if len(study.problems) > before or privacy is None:
            continue
        sites.append(
            SiteSpec(
                name=values["name"],
                data=Path(values["data"]),
                privacy=_privacy(values, privacy),
                delimiter=values.get("delimiter", ","),
                encoding=values.get("encoding", "utf-8"),
                thousands=values.get("thousands", ""),
                decimal=values.get("decimal", "."),
                image_source=tuple(sorted((k, entry[k]) for k in IMAGE_SOURCE_KEYS if k in entry)),
                test_data=Path(values["test_data"]) if "test_data" in values else None,
            )
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        study.refuse("[[sites]]", f"site names must be unique; repeated: {duplicates}")
    return tuple(sites)


def _simulation(study: _Study, sites: tuple[SiteSpec, ...]) -> None:
    """[simulation] attacks: the shape and the site names here; each attack's spec in simulations.attacks."""
    values = study.table("simulation", SIMULATION_RULES)
    if values is None or "attacks" not in values:
        return
    attacks = values["attacks"]
    if not isinstance(attacks, Mapping):
        study.refuse("[simulation].attacks", f"got {show(attacks)}; expected a table {{ site = \"attack\" }}")
        return
    declared = {site.name for site in sites}
    for site, spec in attacks.items():
        place = key_place("[simulation].attacks", site)
        if not isinstance(spec, str) or not spec.isprintable():
            study.refuse(place, f"got {show(spec)}; expected text such as \"sign-flip\" or \"scale:10\"")
        if sites and site not in declared:
            study.refuse(place, f"no simulated site named {site!r}; the [[sites]] are {sorted(declared)}")


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Make data and contract paths absolute, so the effective config works from any directory.

    Only well-formed paths are resolved; anything else is left for the checks to refuse."""

    def resolved(value: Any) -> Any:
        if isinstance(value, str) and value.isprintable() and 0 < len(value) <= MAX_PATH_LENGTH:
            return str((base_dir / value).resolve())
        return value

    if isinstance(raw.get("contract"), str):
        raw["contract"] = resolved(raw["contract"])
    sites = raw.get("sites", [])
    for site in sites if isinstance(sites, list) else []:
        for key in ("data", "manifest", "test_data"):
            if isinstance(site, dict) and key in site:
                site[key] = resolved(site[key])


def study_from_dict(data: Mapping[str, Any], base_dir: Path) -> StudyConfig:
    """Check every table of a study and build it.

    Args:
        data: the study's TOML as loaded (tables and arrays of tables).
        base_dir: the folder relative data and contract paths are resolved against.

    Returns:
        The study, its `raw` the TOML with paths resolved (written back as the effective config).

    Raises:
        StudyConfigError: listing every problem of every table, one line each, named `[table].key`.
    """
    if not isinstance(data, Mapping):
        raise StudyConfigError(f"the study must be a TOML document of tables, got {show(data)}")
    raw = copy.deepcopy(dict(data))
    _resolve_paths(raw, base_dir)
    study = _Study(raw)
    _top_level(study)
    values, task = _task(study)
    contract = _contract(study, task)
    task = contract.task if contract is not None else task  # a contract file's target names the task
    images = _images(study, task)
    model = _model(study, task, images)
    training = _training(study, model)
    strategy = _strategy(study)
    privacy_values = study.table("privacy", PRIVACY_RULES)
    privacy = None if privacy_values is None else _privacy(privacy_values, PrivacySettings())
    sites = _sites(study, privacy, task)
    if strategy is not None and sites and strategy.min_sites > len(sites):
        study.refuse("[strategy].min_sites", f"{strategy.min_sites} is more than the study's {len(sites)} "
                     "[[sites]]: no round could ever aggregate")
    split = study.table("split", SPLIT_RULES)
    hospital_dp = _hospital_dp(study, strategy)
    secure_aggregation = _secure_aggregation(study, strategy)
    personalization = _personalization(study)
    _simulation(study, sites)
    if study.problems:
        raise StudyConfigError(study.problems)
    assert values is not None and model is not None and training is not None and strategy is not None
    assert privacy is not None and split is not None and hospital_dp is not None
    assert secure_aggregation is not None and personalization is not None
    return StudyConfig(
        name=values.get("name", "study"),
        rounds=values.get("rounds", 20),
        seed=values.get("seed", 0),
        task=task,
        contract=contract,
        images=images,
        model=model,
        training=training,
        strategy=strategy,
        privacy=privacy,
        split=SplitConfig(**split),
        hospital_dp=hospital_dp,
        secure_aggregation=secure_aggregation,
        sites=sites,
        min_report_count=values.get("min_report_count", 10),
        raw=raw,
        personalization=personalization,
    )


def load_study(path: Path) -> StudyConfig:
    """Read and check a study file.

    Args:
        path: the study TOML; relative data and contract paths are resolved against its folder.

    Returns:
        The checked study.

    Raises:
        StudyConfigError: every problem of the file, one line each, prefixed with the file's path.
    """
    path = Path(path)
    try:
        data = read_toml(path)
    except InputError as exc:
        raise StudyConfigError(exc.problems, source=exc.source) from None
    try:
        return study_from_dict(data, path.parent)
    except StudyConfigError as exc:
        raise StudyConfigError(exc.problems, source=path) from None


def with_overrides(study: StudyConfig, **overrides: Any) -> StudyConfig:
    """A copy of the study with command-line overrides (None means: keep the file's value).

    Keys: rounds, seed, strategy, model, epsilon, delta, dp, secure_aggregation, personalization
    (the method), training_plan ("fixed" or "auto"). Privacy overrides
    apply to every simulated site: in a simulation the researcher plays every hospital.
    """
    raw = copy.deepcopy(dict(study.raw))
    placement = {
        "rounds": ("study", "rounds"),
        "seed": ("study", "seed"),
        "strategy": ("strategy", "name"),
        "model": ("model", "name"),
        "secure_aggregation": ("secure_aggregation", "enabled"),
        "personalization": ("personalization", "method"),
        "training_plan": ("training", "plan"),
    }
    for key, value in overrides.items():
        if value is None:
            continue
        if key in placement:
            table, field_name = placement[key]
            raw.setdefault(table, {})[field_name] = value
        elif key in {"epsilon", "delta", "dp"}:
            raw.setdefault("privacy", {})[key] = value
            for site in raw.get("sites", []):
                site.pop(key, None)
        else:
            raise StudyConfigError(f"unknown override {key!r}")
    return study_from_dict(raw, Path("."))


def study_text_for_sites(study: StudyConfig) -> str:
    """The study as sent to sites: contract, model and training; not the simulated sites' files
    nor the simulation-only [simulation] table (e.g. which site plays an attacker)."""
    return tomli_w.dumps({k: v for k, v in study.raw.items() if k not in ("sites", "simulation")})


def write_study(study: StudyConfig, path: Path) -> None:
    """Write the study as TOML (the run directory's config.toml: the effective settings of a run,
    with command-line overrides applied and an external contract inlined, so it stands on its own).

    Args:
        study: the checked study.
        path: where to write it (parents are created).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        tomli_w.dump(dict(study.raw), fh)
