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
from collections.abc import Callable, Iterable, Iterator
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
PATCHES_FILE = Path(__file__).resolve().parents[2] / "pm_common" / "flower_patches.py"
PATCHES_MODULE = "_pmfl_site_flower_patches"  # never `pm_common.*`: the tasks load that from the app
REFUSAL = "pmfl: the warm ClientApp worker refuses to start"
TASK_EXIT_PATIENCE = 30.0  # seconds a task may take to exit after its reply before the next one starts


def load_patches() -> types.ModuleType:
    """pmfl's patch module (`pm_common/flower_patches.py` of this installation), loaded by path under a
    private name.

    Importing `pm_common` here would hand the tasks this installation's package instead of the approved
    app's.

    Returns:
        The patch module (the one already loaded, on a second call).

    Raises:
        ImportError: When the patch file cannot be loaded.
    """
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
    """The warm worker process: check the patches, import the heavy libraries, then fork a child per task.

    Reads one task token per line from stdin (the gate writes them) until EOF.

    Args:
        argv: The command-line arguments without the program name; sys.argv[1:] when None.

    Raises:
        SystemExit: With REFUSED_EXIT when a patch check fails, so that the gate stops the site instead
            of starting this process again for every task.
    """
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
    try:  # one token per task; EOF (the gate stopped) ends this process
        serve(_tokens(memo), lambda token: _child(patches, args, token, memo, pycache))
    finally:
        shutil.rmtree(pycache, ignore_errors=True)


def serve(
    tokens: Iterable[str], run_task: Callable[[str], None], patience: float = TASK_EXIT_PATIENCE
) -> None:
    """Fork a child per task token, one task at a time: a task starts only once the previous one
    has exited (or after `patience` seconds, with a warning), and every exited child is reaped.

    Why: Flower's task (`run_clientapp`) sends its reply first and saves the node's Context only
    when it exits. The SuperNode passes on the next message as soon as the reply is out, so a child
    forked at once could read the Context from before the previous task's changes, and secure
    aggregation keeps a round's keys and shares in that Context from one message to the next (a
    site then answered a relay with stale state: "shares relayed from non-neighbours").

    Args:
        tokens: task tokens, in the order the gate received them.
        run_task: runs one task in the forked child and never returns (it ends with `os._exit`).
        patience: seconds to wait for the previous task to exit before starting the next anyway.
    """
    previous: int | None = None
    for token in tokens:
        if previous is not None:
            _wait_for_exit(previous, patience)
        _reap()
        pid = os.fork()
        if pid == 0:
            run_task(token)
            os._exit(1)  # run_task never returns; if it did, the child must not go on serving
        previous = pid
    if previous is not None:
        _wait_for_exit(previous, patience)
    _reap()


def _wait_for_exit(pid: int, patience: float) -> None:
    """Wait for task `pid` to exit; past `patience`, stop it: a task that saved its Context after the
    next one started would overwrite that one's state with an older one."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # reaped already
        if done:
            return
        time.sleep(0.002)
    print(f"pmfl: task {pid} still running {patience:g} s after the next task came; stopped", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _reap() -> None:
    """Collect every child that exited (a task that outlived its patience, for one)."""
    while True:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not done:
            return


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
