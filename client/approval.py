"""What code and which studies a hospital has approved: the `[approval]` table of its `site.toml`.

Why: in Flower's Deployment Engine the coordinator ships the app (a FAB) to the sites and the
SuperNode runs whatever arrives. A hospital approves a study app by its SHA-256 (the hash Flower
itself computes over the FAB, so the same source tree gives the same hash on both sides); the
site's gate (`client.deploy.gate`) refuses every other app before any of its code runs. Which studies
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
from dataclasses import dataclass
from pathlib import Path

from pm_common.study.schema import InputError, Items, Rule, Text, check_table, read_toml

SITE_TOML = "site.toml"
APPROVAL_RULES: dict[str, Rule] = {
    "apps": Items(Text(max_length=64, min_length=64, what="a SHA-256 hex digest"), 0, 10_000),
    "studies": Items(Text(max_length=100), 0, 10_000),
    "trusted_entities": Text(max_length=4096, what="a file path"),
}
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


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
        raw = read_toml(path)
    except InputError as exc:
        raise ApprovalError(str(exc)) from None
    problems: list[str] = []
    table = check_table(raw.get("approval", {}), APPROVAL_RULES, "[approval]", problems)
    if problems or table is None:
        raise ApprovalError("\n".join(f"{path}: {problem}" for problem in problems))
    apps = tuple(h.lower() for h in table.get("apps", ()))
    bad = [h for h in apps if not SHA256_HEX.match(h)]
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
