"""History-Krum: a poisoned site shows over rounds, not in one, so judge each site on its record.

Under DP-SGD a single round's honest updates are mostly noise (their pairwise cosines are near 0
in the heart-disease study), so Krum on one round picks at chance, and at the federation's
optimum the honest updates cancel out, leaving a sign-flipped one nothing to stand out against.
Two memories fix this:
- each site's *history*, an exponential moving average of its updates, averages the independent
  noise away while a poisoned site's systematic direction stays;
- each site's *suspicion*, the mean over the rounds it took part in of its Krum score on the
  histories (relative to that round's median score), keeps the evidence of the early rounds,
  when honest sites still agree and a poisoned one stands out most.
A site whose suspicion exceeds `outlier_ratio` times the median site's is left out (at most
`num_malicious_nodes` of them, the most suspicious first); the other sites' *current* updates are
averaged as FedAvg would. With no outlier every update is used, so a clean federation loses no
data, unlike Multi-Krum, which always drops f sites. `aggregate="median"` combines the kept
updates by their coordinate-wise median instead: a poisoned site that is not (yet) left out then
moves the model no further than the honest sites' range, for the price of ignoring site sizes.
`score="median"` measures each history against the coordinate-wise median of the other sites'
histories instead of Krum's nearest neighbours (one neighbour with 4 sites and f = 1).

Aggregation stays post-processing of DP outputs: the memories are built from the updates the
coordinator received, so no privacy guarantee changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from pm_common.wire import keys as p
from pm_common.wire.packing import flatten

log = logging.getLogger("pmfl.server")


def smoothed(previous: np.ndarray | None, update: np.ndarray, beta: float) -> np.ndarray:
    """The site's history after this round: beta * previous + (1 - beta) * update.

    Smoothing over rounds lets a site that is consistently off stand out even when one round's
    update alone looks ordinary.

    Args:
        previous: The site's history so far; None for its first round.
        update: This round's update, flattened.
        beta: The weight of the history.

    Returns:
        The new history (the update itself when there was none).
    """
    return update if previous is None else beta * previous + (1.0 - beta) * update


def krum_scores(points: np.ndarray, num_malicious: int) -> np.ndarray:
    """Krum's score per row: the sum of squared distances to its n - f - 2 nearest others (at least one), as
    Blanchard et al. (2017) and Flower's `select_multikrum` define it.

    Args:
        points: One row per site.
        num_malicious: f, the number of malicious sites to tolerate.

    Returns:
        One score per row; lower is more central.
    """
    sq = np.square(points).sum(axis=1)
    distances = np.maximum(sq[:, None] + sq[None, :] - 2.0 * points @ points.T, 0.0)
    closest = max(1, len(points) - num_malicious - 2)
    return np.sort(distances, axis=1)[:, 1 : closest + 1].sum(axis=1)


def median_distance_scores(points: np.ndarray) -> np.ndarray:
    """Per row: the squared distance to the coordinate-wise median of the other rows.

    With few sites Krum's score is the distance to one nearest neighbour, which a poisoned site may
    happen to have; the others' median is where most of them agree, whichever site sits near it.

    Args:
        points: One row per site.

    Returns:
        One score per row (zeros with fewer than two rows).
    """
    if len(points) < 2:
        return np.zeros(len(points))
    others_median = [np.median(np.delete(points, i, axis=0), axis=0) for i in range(len(points))]
    return np.square(points - np.stack(others_median)).sum(axis=1)


def relative(values: np.ndarray) -> np.ndarray:
    """Values over their median (all ones when the median is 0: nothing to tell apart).

    Makes scores comparable across rounds and models, whatever their scale.

    Args:
        values: The scores.

    Returns:
        The scores divided by their median.
    """
    middle = float(np.median(values))
    return values / middle if middle > 0 else np.ones_like(values)


def outliers(suspicion: np.ndarray, ratio: float, at_most: int) -> list[int]:
    """Indices whose suspicion exceeds `ratio` times the median's, the `at_most` highest.

    Args:
        suspicion: One score per site.
        ratio: How many times the median a score must exceed.
        at_most: The most indices to return.

    Returns:
        The selected indices, sorted.
    """
    above = [i for i in np.argsort(-suspicion, kind="stable") if relative(suspicion)[i] > ratio]
    return sorted(int(i) for i in above[:at_most])


def median_arrayrecords(contents: list[RecordDict]) -> ArrayRecord:
    """Coordinate-wise median of each reply's (only) ArrayRecord, as Flower's FedMedian takes it.

    Args:
        contents: The replies' contents; not empty.

    Returns:
        The median per parameter, in the replies' dtype.
    """
    records = [next(iter(c.array_records.values())) for c in contents]
    arrays = {}
    for key in records[0]:
        layers = np.stack([r[key].numpy() for r in records])
        arrays[key] = Array(np.median(layers, axis=0).astype(layers.dtype))
    return ArrayRecord(arrays)


class HistoryKrum(FedAvg):
    """Leave out the sites whose update histories Krum has found outlying round after round.

    Sites are recognised by the name in their reply's site record, so their memories survive a
    site reconnecting under a new node id; replies without one fall back to the node id.
    """

    def __init__(
        self,
        *,
        history: float,
        outlier_ratio: float,
        num_malicious_nodes: int,
        aggregate: str = "fedavg",
        score: str = "nearest",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.history_beta = history
        self.outlier_ratio = outlier_ratio
        self.num_malicious_nodes = num_malicious_nodes
        self.aggregate = aggregate
        self.score = score
        self.site_history: dict[str, np.ndarray] = {}
        self.site_suspicion: dict[str, np.ndarray] = {}  # [sum of relative scores, rounds]
        self.excluded: dict[int, list[str]] = {}  # round -> sites left out
        self._sent: np.ndarray | None = None

    def summary(self) -> None:
        log.info(
            "HistoryKrum(history=%g, outlier_ratio=%g, f=%d, aggregate=%s, score=%s)",
            self.history_beta,
            self.outlier_ratio,
            self.num_malicious_nodes,
            self.aggregate,
            self.score,
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
        if self.score == "median":
            scores = relative(median_distance_scores(points))
        else:
            scores = relative(krum_scores(points, self.num_malicious_nodes))
        suspicion = np.array([self._suspect(name, s) for name, s in zip(names, scores, strict=True)])
        left_out = outliers(suspicion, self.outlier_ratio, self.num_malicious_nodes)
        if left_out:
            self.excluded[server_round] = [names[i] for i in left_out]
            log.warning(
                "round %d: history-Krum left out %s (suspicion relative to the median site: %s)",
                server_round,
                ", ".join(self.excluded[server_round]),
                ", ".join(f"{n} {s:.2f}" for n, s in zip(names, relative(suspicion), strict=True)),
            )
        selected = [c for i, c in enumerate(contents) if i not in left_out]
        if self.aggregate == "median":
            arrays = median_arrayrecords(selected)
        else:
            arrays = aggregate_arrayrecords(selected, self.weighted_by_key)
        return arrays, self.train_metrics_aggr_fn(selected, self.weighted_by_key)

    def _remember(self, name: str, content: RecordDict) -> np.ndarray:
        """Fold this round's update (site model - model sent) into the site's history."""
        (arrays,) = content.array_records.values()
        update = flatten({k: a.numpy() for k, a in arrays.items()}) - self._sent
        self.site_history[name] = smoothed(self.site_history.get(name), update, self.history_beta)
        return self.site_history[name]

    def _suspect(self, name: str, score: float) -> float:
        """Add this round's relative score to the site's record; its mean over its rounds."""
        total = self.site_suspicion.get(name, np.zeros(2)) + np.array([score, 1.0])
        self.site_suspicion[name] = total
        return float(total[0] / total[1])


def site_key(reply: Message) -> str:
    """The name a site reports (pmfl's site record), else its node id.

    Keys each site's history and names the sites left out in the log, so both read as the sites
    are known to the study rather than by Flower's node numbers.

    Args:
        reply: A site's reply.

    Returns:
        The site's name, or "node-<id>".
    """
    record = reply.content.config_records.get(p.SITE)
    if record is not None and p.SITE_NAME in record:
        return str(record[p.SITE_NAME])
    return f"node-{reply.metadata.src_node_id}"
