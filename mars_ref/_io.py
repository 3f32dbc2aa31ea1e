"""Files: where mars_ref keeps what it makes once per machine (compiled kernels, downloads)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where downloads and compiled kernels are kept: ``$MARS_REF_CACHE``, else
    ``${XDG_CACHE_HOME:-~/.cache}/mars_ref``."""
    if os.environ.get("MARS_REF_CACHE"):
        return Path(os.environ["MARS_REF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mars_ref"
