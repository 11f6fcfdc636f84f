"""ClientApp processes without the start-up cost: a process that has imported the heavy libraries
once, and forks a fresh child for every task.

Why: Flower starts a new `flwr-clientapp` process for every message, and importing torch, Opacus
and pandas takes seconds, much longer than a round's training on tabular data. This process imports
them once and then, for each task token the gate writes to its stdin, forks a child that runs
Flower's own `run_clientapp`: each task still runs in a fresh process that exits when the task is
done. Only third-party libraries are imported here, and no torch operation runs before the fork: the
study app's code (`client`, `server`, `pm_common`) is loaded in the child from the approved FAB,
which is why the gate runs this file by path (`python -P .../warm_worker.py`), never as a module of
the installed `client` package.

The patches of Flower's task code (`clientapp-task`: sooner local retries, no second unpacking of an
installed app bundle, the app's timing) and of Opacus (`opacus-rdp-memo`: one step's RDP computed
once per site) live in `pm_common/flower_patches.py`, which this process loads by path under a
private name, so the tasks still load `pm_common` from the approved app. They are checked before
the first fork; a check that fails stops this process with one line (and the gate with it), naming
`PMFL_GATE_WARM=0`, which runs Flower's own cold `flwr-clientapp` per task instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import selectors
import shutil
import signal
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PRELOAD = (
    "numpy",
    "pandas",
    "pyarrow",
    "statistics",
    "tomllib",
    "sklearn.metrics",
    "sklearn.model_selection",
    "torch",
    "torch._dynamo",  # imported lazily by the first optimizer step: ~0.9 s per task otherwise
    "opacus",
    "opacus.utils.batch_memory_manager",
    "dp_accounting",
    "httpcore",  # imported by the first HTTP client, i.e. in every task otherwise
    "flwr.supernode.runtime.run_clientapp",
)
PATCHES_FILE = Path(__file__).resolve().parents[1] / "pm_common" / "flower_patches.py"
PATCHES_MODULE = "_pmfl_site_flower_patches"  # never `pm_common.*`: the tasks load that from the app
REFUSAL = "pmfl: the warm ClientApp worker refuses to start"


def load_patches() -> types.ModuleType:
    """pmfl's patch module (`pm_common/flower_patches.py` of this installation), loaded by path under
    a private name: importing `pm_common` here would hand the tasks this installation's package
    instead of the approved app's."""
    if PATCHES_MODULE in sys.modules:
        return sys.modules[PATCHES_MODULE]
    spec = importlib.util.spec_from_file_location(PATCHES_MODULE, PATCHES_FILE)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {PATCHES_FILE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[PATCHES_MODULE] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _run_task(patches: types.ModuleType, address: str, token: str, parent_pid: int | None) -> None:
    flower = patches.patch_clientapp_task(log=lambda line: print(line, file=sys.stderr))  # this child only
    flower.run_clientapp(
        runtime_api_address=address,
        token=token,
        insecure=True,  # the SuperNode's Runtime API listens on loopback only
        certificates=None,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    patches = load_patches()
    try:  # before any task: a site whose tasks would fail does not start
        patches.check_clientapp_task()
        for module in PRELOAD:
            with contextlib.suppress(ImportError):  # a leaner site image: the app imports what it needs
                importlib.import_module(module)
        memo = patches.RdpMemo()
        memo.install()
    except patches.PatchError as exc:
        print(f"{REFUSAL}: {exc}", file=sys.stderr)
        sys.exit(patches.REFUSED_EXIT)  # the gate stops the site instead of starting this again
    pycache = tempfile.mkdtemp(prefix="pmfl-pycache-")  # mode 0700: this process's user only
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished children are reaped by the kernel
    try:
        for token in _tokens(memo):  # one token per task; EOF (the gate stopped) ends this process
            if os.fork() == 0:
                _child(patches, args, token, memo, pycache)
    finally:
        shutil.rmtree(pycache, ignore_errors=True)


def _tokens(memo: Any) -> Iterator[str]:
    """Task tokens from stdin, one a line; in between, what the tasks reported to `memo`."""
    with selectors.DefaultSelector() as selector:
        selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "tokens")
        selector.register(memo.reader, selectors.EVENT_READ, "memo")
        pending = b""
        while True:
            for key, _ in selector.select():
                if key.data == "memo":
                    memo.receive()
                    continue
                chunk = os.read(sys.stdin.fileno(), 4096)
                if not chunk:
                    return
                *lines, pending = (pending + chunk).split(b"\n")
                yield from (t for line in lines if (t := line.decode().strip()))


def _child(patches: types.ModuleType, args: argparse.Namespace, token: str, memo: Any, pycache: str) -> None:
    """One task in this forked child; never returns into the parent's loop."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    memo.in_child()
    # Bytecode of the app's modules (loaded from the FAB in every child) goes to this worker's private
    # folder: with bytecode writing off (PYTHONDONTWRITEBYTECODE, common in container images) every
    # task compiled them anew, and with it on Python wrote into Flower's app folder. Python checks
    # each cached file against its source file, as it does everywhere.
    sys.pycache_prefix, sys.dont_write_bytecode = pycache, False
    code, started, wall = 1, time.monotonic(), time.time()
    try:
        _run_task(patches, args.runtime_api_address, token, args.parent_pid)
        code = 0
    except SystemExit as exc:  # run_clientapp ends with flwr_exit
        code = exc.code if isinstance(exc.code, int) else 1
    except patches.PatchError as exc:  # checked in the parent already; a task that cannot patch fails
        print(f"pmfl: ClientApp task refused: {exc}", file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        print(f"[clientapp] task {time.monotonic() - started:.3f} s from {wall:.3f}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
