"""The Flower strategy a study names in `[strategy] name`, sampling every site each round."""

from __future__ import annotations

import logging

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    MultiKrum,
)

from pm_common.study.config import StrategyConfig, server_learning_rate
from server.history_krum import HistoryKrum

log = logging.getLogger("pmfl.server")


def build_strategy(config: StrategyConfig, num_sites: int) -> FedAvg:
    """The named Flower strategy, sampling every site each round.

    Per-round evaluation messages are off: sites evaluate the model they receive at the start of
    each training round and send it with their reply, which halves the round trips per round.
    """
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": num_sites,
        "min_evaluate_nodes": 0,
        "min_available_nodes": num_sites,
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # silence "federated evaluation will be skipped": it is not
    try:
        return _construct(config, common)
    finally:
        flwr_logger.setLevel(level)


def _construct(config: StrategyConfig, common: dict) -> FedAvg:
    if config.name == "fedavg":
        return FedAvg(**common)
    if config.name == "fedprox":
        return FedProx(**common, proximal_mu=config.proximal_mu)
    if config.name == "fedavgm":
        return FedAvgM(
            **common,
            server_learning_rate=server_learning_rate(config),
            server_momentum=config.server_momentum,
        )
    opt = {"eta": server_learning_rate(config), "tau": config.tau}
    if config.name == "fedadam":
        return FedAdam(**common, **opt)
    if config.name == "fedyogi":
        return FedYogi(**common, **opt)
    if config.name == "fedadagrad":
        return FedAdagrad(**common, **opt)
    return _robust(config, common)


def _robust(config: StrategyConfig, common: dict) -> FedAvg:
    """Flower's Byzantine-robust aggregators (coordinate-wise trimmed mean and median, Krum)."""
    if config.name == "trimmed-mean":
        if int(config.trim_fraction * common["min_train_nodes"]) == 0:
            log.warning(
                "trim_fraction %g trims no update with %d sites; use at least 1/%d",
                config.trim_fraction,
                common["min_train_nodes"],
                common["min_train_nodes"],
            )
        return FedTrimmedAvg(**common, beta=config.trim_fraction)
    if config.name == "median":
        return FedMedian(**common)
    if config.name == "krum":  # Flower's Krum is MultiKrum selecting one update
        if config.krum_history > 0:
            return HistoryKrum(**common, history=config.krum_history,
                               outlier_ratio=config.krum_outlier_ratio,
                               num_malicious_nodes=config.krum_malicious,
                               aggregate=config.krum_aggregate, score=config.krum_score)
        return MultiKrum(**common, num_malicious_nodes=config.krum_malicious,
                         num_nodes_to_select=config.krum_select)
    raise ValueError(f"unknown strategy {config.name!r}")
