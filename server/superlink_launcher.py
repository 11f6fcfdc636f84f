"""`flower-superlink` whose Control and Runtime APIs answer this host only; the Fleet API answers all.

Why: Flower 1.42 serves three APIs on one HTTPS port: the Fleet API (`/v1/fleet/...`, the only one
SuperNodes use), the Control API (`/v1/control/...`: submit and stop runs, register SuperNode keys,
read logs; the open-source SuperLink has no user authentication for it) and the Runtime API
(`/v1/runtime/...`: the coordinator's ServerApp and SuperExec). It has no setting to bind them
apart: `--control-api-address` is deprecated and only used by a legacy gRPC server that an internal
variable (`FLWR_INTERNAL_GRPC_CONTROL_API`) starts, while the same routes stay on the shared port.
With `--host 0.0.0.0` anyone who reaches the port could register a key of their own, or run code on
the coordinator by submitting a ServerApp. This launcher adds one ASGI middleware to the app that
Flower builds (`flwr.superlink.main.create_app`) and then runs Flower's own `flower-superlink`
unchanged: a request outside `/v1/fleet/` from another host gets 403.

"This host": a loopback peer, or a peer with the address the connection arrived at (a process here
that dialed one of the machine's own addresses). A reverse proxy on this host would make every
request local: put the proxy's own path filter in front instead.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PREFIX = "/v1/fleet/"  # what SuperNodes call; everything else is for this host's processes


class LocalOnlyOutsideFleet:
    """ASGI middleware: 403 for non-Fleet requests from other hosts; everything else passes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PREFIX) or is_local(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "this API answers the coordinator's own host only"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def is_local(scope: Scope) -> bool:
    """Whether the request's peer is this host (see the module docstring)."""
    peer, own = _address(scope.get("client")), _address(scope.get("server"))
    if peer is None:
        return False  # a peer without an IP address (e.g. a Unix socket) is not trusted blindly
    return peer.is_loopback or peer == own


def _address(endpoint: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(endpoint[0])
    except (TypeError, IndexError, ValueError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def patch_create_app() -> bool:
    """Make Flower's SuperLink app factory add the middleware; False if this Flower has none."""
    from flwr.superlink import main as superlink_main

    create_app = getattr(superlink_main, "create_app", None)
    if not callable(create_app):
        return False

    def create_local_only_app(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)
        app.add_middleware(LocalOnlyOutsideFleet)
        return app

    superlink_main.create_app = create_local_only_app  # type: ignore[attr-defined]
    return True


def main() -> None:
    import sys

    from flwr.superlink.cli.flower_superlink import flower_superlink

    if not patch_create_app():
        sys.exit("this Flower version's SuperLink has no app factory to restrict; refusing to start")
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
