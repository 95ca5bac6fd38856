"""Every environment variable ferrum reads, in one place (all prefixed FERRUM_)."""

from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


DEBUG = _flag("FERRUM_DEBUG")  # show tracebacks instead of one-line errors
