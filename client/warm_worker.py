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
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import signal
import sys
import time
import traceback
from typing import Any

RETRY_START, RETRY_CAP = 0.02, 0.5  # seconds: retries of message contents not yet at the SuperNode
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


class _TimedApp:
    """The loaded ClientApp, timed: the log then tells the app's own work from the task's overhead."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return self.app(*args, **kwargs)
        finally:
            print(f"[clientapp] app {time.monotonic() - started:.3f} s", file=sys.stderr)


def _run_task(runtime_api_address: str, token: str, parent_pid: int | None) -> None:
    from flwr.supernode.runtime import run_clientapp as flower

    loader = flower.get_load_client_app_fn

    def timed_loader(*args: Any, **kwargs: Any) -> Any:
        load = loader(*args, **kwargs)
        return lambda *a: _TimedApp(load(*a))

    # This child process only. The task often starts while the SuperNode is still receiving the
    # message's contents; Flower then retries the local pull after 1 s, 2 s, ... (PULL_INITIAL_BACKOFF):
    # retry from RETRY_START instead, a few more requests on loopback.
    flower.get_load_client_app_fn = timed_loader
    flower.pull_and_inflate_object_from_tree = functools.partial(
        flower.pull_and_inflate_object_from_tree, initial_backoff=RETRY_START, backoff_cap=RETRY_CAP
    )
    flower.run_clientapp(
        runtime_api_address=runtime_api_address,
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
    for module in PRELOAD:
        with contextlib.suppress(ImportError):  # a leaner site image: the app imports what it needs
            importlib.import_module(module)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished children are reaped by the kernel
    for line in sys.stdin:  # one token per task; EOF (the gate stopped) ends this process
        token = line.strip()
        if not token:
            continue
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code, started = 1, time.monotonic()
            try:
                _run_task(args.runtime_api_address, token, args.parent_pid)
                code = 0
            except SystemExit as exc:  # run_clientapp ends with flwr_exit
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                print(f"[clientapp] task {time.monotonic() - started:.3f} s", file=sys.stderr)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # never return into the parent's loop


if __name__ == "__main__":
    main()
