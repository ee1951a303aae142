"""The one data directory and the config file location.

`CROFTER_HOME` puts everything (data and config) under one folder, which is what
the tests do; otherwise the XDG locations from platformdirs are used, e.g.
``~/.local/share/crofter`` and ``~/.config/crofter/config.toml`` on Linux.
"""
from __future__ import annotations

import os
from pathlib import Path

APP = "crofter"


def data_dir() -> Path:
    """Root of everything crofter stores: registry, pulled models, history, indexes."""
    home = os.environ.get("CROFTER_HOME")
    if home:
        path = Path(home).expanduser()
    else:
        from platformdirs import user_data_path

        path = user_data_path(APP)
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_path() -> Path:
    """The TOML settings file (it may not exist yet)."""
    home = os.environ.get("CROFTER_HOME")
    if home:
        return Path(home).expanduser() / "config.toml"
    from platformdirs import user_config_path

    return user_config_path(APP) / "config.toml"


def models_dir() -> Path:
    """Where `crofter models pull` and the converters put model files."""
    path = data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
