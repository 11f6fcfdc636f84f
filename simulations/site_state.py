"""Simulated hospitals keep their state on disk, so a restarted coordinator meets the same sites.

A deployed site keeps its privacy state (plan, accountant, signed ledger, ledger key) in its own
directory (client/state.py: DirectoryStateStore) and survives a coordinator restart. A simulated
site keeps it in Flower's per-node `Context.state`, which lives only as long as one simulation.
This ClientApp mod gives simulated sites the same durability: after every message it saves the
node's `Context.state` to `<run dir>/simulated-sites/node-<partition>.bin`, and a node that starts
empty (a new simulation resuming the run) reloads it first. Without it, a resumed simulation would
start every site's accountant from zero.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

from client.secure_aggregation import STATE_KEY as SECAGG_STATE_KEY

STATE_DIR = "simulated-sites"


def state_path(state_dir: Path, context: Context) -> Path:
    return Path(state_dir) / f"node-{int(context.node_config.get('partition-id', 0))}.bin"


def _is_empty(context: Context) -> bool:
    state = context.state
    return not (state.array_records or state.metric_records or state.config_records)


def site_state_mod(state_dir: Path) -> Mod:
    """A ClientApp mod that persists each simulated node's `Context.state` in `state_dir`."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        path = state_path(state_dir, context)
        if _is_empty(context) and path.exists():
            proto = RecordDictProto()
            proto.ParseFromString(path.read_bytes())
            for key, record in recorddict_from_proto(proto).items():
                context.state[key] = record
        try:
            return call_next(msg, context)
        finally:  # also when the app fails after training: the spend it saved must survive
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            # a round's secure-aggregation secrets stay in memory
            durable = RecordDict(
                {k: r for k, r in context.state.items() if not k.startswith(SECAGG_STATE_KEY)}
            )
            with os.fdopen(fd, "wb") as fh:
                fh.write(recorddict_to_proto(durable).SerializeToString())
            os.replace(tmp, path)

    return mod
