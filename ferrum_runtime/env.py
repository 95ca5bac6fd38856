"""Every environment variable ferrum reads, in one place (all prefixed FERRUM_)."""

from __future__ import annotations

import os
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


DEBUG = _flag("FERRUM_DEBUG")  # show tracebacks instead of one-line errors


def cache_dir() -> Path:
    """FERRUM_CACHE, else $XDG_CACHE_HOME/ferrum, else ~/.cache/ferrum: compiled aliases, build helpers."""
    if os.environ.get("FERRUM_CACHE"):
        return Path(os.environ["FERRUM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ferrum"
