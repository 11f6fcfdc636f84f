"""Network namespaces for tests: each "host" gets its own network stack and address on a private LAN.

Why: a test whose coordinator and sites all share 127.0.0.1 cannot tell a request from another host
from one of the coordinator's own processes, and never exercises bind addresses, certificate names
or reachability. Here each host is a network namespace with its own loopback, its own ports and an
address on a bridge; the bridge lives in a namespace of its own, so nothing touches the machine's
own interfaces or firewall, and the same subnet can be used by several test runs at once.

Needs root and iproute2 (`ip netns`). Without them the tests that need a network skip with the
reason, or fail when `PMFL_REQUIRE_NETNS=1` (`.ci/run` sets it).

Two ways to run something on a host: `Host.exec_prefix()` / `Host.popen()` (a command under
`ip netns exec`), and `Host.entered()`, which moves the calling thread into the namespace for a
`with` block: sockets it opens and processes it starts (e.g. through `start_site` or Flower's
Control API client in this process) are on that host. Everything is removed on `Network.close()`,
also after a failed test: processes still inside the namespaces are killed, the namespaces deleted
(which deletes their links and the bridge).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

REQUIRE_ENV = "PMFL_REQUIRE_NETNS"  # "1": fail instead of skip when namespaces cannot be created
SUBNET = "10.231.0"  # a /24 on the test's own bridge, not routed anywhere
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/var/run/netns"
_OURS = re.compile(r"^pmfl-t(\d+)-")
_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2, or no permission)."""


def _ip(*args: str) -> str:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise NetnsUnavailable("iproute2's `ip` is not installed") from exc
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@dataclass(frozen=True)
class Host:
    """One host of the test network: a namespace `name` with the address `address`."""

    name: str
    address: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `cmd` on this host (`ip netns exec` replaces itself with `cmd`: same pid)."""
        return subprocess.Popen([*self.exec_prefix(), *cmd], **kwargs)

    def run(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run([*self.exec_prefix(), *cmd], **kwargs)

    @contextlib.contextmanager
    def entered(self) -> Iterator[Host]:
        """Run the calling thread on this host for the `with` block."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(os.path.join(_NETNS_DIR, self.name), os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield self
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)

    def listening(self, address: str, port: int) -> bool:
        """Whether a TCP connection from this host to address:port succeeds."""
        with self.entered(), socket.socket() as sock:
            sock.settimeout(2)
            return sock.connect_ex((address, port)) == 0


class Network:
    """Hosts on one private LAN: a bridge in its own namespace, each host a namespace on it."""

    def __init__(self, label: str) -> None:
        _remove_stale()
        self.prefix = f"pmfl-t{os.getpid()}-{next(_counter)}-{label}"
        self.switch = f"{self.prefix}-switch"
        self.hosts: list[Host] = []
        self.namespaces: list[str] = []
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, role: str) -> Host:
        """A new host on the LAN, with the next address (10.231.0.2, .3, ...)."""
        index = len(self.hosts)
        host = Host(f"{self.prefix}-{role}", f"{SUBNET}.{index + 2}")
        port = f"h{index}"
        self._add_namespace(host.name)
        veth = ("type", "veth", "peer", "name", port, "netns", self.switch)
        _ip("link", "add", "eth0", "netns", host.name, *veth)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.name, "link", "set", "eth0", "up")
        _ip("-n", host.name, "link", "set", "lo", "up")
        self.hosts.append(host)
        return host

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)

    def close(self) -> None:
        """Kill what still runs on these hosts, then delete every namespace (links go with them)."""
        for name in reversed(self.namespaces):
            _kill_inside(name)
            with contextlib.suppress(NetnsUnavailable):
                _ip("netns", "del", name)
        self.namespaces.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_inside(name: str) -> None:
    """SIGKILL every process still in namespace `name` (all started by the test that made it)."""
    for _ in range(3):
        try:
            pids = [int(p) for p in _ip("netns", "pids", name).split()]
        except NetnsUnavailable:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _remove_stale() -> None:
    """Delete namespaces left by an earlier test process of ours that was killed (its pid is gone)."""
    try:
        names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
    except NetnsUnavailable:
        return
    for name in names:
        match = _OURS.match(name)
        if match and not _alive(int(match.group(1))):
            _kill_inside(name)
            with contextlib.suppress(NetnsUnavailable):
                _ip("netns", "del", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def network_or_skip(label: str) -> Network:
    """A new `Network`, or skip the test (fail under PMFL_REQUIRE_NETNS=1) when namespaces are
    unavailable here."""
    try:
        return Network(label)
    except NetnsUnavailable as exc:
        reason = f"network namespaces unavailable (needs root and iproute2): {exc}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
