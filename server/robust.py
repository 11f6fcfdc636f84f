"""Multi-Krum scored on each site's update history: a poisoned site shows over rounds, not in one.

Under DP-SGD a single round's honest updates are mostly noise (their pairwise cosines are near 0
in the heart-disease study), so Krum on one round picks at chance. An exponential moving average
of each site's updates over the rounds averages the independent noise away while a poisoned
site's systematic direction (a sign flip: gradient ascent on its own loss) stays. The sites whose
histories score best under Krum are selected, and their *current* updates are averaged as FedAvg
would; the others are left out of this round and logged.

Aggregation stays post-processing of DP outputs: the history is built from the updates the
coordinator received, so no privacy guarantee changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from pm_common import protocol as p
from pm_common.secure_aggregation import flatten

log = logging.getLogger("pmfl.server")


def smoothed(previous: np.ndarray | None, update: np.ndarray, beta: float) -> np.ndarray:
    """The site's history after this round: beta * previous + (1 - beta) * update."""
    return update if previous is None else beta * previous + (1.0 - beta) * update


def krum_scores(points: np.ndarray, num_malicious: int) -> np.ndarray:
    """Krum's score per row: the sum of squared distances to its n - f - 2 nearest others (at
    least one), as Blanchard et al. (2017) and Flower's `select_multikrum` define it."""
    sq = np.square(points).sum(axis=1)
    distances = np.maximum(sq[:, None] + sq[None, :] - 2.0 * points @ points.T, 0.0)
    closest = max(1, len(points) - num_malicious - 2)
    return np.sort(distances, axis=1)[:, 1 : closest + 1].sum(axis=1)


def select_lowest(scores: np.ndarray, count: int) -> list[int]:
    """Indices of the `count` lowest scores, in their original order (ties: the earlier)."""
    return sorted(np.argsort(scores, kind="stable")[:count].tolist())


class HistoryKrum(FedAvg):
    """Multi-Krum on per-site exponential moving averages of the updates (see the module doc).

    Sites are recognised by the name in their reply's site record, so a site's history survives
    the site reconnecting under a new node id; replies without one fall back to the node id.
    """

    def __init__(
        self, *, history: float, num_malicious_nodes: int, num_nodes_to_select: int, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.history_beta = history
        self.num_malicious_nodes = num_malicious_nodes
        self.num_nodes_to_select = num_nodes_to_select
        self.site_history: dict[str, np.ndarray] = {}
        self.excluded: dict[int, list[str]] = {}  # round -> sites left out
        self._sent: np.ndarray | None = None

    def summary(self) -> None:
        log.info(
            "HistoryKrum(history=%g, f=%d, select=%d)",
            self.history_beta,
            self.num_malicious_nodes,
            self.num_nodes_to_select,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = flatten({k: a.numpy() for k, a in arrays.items()})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self._sent is None:
            return None, None
        contents = [m.content for m in valid]
        names = [site_key(m) for m in valid]
        points = np.stack([self._remember(name, c) for name, c in zip(names, contents, strict=True)])
        scores = krum_scores(points, self.num_malicious_nodes)
        keep = select_lowest(scores, min(self.num_nodes_to_select, len(valid)))
        left_out = [names[i] for i in range(len(valid)) if i not in keep]
        if left_out:
            self.excluded[server_round] = left_out
            log.info(
                "round %d: history-Krum left out %s (scores %s)",
                server_round,
                ", ".join(left_out),
                ", ".join(f"{n} {s:.3g}" for n, s in zip(names, scores, strict=True)),
            )
        selected = [contents[i] for i in keep]
        arrays = aggregate_arrayrecords(selected, self.weighted_by_key)
        return arrays, self.train_metrics_aggr_fn(selected, self.weighted_by_key)

    def _remember(self, name: str, content: RecordDict) -> np.ndarray:
        """Fold this round's update (site model - model sent) into the site's history."""
        (arrays,) = content.array_records.values()
        update = flatten({k: a.numpy() for k, a in arrays.items()}) - self._sent
        self.site_history[name] = smoothed(self.site_history.get(name), update, self.history_beta)
        return self.site_history[name]


def site_key(reply: Message) -> str:
    """The name a site reports (pmfl's site record), else its node id."""
    record = reply.content.config_records.get(p.SITE)
    if record is not None and p.SITE_NAME in record:
        return str(record[p.SITE_NAME])
    return f"node-{reply.metadata.src_node_id}"
