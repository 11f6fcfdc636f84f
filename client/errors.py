"""The site's error replies: no patient value leaves the hospital in a failure reason.

Why a mod: when a ClientApp handler raises, Flower itself builds the error reply from the exception,
`str(type(ex)) + ":<'" + str(ex) + "'>"`, in simulation (flwr/server/superlink/fleet/vce/vce_api.py,
after flwr/simulation/ray_transport/ray_actor.py wraps it in a ClientAppException) and in deployment
(flwr/supernode/runtime/run_clientapp.py), and logs the traceback. Messages such as a
DataValidationError's quote the site's cells. This mod, the outermost of the hospital's ClientApp,
catches every exception first, so Flower never sees one: it logs the full traceback here, at the
site (logger `pmfl.client`), and replies with an error whose reason is one line without values.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from pm_common.data.imaging import ImageDataError
from pm_common.data.tabular import DataValidationError
from pm_common.redaction import is_safe_error, one_line, scrub_paths

log = logging.getLogger("pmfl.client")
DETAILS = "details in the site's log"


def safe_reason(exc: BaseException) -> str:
    """The one line a site may send about `exc`.

    pmfl's refusals (study, contract, approval, secure aggregation) keep their message, paths
    removed; a data problem says how many problems in which of the contract's columns; anything
    else only its type.

    Args:
        exc: what a handler raised.

    Returns:
        A reason without patient values, tracebacks or paths.
    """
    if isinstance(exc, DataValidationError):
        columns = sorted({p.column for p in exc.problems if p.column})  # the contract's names only
        where = f" in columns {columns}" if columns else ""
        return (f"the site's data does not fit the study's contract: {len(exc.problems)} problem(s){where} "
                f"({DETAILS})")
    if isinstance(exc, ImageDataError):
        count = len(exc.problems) or 1
        return f"the site's image data cannot be used as the study asks: {count} problem(s) ({DETAILS})"
    if is_safe_error(exc):
        reason = one_line(scrub_paths(str(exc)))
        more = len(getattr(exc, "problems", ())) - 1
        return f"{reason} (and {more} more problem(s), {DETAILS})" if more > 0 else reason
    return f"{type(exc).__name__} at the site ({DETAILS})"


def error_reply_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: any exception of the handlers becomes a logged traceback here and an error
    reply (Flower's CLIENT_APP_RAISED_EXCEPTION code) with `safe_reason` as its reason.

    Args:
        msg: the coordinator's message.
        context: the node's context (its state is kept as the handler left it: a spend the site
            saved before failing stays on its books).
        call_next: the handlers (and inner mods).

    Returns:
        The handler's reply, or the error reply.
    """
    try:
        return call_next(msg, context)
    except Exception as exc:
        reason = safe_reason(exc)
        log.error("%s message failed at this site; the coordinator is told: %s",
                  msg.metadata.message_type, reason, exc_info=exc)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
