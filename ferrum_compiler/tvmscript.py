"""TVMScript parsing without its frame source lookups.

Every ``@T.prim_func`` definition calls ``inspect.stack()`` and every ``T.macro`` use calls
``inspect.getouterframes``. Both look up the source lines of each frame on the stack, and for a frame
without a source file (the import machinery's, C code's) ``inspect.getmodule`` scans all of
``sys.modules``: a parse slows down as more modules are loaded. Under pytest, with torch and transformers
imported, eight GEMV kernels took 8.7 s to parse, 7.0 s of it in those lookups (cProfile). The parser reads only the
frames themselves (the locals and globals of enclosing scopes), and its check for a function defined in a
class accepts a frame without source context. Inside ``quick_frames()`` both functions return the frames
and nothing else.
"""

from __future__ import annotations

import inspect
import sys
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

_lock = threading.Lock()
_depth = 0  # quick_frames() contexts open, in any thread: the patch is on while one is
_saved: tuple = ()


def _outer_frames(frame: FrameType | None, context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.getouterframes`` without source context (``code_context`` and ``index`` None)."""
    out = []
    while frame is not None:
        out.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None, None))
        frame = frame.f_back
    return out


def _stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack`` without source context: the caller's frame first."""
    return _outer_frames(sys._getframe(1), context)


@contextmanager
def quick_frames() -> Iterator[None]:
    """Within the block ``inspect.stack`` and ``inspect.getouterframes`` skip the source lookups
    (process-wide, restored when the last open block ends)."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = (inspect.stack, inspect.getouterframes)
            inspect.stack, inspect.getouterframes = _stack, _outer_frames  # type: ignore[assignment]
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                inspect.stack, inspect.getouterframes = _saved  # type: ignore[assignment]
