"""Built-in studies a researcher can simulate by name."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent

SCENARIOS: dict[str, Path] = {
    "heart-disease": _HERE / "heart_disease.toml",
}


def scenario_path(name: str) -> Path:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; built-in: {sorted(SCENARIOS)}") from None
