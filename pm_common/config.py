"""The study config (TOML): task, data contract, model, training, strategy and, for simulations, sites.

One file describes a study. `effective` copies with the command line's overrides applied are
written into every run directory, so a run can be reproduced from its own `config.toml`.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from pm_common.contract import DataContract, contract_from_dict
from pm_common.models import resolve_grad_sample_mode

if TYPE_CHECKING:
    from pm_common.imaging import ImageSpec
from pm_common.privacy import DEFAULT_ACCOUNTANT

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")
ROBUST_STRATEGIES = ("trimmed-mean", "median", "krum")  # Byzantine-robust: see docs/robustness.md


class StudyConfigError(ValueError):
    """The study config is malformed; says which key and why."""


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
    image_source: tuple[tuple[str, Any], ...] = ()  # imaging: format, manifest, windowing, on_bad_file


IMAGE_SOURCE_KEYS = ("format", "manifest", "window_center", "window_width", "on_bad_file", "npz_val")
TASKS = ("binary-classification", "image-classification")


@dataclass(frozen=True)
class HospitalDPConfig:
    """Hospital-level DP of the aggregate (DP-FedAvg); see pm_common.hospital_dp."""

    enabled: bool = False
    clip_norm: float = 1.0  # bound on each hospital's update (L2 over all parameters)
    noise_multiplier: float = 1.0  # of the aggregate's noise, relative to clip_norm
    delta: float = 1e-5


@dataclass(frozen=True)
class SecureAggregationConfig:
    """SecAgg+ (pm_common.secure_aggregation): the coordinator learns only the sum of the updates."""

    enabled: bool = False
    neighbours: int = 0  # share holders per site, itself included; 0: every site (SecAgg)
    threshold: float = 0.6  # share of holders needed to unmask (always a strict majority)
    clip_range: float = 2.0  # each coordinate of a weighted update is clipped to +-clip_range
    max_weight: float = 10000.0  # a site's weight is min(n, max_weight) / max_weight


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

    def site(self, name: str) -> SiteSpec:
        for spec in self.sites:
            if spec.name == name:
                return spec
        raise KeyError(f"no site named {name!r} in study {self.name!r}")


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise StudyConfigError(f"[{key}] must be a table")
    return value


def _build(cls: type, table: Mapping[str, Any], where: str) -> Any:
    known = cls.__dataclass_fields__
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise StudyConfigError(f"[{where}]: unknown keys {unknown}; allowed: {sorted(known)}")
    values = dict(table)
    if "hidden" in values:
        values["hidden"] = tuple(int(h) for h in values["hidden"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise StudyConfigError(f"[{where}]: {exc}") from exc


def _privacy(table: Mapping[str, Any], defaults: PrivacySettings, where: str) -> PrivacySettings:
    merged = {
        **defaults.__dict__,
        **{k: v for k, v in table.items() if k in PrivacySettings.__dataclass_fields__},
    }
    settings = _build(PrivacySettings, merged, where)
    if settings.dp and (settings.epsilon <= 0 or not 0 < settings.delta < 1):
        raise StudyConfigError(f"[{where}]: need epsilon > 0 and 0 < delta < 1")
    return settings


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Make data and contract paths absolute, so the effective config works from any directory."""
    if isinstance(raw.get("contract"), str):
        raw["contract"] = str((base_dir / raw["contract"]).resolve())
    for site in raw.get("sites", []):
        for key in ("data", "manifest"):
            if isinstance(site, dict) and key in site:
                site[key] = str((base_dir / site[key]).resolve())


def _contract(raw: dict[str, Any]) -> DataContract:
    """The tabular data contract: inline `[contract]`, or `contract = "path.toml"` (then inlined)."""
    contract_table: Any = raw.get("contract")
    if isinstance(contract_table, str):
        try:
            with open(contract_table, "rb") as fh:
                loaded = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise StudyConfigError(f"contract file {contract_table}: {exc}") from exc
        contract_table = loaded.get("contract", loaded)
        raw["contract"] = contract_table  # inline it: the effective config stands on its own
    if not isinstance(contract_table, Mapping):
        raise StudyConfigError("[contract] is required: a table, or the path of a contract TOML")
    return contract_from_dict(contract_table)


