"""Recording a hospital's approval of a study app: its hash, and the edit of `[approval] apps`.

Site tooling (`pmfl site approve`), outside the study app itself: the ClientApp only reads the
approvals (client/approval.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from client.approval import SHA256_HEX, SITE_TOML, ApprovalError, load_approval
from pm_common.deploy.app_bundle import bundle_hash, packed_state

_HEADER = re.compile(r"^\s*\[{1,2}(?P<name>[^\]]+)\]{1,2}\s*(#.*)?$")
_APPS_LINE = re.compile(r"^(?P<indent>\s*)apps\s*=\s*\[(?P<body>[^\]]*)\]\s*(?P<comment>#.*)?$")


def app_hash(app_dir: Path, site_dir: Path | None = None) -> str:
    """SHA-256 of the FAB that `flwr run APP_DIR` builds and sends (Flower's own, deterministic build).

    With `site_dir`, refuse when the site's own files would be packed into that app.

    Args:
        app_dir: The study app's source tree.
        site_dir: The site's directory, to check that none of its files (keys, data, ledgers) would
            leave the site inside the app; None to skip the check.

    Returns:
        The FAB's SHA-256, hex: what the site approves and the gate compares.

    Raises:
        ApprovalError: When the app would contain files of the site's directory.
    """
    if site_dir is not None and (leak := packed_state(app_dir, site_dir)):
        raise ApprovalError(
            f"the app in {app_dir} would contain this site's files ({leak[0]}, ...): move the site "
            "directory out of the app's source tree, or under a folder git ignores"
        )
    return bundle_hash(app_dir)


def approve_app(site_dir: Path, fab_hash: str) -> bool:
    """Add `fab_hash` to `[approval] apps` in place, keeping the file's comments. False if present.

    Args:
        site_dir: The site's directory (its site.toml is edited).
        fab_hash: The app's SHA-256, hex (case and surrounding spaces are ignored).

    Returns:
        True when the hash was added, False when it was approved already.

    Raises:
        ApprovalError: When `fab_hash` is not a SHA-256 hex digest.
    """
    fab_hash = fab_hash.strip().lower()
    if not SHA256_HEX.match(fab_hash):
        raise ApprovalError(f"not a SHA-256 hex digest: {fab_hash!r}")
    return _edit_apps(site_dir, lambda apps: [*apps, fab_hash] if fab_hash not in apps else apps)


def revoke_app(site_dir: Path, fab_hash: str) -> bool:
    """Remove `fab_hash` from `[approval] apps`; the gate refuses the app from its next task on.

    Args:
        site_dir: The site's directory (its site.toml is edited).
        fab_hash: The app's SHA-256, hex (case and surrounding spaces are ignored).

    Returns:
        True when the hash was removed, False when it was not approved.
    """
    fab_hash = fab_hash.strip().lower()
    return _edit_apps(site_dir, lambda apps: [h for h in apps if h != fab_hash])


def _edit_apps(site_dir: Path, change) -> bool:  # type: ignore[no-untyped-def]
    path = Path(site_dir) / SITE_TOML
    current = list(load_approval(site_dir).apps)
    updated = change(current)
    if updated == current:
        return False
    lines = path.read_text(encoding="utf-8").splitlines()
    section = None
    for i, line in enumerate(lines):
        header = _HEADER.match(line)
        if header:
            section = header["name"].strip()
            continue
        match = _APPS_LINE.match(line)
        if section == "approval" and match:
            comment = f"  {match['comment']}" if match["comment"] else ""
            body = ", ".join(f'"{h}"' for h in updated)
            lines[i] = f"{match['indent']}apps = [{body}]{comment}"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            if list(load_approval(site_dir).apps) != updated:  # pragma: no cover - defensive
                raise ApprovalError(f"{path}: could not update [approval] apps")
            return True
    raise ApprovalError(f"{path}: no one-line `apps = [...]` in [approval]; add the hash to the list by hand")
