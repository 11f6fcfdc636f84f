"""Cost of secure aggregation: bytes on the wire and round time, plain vs SecAgg+, 4/20/100 sites.

Each simulated site holds 100 rows drawn from the pooled heart-disease table (seeded; rows repeat
across sites: this measures cost, not accuracy). The MLP, DP-SGD at every site, FedAvg; plain and
secure runs alternate. Bytes are the serialised Flower messages the coordinator pushes to and
pulls from the sites (every message of a round: training and secure-aggregation stages), per
site per round; the "update" columns are the training reply alone. Round time is the median
wall time between the ends of consecutive rounds from the live-progress hook: rounds 2 onwards,
the steady state (round 1 also pays Ray's warm-up and, secure, two more key exchanges).

    python -m benchmarks.secure_aggregation [--runs 4:0 20:0 100:0 100:15] [--rounds 6]

(`SITES:NEIGHBOURS`; neighbours 0: every site, as SecAgg; k > 0: SecAgg+'s sparse graph.)
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Message
from flwr.common.serde import message_to_proto
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from benchmarks.common import median, print_table, write_results
from pm_common.study.config import load_study, study_from_dict
from pm_common.wire import keys as p
from simulations.runner import simulate
from simulations.scenarios import scenario_path

DATA = Path(__file__).resolve().parents[1] / "pm_common" / "datasets" / "heart_disease"


class WireCounter:
    """Counts the bytes of every message the coordinator pushes and pulls, by message type."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self._types: dict[str, str] = {}
        self._push = InMemoryGrid.push_messages
        self._pull = InMemoryGrid.pull_messages

    def __enter__(self) -> WireCounter:
        counter = self

        def push(grid: InMemoryGrid, messages: Iterable[Message]) -> Iterable[str]:
            messages = list(messages)
            ids = list(counter._push(grid, messages))
            for msg, mid in zip(messages, ids, strict=True):
                counter._types[mid] = msg.metadata.message_type
                counter.bytes[f"down {msg.metadata.message_type}"] += message_to_proto(msg).ByteSize()
            return ids

        def pull(grid: InMemoryGrid, message_ids: Iterable[str]) -> Iterable[Message]:
            replies = list(counter._pull(grid, message_ids))
            for reply in replies:
                kind = counter._types.get(reply.metadata.reply_to_message_id, "?")
                counter.bytes[f"up {kind}"] += message_to_proto(reply).ByteSize()
            return replies

        InMemoryGrid.push_messages = push  # type: ignore[method-assign]
        InMemoryGrid.pull_messages = pull  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        InMemoryGrid.push_messages = self._push  # type: ignore[method-assign]
        InMemoryGrid.pull_messages = self._pull  # type: ignore[method-assign]


def write_sites(folder: Path, sites: int, rows: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """Write one CSV per simulated site, each `rows` rows drawn from the pooled heart-disease table.

    Any number of sites can then be simulated from the four hospitals' data. Rows do not
    repeat within a site but do across sites: the benchmark measures cost, not accuracy.

    Args:
        folder: where the CSV files go.
        sites: how many sites.
        rows: rows per site.
        seed: the draw's seed, so that plain and secure runs see the same sites.

    Returns:
        The study's `sites` entries: a name and a data path per site.
    """
    pooled = pd.concat([pd.read_csv(f) for f in sorted(DATA.glob("*.csv"))], ignore_index=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(sites):
        path = folder / f"site{i:03d}.csv"
        pooled.iloc[rng.choice(len(pooled), rows, replace=False)].to_csv(path, index=False)
        entries.append({"name": f"site{i:03d}", "data": str(path)})
    return entries


def run(sites: int, secure: bool, rounds: int, neighbours: int, folder: Path) -> dict[str, Any]:
    """Run one simulated study, plain or secure, counting its messages' bytes and timing its rounds.

    The heart-disease scenario with the MLP, `sites` generated sites and `rounds` rounds; `WireCounter`
    counts the serialised bytes of every message pushed and pulled; the progress hook times the rounds.

    Args:
        sites: how many sites.
        secure: whether secure aggregation is enabled.
        rounds: the study's rounds.
        neighbours: SecAgg+'s neighbours per site (0: every site).
        folder: a fresh directory for the sites' files and the run.

    Returns:
        The site count; the median round time (rounds 2 onwards: the steady state); bytes per site per
        round, all but evaluation messages and the training reply alone; bytes by message type; and how many
        sites trained in each round.
    """
    raw = dict(load_study(scenario_path("heart-disease")).raw)
    raw["sites"] = write_sites(folder, sites)
    raw["study"] = {**raw["study"], "rounds": rounds}
    raw["model"] = {"name": "mlp", "hidden": [32]}
    raw["secure_aggregation"] = {"enabled": secure, "neighbours": neighbours}
    study = study_from_dict(raw, folder)
    stamps: list[float] = []
    with WireCounter() as wire:
        metrics = simulate(study, folder / ("secure" if secure else "plain"), overwrite=True,
                           progress=lambda _: stamps.append(time.perf_counter()))
    trained = [len(r["trained"]) for r in metrics["rounds"][1:]]
    per_site_round = sites * rounds
    update_up = wire.bytes["up train"] / per_site_round
    total = sum(b for k, b in wire.bytes.items() if k.split()[1] != "evaluate") / per_site_round
    return {
        "sites": sites,
        "secure": secure,
        "round_s": median([b - a for a, b in itertools.pairwise(stamps)]),  # rounds 2..: steady state
        "bytes_per_site_round": total,
        "update_bytes": update_up,
        "by_type": {k: v / per_site_round for k, v in sorted(wire.bytes.items())},
        "trained_per_round": trained,
    }


def main() -> None:
    """Measure plain against secure aggregation for each `SITES:NEIGHBOURS` run; print and write it.

    Each configuration runs plain, then secure, one after the other, so both see the same machine load;
    the table gives time and byte ratios. Writes benchmarks/results/secure_aggregation.json.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", default=["4:0", "20:0", "100:0", "100:15"],
                        help="SITES:NEIGHBOURS (0: every site)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            sites, neighbours = (int(v) for v in spec.split(":"))
            for secure in (False, True):
                folder = Path(tmp) / f"{spec.replace(':', '-')}-{secure}"
                folder.mkdir()
                measured = run(sites, secure, args.rounds, neighbours, folder)
                results.append({**measured, "neighbours": neighbours})
    rows = []
    for plain, secure in zip(results[::2], results[1::2], strict=True):
        rows.append([
            plain["sites"], secure["neighbours"] or "all",
            plain["round_s"], secure["round_s"], secure["round_s"] / plain["round_s"],
            plain["update_bytes"], secure["update_bytes"], plain["bytes_per_site_round"],
            secure["bytes_per_site_round"], secure["bytes_per_site_round"] / plain["bytes_per_site_round"],
        ])
    print_table(
        f"secure aggregation cost (MLP, DP-SGD, FedAvg, {args.rounds} rounds, medians)",
        ["sites", "neighbours", "round s plain", "round s secure", "time x", "update B plain",
         "update B secure", "round B/site plain", "round B/site secure", "bytes x"],
        rows,
    )
    write_results("secure_aggregation", {"rounds": args.rounds, "message_types": [p.SECAGG_MESSAGE, "train"],
                                         "runs": results})


if __name__ == "__main__":
    main()
