"""Built-in studies a researcher can simulate by name."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pm_common.study.config import StudyConfig, load_study, study_from_dict

_HERE = Path(__file__).parent

SCENARIOS: dict[str, Path] = {
    "heart-disease": _HERE / "heart_disease.toml",
    "heart-disease-severity": _HERE / "heart_disease_severity.toml",
    "diabetes-progression": _HERE / "diabetes_progression.toml",
    "tcga-brca": _HERE / "tcga_brca.toml",
    "imaging-synthetic": _HERE / "imaging_synthetic.toml",
}
SYNTHETIC = frozenset({"imaging-synthetic"})


def scenario_path(name: str) -> Path:
    """The study file of a built-in scenario.

    Args:
        name: The scenario's name (a key of SCENARIOS).

    Returns:
        The path of its TOML.

    Raises:
        ValueError: When there is no such scenario; the message lists the built-in ones.
    """
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; built-in: {sorted(SCENARIOS)}") from None


def scenario_study(name: str, out_dir: Path) -> StudyConfig:
    """The scenario's study, its data generated under `out_dir` first when it is synthetic.

    Synthetic data is generated at run time rather than shipped, so a researcher can simulate a study
    without any real data.

    Args:
        name: The scenario's name.
        out_dir: The directory the synthetic data goes under (in synthetic-data/).

    Returns:
        The study, with its sites pointing at the generated files when the scenario is synthetic.
    """
    path = scenario_path(name)
    if name not in SYNTHETIC:
        return load_study(path)
    from pm_common.data.synthetic_imaging import generate_federation

    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    options = raw.pop("synthetic", {})
    data_dir = Path(out_dir).resolve() / "synthetic-data"
    files = generate_federation(data_dir, num_sites=int(options.get("num_sites", 4)),
                               image_size=int(options.get("image_size", 64)),
                               dirichlet_alpha=float(options.get("dirichlet_alpha", 1.0)),
                               seed=int(options.get("seed", 0)))
    raw["sites"] = [{"name": f.stem, "data": str(f), "format": "npz"} for f in files]
    return study_from_dict(raw, path.parent)
