"""How a run's settings reach the ServerApp and the ClientApp: Flower's run config, read in one place.

Why one place: a study's settings used to reach the apps through environment variables, a module
global, a re-read of the study file and the run config, each read where it was needed. Now there is
one channel, Flower's own run config (`[tool.flwr.app.config]` in pyproject.toml, overridden by
`flwr run --run-config` or by `pmfl simulate`, which sets the same keys), and one resolver, `of`.

Keys:
- `study`: path of the study file (the ServerApp reads it; a simulated site finds its `[[sites]]`
  entry in it);
- `run-dir`: the coordinator's run directory;
- `sites-dir`: where simulated hospitals keep their directories (default: `run-dir`/simulated-sites);
- `resume`: continue the run in `run-dir` from its last checkpoint;
- `expected-sites`: deployment: sites to wait for before round 1 (0: the study's min_sites);
- `round-timeout`: seconds to wait for a round's replies;
- `record-updates-of`: empirical audit only: the one site whose individual updates the coordinator keeps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pm_common.study.config import StudyConfigError

SIMULATED_SITES = "simulated-sites"
"""Under the run directory, unless `sites-dir` says otherwise: one directory per simulated hospital."""

DEFAULT_ROUND_TIMEOUT = 3600.0


@dataclass(frozen=True)
class RunSettings:
    """What the coordinator and the simulated sites of one run are told about it."""

    study: Path | None
    run_dir: Path
    sites_dir: Path
    resume: bool = False
    expected_sites: int = 0
    round_timeout: float = DEFAULT_ROUND_TIMEOUT
    record_updates_of: str = ""

    @classmethod
    def of(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """The settings a run config carries (keys as in the module docstring; missing ones default).

        Args:
            run_config: Flower's `context.run_config`.

        Returns:
            The run's settings.

        Raises:
            StudyConfigError: a value of the wrong type.
        """
        try:
            run_dir = Path(str(run_config.get("run-dir", "") or "runs/latest"))
            sites = str(run_config.get("sites-dir", "") or "")
            study = str(run_config.get("study", "") or "")
            return cls(
                study=Path(study) if study else None,
                run_dir=run_dir,
                sites_dir=Path(sites) if sites else run_dir / SIMULATED_SITES,
                resume=_flag(run_config.get("resume", False)),
                expected_sites=int(run_config.get("expected-sites", 0) or 0),
                round_timeout=float(run_config.get("round-timeout", 0) or DEFAULT_ROUND_TIMEOUT),
                record_updates_of=str(run_config.get("record-updates-of", "") or ""),
            )
        except (TypeError, ValueError) as exc:
            raise StudyConfigError(f"run config: {exc}") from None

    def study_path(self) -> Path:
        """The study file.

        Raises:
            StudyConfigError: the run config names none.
        """
        if self.study is None:
            raise StudyConfigError("no study configured: pass --run-config \"study='STUDY.toml'\"")
        return self.study

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """The run config that carries these settings (what `flwr run --run-config` would set)."""
        return {
            "study": str(self.study or ""),
            "run-dir": str(self.run_dir),
            "sites-dir": str(self.sites_dir),
            "resume": self.resume,
            "expected-sites": self.expected_sites,
            "round-timeout": self.round_timeout,
            "record-updates-of": self.record_updates_of,
        }


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", ""):
        return value.lower() in ("true", "1")
    raise ValueError(f"resume must be true or false, got {value!r}")