def _image_spec(table: Mapping[str, Any]) -> ImageSpec:
    from pm_common.imaging import ImageSpec

    try:
        return ImageSpec.from_mapping(table)
    except (KeyError, ValueError, TypeError) as exc:
        raise StudyConfigError(f"[images]: needs size = [H, W], channels and classes ({exc})") from exc


def _training(table: Mapping[str, Any], model: ModelConfig) -> TrainingConfig:
    """[training] with "auto" resolved for the model; `raw` keeps "auto", so `--model` re-resolves it."""
    training = _build(TrainingConfig, table, "training")
    try:
        mode = resolve_grad_sample_mode(training.grad_sample_mode, model.name)
    except ValueError as exc:
        raise StudyConfigError(f"[training] {exc}") from exc
    return replace(training, grad_sample_mode=mode)


def server_learning_rate(strategy: StrategyConfig) -> float:
    """The server's learning rate, or the strategy's own default when the study sets none."""
    if strategy.server_learning_rate is not None:
        return strategy.server_learning_rate
    return 1.0 if strategy.name == "fedavgm" else 0.1


KRUM_AGGREGATES = ("fedavg", "median")
KRUM_SCORES = ("nearest", "median")


def _check_robustness(strategy: StrategyConfig) -> None:
    if strategy.server_learning_rate is not None and not strategy.server_learning_rate > 0:
        raise StudyConfigError("[strategy] server_learning_rate must be positive")
    if strategy.max_update_norm is not None and not strategy.max_update_norm > 0:
        raise StudyConfigError("[strategy] max_update_norm must be positive")
    if not 0 <= strategy.trim_fraction < 0.5:
        raise StudyConfigError("[strategy] trim_fraction must be in [0, 0.5)")
    if strategy.krum_malicious < 0 or strategy.krum_select < 1:
        raise StudyConfigError("[strategy] need krum_malicious >= 0 and krum_select >= 1")
    if not 0 <= strategy.krum_history < 1:
        raise StudyConfigError("[strategy] krum_history must be in [0, 1) (0: no history)")
    if strategy.krum_history > 0 and strategy.krum_select != 1:
        raise StudyConfigError(
            "[strategy] krum_select does not apply with krum_history: history-Krum leaves out at most "
            "krum_malicious sites, those whose suspicion exceeds krum_outlier_ratio"
        )
    if not strategy.krum_outlier_ratio >= 1:
        raise StudyConfigError("[strategy] krum_outlier_ratio must be at least 1")
    if strategy.krum_aggregate not in KRUM_AGGREGATES:
        raise StudyConfigError(f"[strategy] krum_aggregate must be one of {KRUM_AGGREGATES}")
    if strategy.krum_score not in KRUM_SCORES:
        raise StudyConfigError(f"[strategy] krum_score must be one of {KRUM_SCORES}")
    for key, default in (("krum_aggregate", "fedavg"), ("krum_score", "nearest")):
        if getattr(strategy, key) != default and strategy.krum_history == 0:
            raise StudyConfigError(f"[strategy] {key} applies to history-Krum only (krum_history > 0)")


def _hospital_dp(table: Mapping[str, Any], strategy: StrategyConfig) -> HospitalDPConfig:
    config = _build(HospitalDPConfig, table, "hospital_dp")
    if config.enabled and strategy.name in ROBUST_STRATEGIES:
        raise StudyConfigError(
            f"[hospital_dp] cannot combine with strategy {strategy.name!r}: its guarantee needs the "
            "sum of every site's noise share, and a robust aggregator keeps only some of them"
        )
    return config


def _secure_aggregation(table: Mapping[str, Any], strategy: StrategyConfig) -> SecureAggregationConfig:
    config = _build(SecureAggregationConfig, table, "secure_aggregation")
    if not config.enabled:
        return config
    if strategy.name in ROBUST_STRATEGIES:
        raise StudyConfigError(
            f"[secure_aggregation] cannot combine with strategy {strategy.name!r}: robust aggregators "
            "inspect each update, which secure aggregation hides from the coordinator"
        )
    if not 0.5 <= config.threshold <= 1:
        raise StudyConfigError("[secure_aggregation] threshold must be in [0.5, 1]")
    if config.clip_range < 1 or config.max_weight <= 0:
        raise StudyConfigError("[secure_aggregation] needs clip_range >= 1 and max_weight > 0")
    if config.neighbours < 0 or config.neighbours == 1:
        raise StudyConfigError("[secure_aggregation] neighbours must be 0 (every site) or at least 2")
    return config


