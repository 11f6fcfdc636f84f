"""Starting Flower's own commands from pmfl, in this Python environment even when it is not activated."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN_DIR = Path(sys.executable).parent


def console_script(name: str) -> str:
    """A console script of this Python environment (the venv's, even when it is not activated)."""
    local = BIN_DIR / name
    return str(local) if local.exists() else name


def flower_env(**extra: str) -> dict[str, str]:
    """The environment for Flower's processes: this environment's scripts first on PATH (the
    SuperLink itself starts `flower-superexec` by name), telemetry and update checks off."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN_DIR), env.get("PATH", "")])
    env.update({
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        **extra,
    })
    return env
