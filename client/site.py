"""Who this site is and where its data and state live: the hospital's settings, not the server's.

A deployed site is a directory with its own `site.toml` (`--node-config site-dir=...`): its data
path, budget and round limit never come from the coordinator. A simulated site is one `[[sites]]`
entry of the study the run config names (picked by Flower's partition id), and keeps its records in
a directory of its own under the run config's `sites-dir`, laid out as a deployed site's
(pm_common/study/run_settings.py: the one place the run config is read).
"""

from __future__ import annotations

import functools
import logging
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import Context

from client.approval import load_approval
from client.state import DirectoryStateStore, StateStore
from pm_common.study.config import (
    PRIVACY_RULES,
    SITE_RULES,
    PrivacySettings,
    SiteSpec,
    StudyConfig,
    StudyConfigError,
    load_study,
    number_format_problem,
    study_from_dict,
    text_encoding,
)
from pm_common.study.run_settings import RunSettings
from pm_common.study.schema import InputError, Rule, check_table, read_toml, show, table_place
from pm_common.tasks import SiteTensors, task_of

log = logging.getLogger("pmfl.client")



SITE_TABLES = ("site", "privacy", "approval", "connection")
SITE_TABLE_RULES: dict[str, Rule] = {
    k: SITE_RULES[k] for k in ("name", "data", "test_data", "delimiter", "encoding", "thousands", "decimal")
}


def read_site_toml(path: Path) -> dict[str, Any]:
    """The site's `site.toml` as loaded; its top level holds only the site's four tables.

    Raises:
        StudyConfigError: the file is missing, not TOML, or has unknown top-level tables.
    """
    try:
        raw = read_toml(path, " (create it with `pmfl site init`)")
    except InputError as exc:
        raise StudyConfigError(exc.problems, source=exc.source) from None
    unknown = [key for key in raw if key not in SITE_TABLES]
    if unknown:
        allowed = ", ".join(f"[{t}]" for t in SITE_TABLES)
        lines = [f"{table_place(key)}: unknown table; allowed: {allowed}" for key in unknown]
        raise StudyConfigError(lines, source=path)
    return raw


def load_site_config(site_dir: Path) -> SiteSpec:
    """Read a deployed site's `site.toml`: name, data file and the site's own privacy budget.

    Raises:
        StudyConfigError: every problem of `[site]` and `[privacy]` (and unknown tables), one line each.
    """
    path = Path(site_dir) / "site.toml"
    raw = read_site_toml(path)
    problems: list[str] = []
    site = check_table(raw.get("site", {}), SITE_TABLE_RULES, "[site]", problems, required=("name", "data"))
    privacy = check_table(raw.get("privacy", {}), PRIVACY_RULES, "[privacy]", problems)
    if site is not None and "encoding" in site and not text_encoding(site["encoding"]):
        found = show(site["encoding"])
        problems.append(f"[site].encoding: got {found}; expected the name of a text encoding")
    number_problem = number_format_problem(site, "[site]") if site is not None else None
    if number_problem:
        problems.append(number_problem)
    if problems or site is None or privacy is None:
        raise StudyConfigError(problems, source=path)
    return SiteSpec(
        name=site["name"],
        data=(path.parent / site["data"]).resolve(),
        privacy=replace(PrivacySettings(), **privacy),
        delimiter=site.get("delimiter", ","),
        encoding=site.get("encoding", "utf-8"),
        test_data=(path.parent / site["test_data"]).resolve() if "test_data" in site else None,
        thousands=site.get("thousands", ""),
        decimal=site.get("decimal", "."),
    )


def resolve_site(context: Context, study_name: str) -> tuple[SiteSpec, StateStore]:
    """This node's site settings and its privacy-state store for `study_name`.

    Args:
        context: the node's Flower context (`site-dir` in its node config when deployed; the run
            config names the study when simulated).
        study_name: the study the message is for (its state lives under `state/<study>/`).

    Returns:
        The site's settings and the store of its privacy state, ledger and key.

    Raises:
        StudyConfigError: the site refuses the study, or its settings cannot be read.
    """
    site_dir = context.node_config.get("site-dir")
    if site_dir:
        spec = load_site_config(Path(str(site_dir)))
        root = Path(str(site_dir))
        refusal = load_approval(root).study_refusal(study_name)
        if refusal:  # the hospital's own list of studies, checked before any of its data is read
            raise StudyConfigError(refusal)
        return spec, DirectoryStateStore(root / "state" / study_name, root / "keys")
    settings = RunSettings.of(context.run_config)
    study = _cached_study(settings.study_path())
    partition = int(context.node_config.get("partition-id", 0))
    if partition >= len(study.sites):
        raise StudyConfigError(
            f"simulated node {partition} has no [[sites]] entry: the study declares {len(study.sites)} sites"
        )
    spec = study.sites[partition]
    root = settings.sites_dir / spec.name  # a simulated hospital keeps its records apart, as a real one
    return spec, DirectoryStateStore(root / "state" / study_name, root / "keys")


@functools.lru_cache(maxsize=4)
def _cached_study(path: Path) -> StudyConfig:
    return load_study(path)


@functools.lru_cache(maxsize=16)
def load_site_data(spec: SiteSpec, study_text: str) -> SiteTensors:
    """Validate, encode and split the site's data once per worker process (Flower calls the
    ClientApp afresh for every message; re-reading the files each round would dominate a round)."""
    study = parse_study_text(study_text)
    data = task_of(study).load_site(spec, study)
    if data.skipped:  # the site chose to skip unusable files; say which, never silently
        log.warning(
            "site %s: %d unusable image file(s) left out (on_bad_file = \"skip\"):\n%s",
            spec.name,
            len(data.skipped),
            "\n".join(f"  {name}: {why}" for name, why in data.skipped),
        )
    return data


@functools.lru_cache(maxsize=4)
def parse_study_text(text: str) -> StudyConfig:
    """The study as the coordinator sent it: contract or image spec, model and training."""
    return study_from_dict(tomllib.loads(text), Path("."))
