"""The site's gate: Flower's SuperExec role, refusing every study app the hospital has not approved.

Why here: the SuperNode (run with `--isolation process`) queues one task per message; a SuperExec
takes each task and starts the ClientApp process that loads the app's code from the FAB. This gate
is that SuperExec. It looks at the task's FAB hash (checked by the SuperNode against the FAB's
content) *before* anything of the app is loaded: an approved app goes to a warm ClientApp process
(`client.deploy.warm_worker`); any other app gets an INVALID_FAB error reply naming the reason, which the
coordinator records, and the same reason is logged here, at the site.

The warm ClientApp worker patches Flower's task code (`pm_common.flower_patches`, `clientapp-task`);
the gate checks those patches before it serves anything, so a site whose tasks could not run does not
start: one line, exit status 1, naming `PMFL_GATE_WARM=0` (Flower's own cold `flwr-clientapp` per task).
A worker that refuses its own checks (Opacus' accounting memo, which the gate does not import) exits
with `REFUSED_EXIT`, and the gate then stops the same way instead of starting it again for each task.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from client.approval import ApprovalError, load_approval
from client.deploy.warm_worker import TASK_EXIT_PATIENCE
from pm_common import flower_patches as patches

log = logging.getLogger("pmfl.gate")
POLL_ENV = "PMFL_GATE_POLL_INTERVAL"
WORKER_SCRIPT = Path(__file__).with_name("warm_worker.py")
WARM_ENV = "PMFL_GATE_WARM"  # "0": a cold flwr-clientapp per task, as Flower's SuperExec does
DEFAULT_POLL = 0.1  # seconds between task polls on the local Runtime API (Flower's SuperExec: 1 s)
REFUSAL = "pmfl: the site's gate refuses to start"


class WarmWorker:
    """The site's ClientApp launcher: a warm fork server (`client.deploy.warm_worker`), or with
    PMFL_GATE_WARM=0 a cold `flwr-clientapp` process per task, as Flower's own SuperExec does."""

    def __init__(self, runtime_api_address: str) -> None:
        self.runtime_api_address = runtime_api_address
        self.warm = os.environ.get(WARM_ENV, "1") != "0"
        self.proc: subprocess.Popen[str] | None = None
        self.cold: list[subprocess.Popen[bytes]] = []

    def prepare(self) -> None:
        """Start the fork server if it is not running (imports take seconds: do it before a task)."""
        self.check()
        if self.warm and (self.proc is None or self.proc.poll() is not None):
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-P",  # by path, not `-m client...`: the app's own `client` package comes from the FAB
                    str(WORKER_SCRIPT),
                    "--runtime-api-address",
                    self.runtime_api_address,
                    "--parent-pid",
                    str(os.getpid()),
                ],
                stdin=subprocess.PIPE,
                text=True,
            )

    def run(self, token: str) -> None:
        """Run one task in a fresh process."""
        if not self.warm:
            if self.cold:  # as the warm worker: one task at a time, each after the previous one saved
                try:  # its Context (client/deploy/warm_worker.py, `serve`)
                    self.cold[-1].wait(timeout=TASK_EXIT_PATIENCE)
                except subprocess.TimeoutExpired:
                    self.cold[-1].kill()
            cold = [_flwr_clientapp(), "--insecure", "--runtime-api-address", self.runtime_api_address]
            self.cold.append(subprocess.Popen([*cold, "--token", token, "--parent-pid", str(os.getpid())]))
            return
        self.prepare()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(token + "\n")
        self.proc.stdin.flush()

    def reap(self) -> None:
        self.check()
        self.cold = [p for p in self.cold if p.poll() is None]

    def check(self) -> None:
        """Raise `PatchError` if the fork server refused to start (its patches failed: every task
        would); a fork server that crashed for another reason is started again for the next task."""
        if self.proc is not None and self.proc.poll() == patches.REFUSED_EXIT:
            raise patches.PatchError(
                "the warm ClientApp worker refused to start (its reason is logged above); "
                f"set {WARM_ENV}=0 to run Flower's own flwr-clientapp per task"
            )

    def close(self) -> None:
        procs: list[subprocess.Popen] = [*self.cold, *([self.proc] if self.proc else [])]  # type: ignore[type-arg]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def _flwr_clientapp() -> str:
    local = Path(sys.executable).with_name("flwr-clientapp")
    return str(local) if local.exists() else "flwr-clientapp"