def study_from_dict(data: Mapping[str, Any], base_dir: Path) -> StudyConfig:
    raw = copy.deepcopy(dict(data))
    _resolve_paths(raw, base_dir)
    study = _table(raw, "study")
    task = str(study.get("task", "binary-classification"))
    if task not in TASKS:
        raise StudyConfigError(f"[study] task must be one of {TASKS}, got {task!r}")
    contract, images = None, None
    if task == "image-classification":
        images = _image_spec(_table(raw, "images"))
    else:
        contract = _contract(raw)

    privacy = _privacy(_table(raw, "privacy"), PrivacySettings(), "privacy")
    sites = []
    for i, site in enumerate(raw.get("sites", [])):
        if "name" not in site or "data" not in site:
            raise StudyConfigError(f"[[sites]] entry {i + 1}: needs 'name' and 'data'")
        extra = (
            set(site)
            - {"name", "data", "delimiter", "encoding"}
            - set(PrivacySettings.__dataclass_fields__)
            - (set(IMAGE_SOURCE_KEYS) if images is not None else set())
        )
        if extra:
            raise StudyConfigError(f"[[sites]] {site['name']!r}: unknown keys {sorted(extra)}")
        sites.append(
            SiteSpec(
                name=str(site["name"]),
                data=Path(site["data"]),
                privacy=_privacy(site, privacy, f"sites.{site['name']}"),
                delimiter=str(site.get("delimiter", ",")),
                encoding=str(site.get("encoding", "utf-8")),
                image_source=tuple(sorted((k, site[k]) for k in IMAGE_SOURCE_KEYS if k in site)),
            )
        )
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise StudyConfigError(f"[[sites]]: site names must be unique, got {names}")

    strategy = _build(StrategyConfig, _table(raw, "strategy"), "strategy")
    if strategy.name not in STRATEGIES + ROBUST_STRATEGIES:
        raise StudyConfigError(
            f"[strategy] name must be one of {STRATEGIES + ROBUST_STRATEGIES}, got {strategy.name!r}"
        )
    _check_robustness(strategy)
    model = _build(ModelConfig, _table(raw, "model"), "model")
    rounds = int(study.get("rounds", 20))
    if rounds < 1:
        raise StudyConfigError("[study] rounds must be at least 1")
    return StudyConfig(
        name=str(study.get("name", "study")),
        rounds=rounds,
        seed=int(study.get("seed", 0)),
        task=task,
        contract=contract,
        images=images,
        model=model,
        training=_training(_table(raw, "training"), model),
        strategy=strategy,
        privacy=privacy,
        split=_build(SplitConfig, _table(raw, "split"), "split"),
        hospital_dp=_hospital_dp(_table(raw, "hospital_dp"), strategy),
        secure_aggregation=_secure_aggregation(_table(raw, "secure_aggregation"), strategy),
        sites=tuple(sites),
        min_report_count=int(study.get("min_report_count", 10)),
        raw=raw,
    )


def load_study(path: Path) -> StudyConfig:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise StudyConfigError(f"study config not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise StudyConfigError(f"{path}: not valid TOML ({exc})") from exc
    try:
        return study_from_dict(data, path.parent)
    except (StudyConfigError, ValueError) as exc:
        raise StudyConfigError(f"{path}: {exc}") from exc


def with_overrides(study: StudyConfig, **overrides: Any) -> StudyConfig:
    """A copy of the study with command-line overrides (None means: keep the file's value).

    Keys: rounds, seed, strategy, model, epsilon, delta, dp, secure_aggregation. Privacy overrides
    apply to every simulated site: in a simulation the researcher plays every hospital.
    """
    raw = copy.deepcopy(dict(study.raw))
    placement = {
        "rounds": ("study", "rounds"),
        "seed": ("study", "seed"),
        "strategy": ("strategy", "name"),
        "model": ("model", "name"),
        "secure_aggregation": ("secure_aggregation", "enabled"),
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        tomli_w.dump(dict(study.raw), fh)
