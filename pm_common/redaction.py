"""What of an error may leave the place it happened: one line, no traceback, no paths, no values.

Why: an exception's message and traceback can quote the data it was handling (a patient's cell
value, a local variable, a file path at the hospital). Three places show errors to someone else:
a site's error reply to the coordinator (client.errors), the coordinator's record of failures
(server.recorder, metrics.json) and the command line (pmfl.cli). Each keeps the full traceback
where it happened, in that machine's own log, and passes on only what is here.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

SAFE_MESSAGE_ERRORS = frozenset(
    {
        "pm_common.study.schema.InputError",  # study files, contracts, site.toml: settings, never data
        "client.approval.ApprovalError",
        "client.deploy.site_dir.SiteAdminError",
        "server.deploy.coordinator.CoordinatorError",
        "server.deploy.pki.PkiError",
        "simulations.runner.SimulationError",
        "pm_common.secagg.primitives.SecAggError",  # protocol steps, node ids and counts
        "pm_common.privacy.accountant.BudgetTooLow",  # a budget and a plan, never the site's data
        "client.enrollment.SiteRefusal",  # runs, rounds and rosters a site refuses to answer
    }
)
"""pmfl's own error types whose messages are written for people and never quote patient data (they
name settings, files, sites and steps). Named, not imported: checking them imports nothing heavy."""

MAX_REASON = 300  # characters of a failure reason kept in metrics.json
TRACEBACK = "Traceback (most recent call last)"
_FLOWER_WRAPPED = re.compile(r"<class '(?P<type>[\w.]+)'>:<'")  # Flower's "<class 'T'>:<'message'>"
_PATH = re.compile(r"(?<![\w<>.])(?:[A-Za-z]:\\|~/|\.{1,2}/|/)[^\s'\",;:()\[\]{}<>]*")
_REPO = Path(__file__).resolve().parents[1]


def is_safe_error(exc: BaseException) -> bool:
    """True when `exc` is one of pmfl's own error types whose messages are safe to show."""
    return any(f"{cls.__module__}.{cls.__qualname__}" in SAFE_MESSAGE_ERRORS for cls in type(exc).__mro__)


def scrub_paths(text: str) -> str:
    """Replace file paths (absolute, `~/`, `./`, `../`, `C:\\`) with `<path>`."""
    return _PATH.sub("<path>", text)


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """The first non-empty line of `text`, control characters replaced, at most `limit` characters."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    line = "".join(ch if ch.isprintable() else "?" for ch in line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _exception_type(line: str) -> str:
    """`pandas.errors.ParserError: ...` gives `ParserError`."""
    head = line.strip().split(":", 1)[0].strip()
    return head.rsplit(".", 1)[-1] if re.fullmatch(r"[\w.]+", head) else "an exception"


def failure_reason(reason: str) -> str:
    """A failure as the coordinator records it, whatever a site's error reply says.

    A traceback is reduced to its exception's type; Flower's wrapper of an exception that escaped a
    ClientApp (`<class 'T'>:<'message'>`) keeps only the type: its message was never written to be
    shared.

    Args:
        reason: the failure as described, e.g. `node 7: ` and a reply's error reason.

    Returns:
        One line of at most MAX_REASON characters, paths replaced by `<path>`.
    """
    text = str(reason)
    if TRACEBACK in text:
        head, _, tail = text.partition(TRACEBACK)
        lines = [line for line in tail.splitlines() if line.strip()]
        kind = _exception_type(lines[-1]) if lines else "an exception"
        text = f"{one_line(head)} {kind} (traceback withheld)".strip()
    wrapped = _FLOWER_WRAPPED.search(text)
    if wrapped:
        kind = wrapped["type"].rsplit(".", 1)[-1]
        text = (f"{text[: wrapped.start()]}{kind} at the site (message withheld: an exception escaped the "
                "ClientApp and may quote data; details in the site's log)")
    return one_line(scrub_paths(text))


def code_location(exc: BaseException) -> str:
    """Where `exc` was raised: the innermost frame in pmfl's own code (`server/recorder.py:123`),
    else the innermost frame's file name."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = Path(frame.filename)
        installed = {".venv", "site-packages"} & set(path.parts)
        if path.is_absolute() and path.is_relative_to(_REPO) and not installed:
            return f"{path.relative_to(_REPO).as_posix()}:{frame.lineno}"
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "unknown place"


def internal_error_line(exc: BaseException, program: str = "pmfl") -> str:
    """The one line a command prints for an exception it did not expect.

    Args:
        exc: the exception that escaped the command.
        program: the command's name, first on the line.

    Returns:
        Its type and place, never its message (which can hold values), and how to see the traceback.
    """
    return (
        f"{program}: internal error ({type(exc).__name__} in {code_location(exc)}); set PMFL_DEBUG=1 "
        "to see the traceback, which may show data values"
    )