def refuse(runtime_api_address: str, token: str, reason: str) -> None:
    """Answer the task with an error reply carrying `reason`; the app's code is never loaded.

    The reply lets the coordinator record why the site did not take part, instead of waiting for a
    reply that never comes.

    Args:
        runtime_api_address: The SuperNode's ClientApp API address.
        token: The task's token.
        reason: Why the site refuses the app, sent with an INVALID_FAB error.
    """
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    try:
        message, context, _run, _fab = pull_task_input(client)
        push_message(client, Message(Error(ErrorCode.INVALID_FAB, reason), reply_to=message), context)
        push_task_output(client, context, SubStatus.FAILED, reason)
    finally:
        client.close()


def run_gate(site_dir: Path, runtime_api_address: str, poll_interval: float = DEFAULT_POLL) -> None:
    """Serve ClientApp tasks of the SuperNode at `runtime_api_address` until killed.

    The warm worker is started ahead of the first task only when the site approved something, so a
    site that approved nothing pays no start-up cost for it.

    Args:
        site_dir: The site's directory, whose approvals decide each task.
        runtime_api_address: The SuperNode's ClientApp API address.
        poll_interval: Seconds to wait after a poll that found no task.
    """
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    worker = WarmWorker(runtime_api_address)
    approval = load_approval(site_dir)
    if approval.apps or approval.trusted_entities:
        worker.prepare()
    log.info("gate for site %s: approved apps %s", approval.site, [h[:12] for h in approval.apps])
    try:
        while True:
            worker.reap()
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                _dispatch(site_dir, runtime_api_address, worker, res.task.fab_hash, res.token)
            else:
                time.sleep(poll_interval)
    finally:
        worker.close()
        client.close()


def _dispatch(site_dir: Path, address: str, worker: WarmWorker, fab_hash: str, token: str) -> None:
    try:
        reason = load_approval(site_dir).app_refusal(fab_hash)
    except ApprovalError as exc:  # a broken site.toml approves nothing
        reason = f"site approval settings unreadable, refusing every app: {exc}"
    if reason:
        log.error("REFUSED: %s", reason)
        try:
            refuse(address, token, reason)
        except Exception as exc:  # the refusal stands even if its reply cannot be sent
            log.error("could not send the refusal reply: %s", exc)
        return
    log.info("running approved app %s", fab_hash[:12])
    worker.run(token)


def main(argv: list[str] | None = None) -> None:
    """`python -m client.deploy.gate`: the gate process `pmfl site start` launches next to the SuperNode.

    Checks the warm worker's patches of Flower's task code before serving anything, so a site whose
    tasks could not run does not start (see the module's docstring).

    Args:
        argv: The command-line arguments without the program name; sys.argv[1:] when None.

    Raises:
        SystemExit: With a one-line refusal when the patches cannot be applied, and with 0 on SIGTERM.
    """
    parser = argparse.ArgumentParser(description="pmfl site gate (SuperExec with app approval)")
    parser.add_argument("--site-dir", type=Path, required=True)
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [gate] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    if os.environ.get(WARM_ENV, "1") != "0":
        try:
            patches.check_clientapp_task()
        except patches.PatchError as exc:
            sys.exit(f"{REFUSAL}: {exc}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run `finally`: stop the warm worker too
    try:
        run_gate(args.site_dir, args.runtime_api_address, float(os.environ.get(POLL_ENV, DEFAULT_POLL)))
    except patches.PatchError as exc:
        sys.exit(f"{REFUSAL}: {exc}")


if __name__ == "__main__":
    main()
