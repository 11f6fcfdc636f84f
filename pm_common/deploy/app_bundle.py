"""What `flwr run` packs into the study app: its hash, and whether local state would ride along.

Why: Flower builds the app bundle (FAB) from the files under the app's source directory that match
`[tool.flwr.app] fab-include` in its pyproject.toml (pmfl's: the `client`, `server` and `pm_common`
packages), are of a type Flower packs (`*.py`, `*.toml`, `*.md`, `*.json`, ...) and that git does
not ignore. A coordinator or site directory inside those packages (its `site.toml`, ledgers,
accountant state, unpacked apps) would be shipped to every site and would change the hash the sites
approved. Both sides check before they build or approve.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path


def build_bundle(app_dir: Path) -> bytes:
    """The FAB exactly as `flwr run APP_DIR` builds it (Flower's own deterministic builder)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir).resolve())


def bundle_hash(app_dir: Path) -> str:
    """SHA-256 of the FAB: the hash the SuperLink and every SuperNode compute for the app."""
    return hashlib.sha256(build_bundle(app_dir)).hexdigest()


def bundle_files(app_dir: Path) -> list[str]:
    """The paths inside the bundle of `app_dir` (Flower's manifest `.info/CONTENT` included)."""
    return zipfile.ZipFile(io.BytesIO(build_bundle(app_dir))).namelist()


def packed_state(app_dir: Path, *state_dirs: Path) -> list[str]:
    """Files of `state_dirs` that the bundle of `app_dir` would contain (should be none)."""
    app = Path(app_dir).resolve()
    inside = [
        Path(d).resolve().relative_to(app).as_posix()
        for d in state_dirs
        if Path(d).resolve().is_relative_to(app)
    ]
    if not inside:
        return []
    return [n for n in bundle_files(app) if any(n == d or n.startswith(d + "/") for d in inside)]
