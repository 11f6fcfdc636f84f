"""What code and which studies a hospital has approved: the `[approval]` table of its `site.toml`.

Why: in Flower's Deployment Engine the coordinator ships the app (a FAB) to the sites and the
SuperNode runs whatever arrives. A hospital approves a study app by its SHA-256 (the hash Flower
itself computes over the FAB, so the same source tree gives the same hash on both sides); the
site's gate (`client.gate`) refuses every other app before any of its code runs. Which studies
the approved app may run is checked inside the app (`client.site.resolve_site`).

```toml
[approval]
studies = ["heart-disease"]         # [study] names this site takes part in
apps = ["44844a4d...c8d5783236"]    # SHA-256 of each approved study app (FAB); `pmfl site approve`
# trusted_entities = "trusted-entities.yaml"  # Flower Hub publishers instead of pinned hashes
```
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pm_common.app_bundle import bundle_hash, packed_state
from pm_common.schema import Items, Rule, Text, check_table

SITE_TOML = "site.toml"
APPROVAL_RULES: dict[str, Rule] = {
    "apps": Items(Text(max_length=64, min_length=64, what="a SHA-256 hex digest"), 0, 10_000),
    "studies": Items(Text(max_length=100), 0, 10_000),
    "trusted_entities": Text(max_length=4096, what="a file path"),
}
_HASH = re.compile(r"^[0-9a-f]{64}$")
_HEADER = re.compile(r"^\s*\[{1,2}(?P<name>[^\]]+)\]{1,2}\s*(#.*)?$")
_APPS_LINE = re.compile(r"^(?P<indent>\s*)apps\s*=\s*\[(?P<body>[^\]]*)\]\s*(?P<comment>#.*)?$")


class ApprovalError(ValueError):
    """The site's approval settings are malformed, or an approval cannot be recorded."""


@dataclass(frozen=True)
class Approval:
    """A site's approvals. No approved app means the gate refuses everything: the default."""

    site: str
    apps: tuple[str, ...] = ()
    studies: tuple[str, ...] | None = None  # None: no `studies` key, any study of an approved app
    trusted_entities: Path | None = None

    def app_refusal(self, fab_hash: str) -> str:
        """Why this site refuses the app with `fab_hash`, or '' when it runs it."""
        if fab_hash in self.apps:
            return ""
        if self.trusted_entities is not None:
            return ""  # the SuperNode itself verified the publisher's signature before this point
        return (
            f"site {self.site!r} refuses study app {fab_hash}: the hospital has not approved this app "
            f"(approved: {', '.join(h[:12] for h in self.apps) or 'none'}). "
            "To run it, the site reviews the app and runs `pmfl site approve`."
        )

    def study_refusal(self, study: str) -> str:
        """Why this site refuses to take part in `study`, or '' when it does."""
        if self.studies is None or study in self.studies:
            return ""
        return (
            f"site {self.site!r} does not take part in study {study!r} "
            f"(its [approval] studies: {list(self.studies)})"
        )


def load_approval(site_dir: Path) -> Approval:
    """Read `[approval]` from the site's `site.toml` (re-read on every task: edits apply at once)."""
    path = Path(site_dir) / SITE_TOML
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ApprovalError(f"site config not found: {path}") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ApprovalError(f"{path}: not valid TOML ({exc})") from exc
    problems: list[str] = []
    table = check_table(raw.get("approval", {}), APPROVAL_RULES, "[approval]", problems)
    if problems or table is None:
        raise ApprovalError("\n".join(f"{path}: {problem}" for problem in problems))
    apps = tuple(h.lower() for h in table.get("apps", ()))
    bad = [h for h in apps if not _HASH.match(h)]
    if bad:
        raise ApprovalError(f"{path}: [approval] apps must be SHA-256 hex digests, got {bad}")
    trusted = table.get("trusted_entities")
    site = raw.get("site", {})
    name = site.get("name") if isinstance(site, dict) else None
    return Approval(
        site=name if isinstance(name, str) and name.isprintable() else path.parent.name,
        apps=apps,
        studies=table.get("studies"),
        trusted_entities=(path.parent / trusted).resolve() if trusted else None,
    )


def app_hash(app_dir: Path, site_dir: Path | None = None) -> str:
    """SHA-256 of the FAB that `flwr run APP_DIR` builds and sends (Flower's own, deterministic build).

    With `site_dir`, refuse when the site's own files would be packed into that app."""
    if site_dir is not None and (leak := packed_state(app_dir, site_dir)):
        raise ApprovalError(
            f"the app in {app_dir} would contain this site's files ({leak[0]}, ...): move the site "
            "directory out of the app's source tree, or under a folder git ignores"
        )
    return bundle_hash(app_dir)


def approve_app(site_dir: Path, fab_hash: str) -> bool:
    """Add `fab_hash` to `[approval] apps` in place, keeping the file's comments. False if present."""
    fab_hash = fab_hash.strip().lower()
    if not _HASH.match(fab_hash):
        raise ApprovalError(f"not a SHA-256 hex digest: {fab_hash!r}")
    return _edit_apps(site_dir, lambda apps: [*apps, fab_hash] if fab_hash not in apps else apps)


def revoke_app(site_dir: Path, fab_hash: str) -> bool:
    """Remove `fab_hash` from `[approval] apps`; the gate refuses the app from its next task on."""
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
