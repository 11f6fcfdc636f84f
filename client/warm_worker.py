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
import hashlib
import importlib
import json
import os
import selectors
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from typing import Any

RETRY_START, RETRY_CAP = 0.02, 0.05  # seconds: retries of message contents not yet at the SuperNode
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


class RdpMemo:
    """Opacus' `compute_rdp`, remembered across tasks: a task reports what it computed to this
    process, and the next task, forked from it, finds the result.

    Why: the privacy accounting computes the RDP of one DP-SGD step at 151 orders, about 0.1 s of
    CPU (more on a busy machine), for the same sampling rate and noise every round; a forked task
    keeps nothing, so every round paid it again. The result is the one the task computed (exact
    floats), so every epsilon is bit for bit what it was. Only Opacus' own function is wrapped;
    the app's code is never loaded here.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self.results: dict[tuple[Any, ...], list[float]] = {}
        self.max_entries = max_entries
        self.reader, self.writer = os.pipe()
        self._buffer = b""

    def install(self) -> None:
        """Wrap `opacus.accountants.analysis.rdp.compute_rdp` (a no-op without Opacus)."""
        try:
            from opacus.accountants.analysis import rdp
        except ImportError:
            return
        compute = rdp.compute_rdp

        @functools.wraps(compute)
        def remembered(*, q: float, noise_multiplier: float, steps: int, orders: Any) -> Any:
            key = self.key(q, noise_multiplier, orders)
            if key is None:
                return compute(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
            if key not in self.results:
                one_step = compute(q=q, noise_multiplier=noise_multiplier, steps=1, orders=orders)
                self.results[key] = [float(x) for x in one_step]
                self.report(key)
            import numpy as np

            return np.array(self.results[key]) * steps  # Opacus: (one step at each order) * steps

        rdp.compute_rdp = remembered

    @staticmethod
    def key(q: Any, noise_multiplier: Any, orders: Any) -> tuple[Any, ...] | None:
        """Plain numbers only (a list of orders, as every caller passes); else not remembered."""
        if not isinstance(orders, (list, tuple)):
            return None
        values = (q, noise_multiplier, *orders)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return None
        return tuple(float(v) for v in values)

    def in_child(self) -> None:
        """In a forked task: never block on the parent (a full pipe drops a result, nothing else)."""
        os.close(self.reader)
        os.set_blocking(self.writer, False)

    def report(self, key: tuple[Any, ...]) -> None:
        """In a task: send a new result to the parent (exact: repr of a float round-trips)."""
        with contextlib.suppress(OSError):  # the parent stopped: nothing to remember it for
            line = json.dumps([list(key), self.results[key]]).encode() + b"\n"
            os.write(self.writer, line)

    def receive(self) -> None:
        """In the parent: take in what tasks reported."""
        self._buffer += os.read(self.reader, 65536)
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError, TypeError):  # a line cut short by a full pipe
                key, result = json.loads(line)
                if len(result) == len(key) - 2 and len(self.results) < self.max_entries:
                    self.results[tuple(float(v) for v in key)] = [float(x) for x in result]


class _TimedApp:
    """The loaded ClientApp, timed: the log then tells the app's own work from the task's overhead."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started, wall = time.monotonic(), time.time()
        try:
            return self.app(*args, **kwargs)
        finally:
            print(f"[clientapp] app {time.monotonic() - started:.3f} s from {wall:.3f}", file=sys.stderr)


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
    _reuse_installed_app(flower)
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


def _reuse_installed_app(flower: Any) -> None:
    """In this child: skip re-extracting the app bundle when Flower installed it before.

    Why: for every task Flower's `install_from_fab` unpacks the bundle into a temporary folder and
    hashes each file, and then, when the app's folder already exists, returns that folder and
    discards what it unpacked: the code that runs is the installed one either way. Skipping the
    unpacking when that folder exists (named by the bundle's hash, which the SuperNode checked
    against the run and the gate against the site's approval) loads exactly the same code, ~40 ms
    of CPU sooner per task. A bundle not installed yet goes through Flower's checks unchanged.
    """
    pull, install = flower.pull_task_input, flower.install_from_fab
    runs: list[Any] = []

    def pull_and_note(*args: Any, **kwargs: Any) -> Any:
        message, context, run, fab = pull(*args, **kwargs)
        runs.append(run)
        return message, context, run, fab

    def install_unless_installed(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        if runs and isinstance(fab_file, bytes):
            digest = hashlib.sha256(fab_file).hexdigest()
            installed = flower.get_project_dir(runs[-1].fab_id, runs[-1].fab_version, digest)
            if installed.is_dir():
                return installed
        return install(fab_file, *args, **kwargs)

    flower.pull_task_input = pull_and_note
    flower.install_from_fab = install_unless_installed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    for module in PRELOAD:
        with contextlib.suppress(ImportError):  # a leaner site image: the app imports what it needs
            importlib.import_module(module)
    memo = RdpMemo()
    memo.install()
    pycache = tempfile.mkdtemp(prefix="pmfl-pycache-")  # mode 0700: this process's user only
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished children are reaped by the kernel
    try:
        for token in _tokens(memo):  # one token per task; EOF (the gate stopped) ends this process
            if os.fork() == 0:
                _child(args, token, memo, pycache)
    finally:
        shutil.rmtree(pycache, ignore_errors=True)


def _tokens(memo: RdpMemo) -> Iterator[str]:
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


def _child(args: argparse.Namespace, token: str, memo: RdpMemo, pycache: str) -> None:
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
        _run_task(args.runtime_api_address, token, args.parent_pid)
        code = 0
    except SystemExit as exc:  # run_clientapp ends with flwr_exit
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        print(f"[clientapp] task {time.monotonic() - started:.3f} s from {wall:.3f}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
