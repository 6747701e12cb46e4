"""Where the real public data sets live (`../shared/data` beside the project, by default)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_data_root() -> Path:
    """Return the shared data folder: `$PAPSCAN_DATA_ROOT`, else `<project>/../shared/data`."""
    env = os.environ.get("PAPSCAN_DATA_ROOT")
    if env:
        return Path(env)
    return PROJECT_ROOT.parent / "shared" / "data"
