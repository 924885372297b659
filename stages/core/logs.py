"""What a person sees on stderr while a stage runs: log lines, Python warnings and progress bars.

Stages log with ``logging.getLogger(__name__)`` (progress notes at INFO, details at DEBUG, trouble at WARNING) and
wrap their loops in ``progress(...)`` instead of calling tqdm. Results (a stage's summary) are not logs: the CLI
prints them on stdout. Used as a library, nothing here is switched on: log records go wherever the application
sends them (Python's default shows warnings and errors only) and bars show on a terminal only.

The ``spp`` CLI calls ``configure``: one handler on stderr that prints ``warning: <message>`` / ``error:
<message>`` / plain info lines (``debug: [logger] <message>`` with -v), every Python warning (ours, sklearn's,
torch's) as one ``warning: <message>`` line without its source line, and a progress switch:

- ``SPP_PROGRESS`` (or ``spp --progress/--no-progress``): ``1`` shows bars even when stderr is not a terminal,
  ``0`` never; unset (auto): bars only when stderr is a terminal. A bar asked for on a non-terminal (a log file, a
  pipe) prints one plain line per update at most every ``LOG_INTERVAL_S`` seconds instead of rewriting one line
  with carriage returns (which a log file keeps as one line of thousands of characters).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any, Callable, Iterable

PROGRESS_ENV = "SPP_PROGRESS"
LOG_INTERVAL_S = 30.0  # a bar on a non-terminal prints at most one line this often
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
OUR_LOGGERS = ("stages", "sppcli")

_forced_progress: bool | None = None  # set by ``configure`` (the CLI's --progress/--no-progress)


def progress_enabled(stream: Any = None) -> bool:
    """Whether progress bars show: as forced by ``configure``, else ``$SPP_PROGRESS``, else when ``stream``
    (default stderr) is a terminal."""
    if _forced_progress is not None:
        return _forced_progress
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return _isatty(stream if stream is not None else sys.stderr)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _LineStream:
    """A file for tqdm that turns each in-place redraw (``\\r...``) into one plain line: what a log file needs."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._last = ""

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        for part in _ANSI.sub("", str(text)).replace("\n", "\r").split("\r"):
            part = part.rstrip()
            if part and part != self._last:
                self._stream.write(part + "\n")
                self._last = part
        return len(text)

    def flush(self) -> None:
        getattr(self._stream, "flush", lambda: None)()

    def isatty(self) -> bool:
        return False


def progress(iterable: Iterable | None = None, *, disable: bool | None = False, **kwargs: Any):
    """``tqdm(iterable, **kwargs)`` on stderr when ``progress_enabled()`` (and not ``disable``), else a silent one
    (same interface: ``update``, ``set_postfix``, ``close``, iteration). Every progress bar of the stages is made
    here, so one switch governs them all."""
    from tqdm import tqdm

    if disable or not progress_enabled():
        kwargs.pop("file", None)
        return tqdm(iterable, disable=True, **kwargs)
    stream = kwargs.pop("file", None) or sys.stderr
    if _isatty(stream):
        return tqdm(iterable, file=stream, disable=False, **kwargs)
    # Asked for on a log file or a pipe: plain lines, not carriage returns; a fixed width, and the final state kept.
    kwargs.update(dynamic_ncols=False, ncols=min(int(kwargs.get("ncols") or 100), 160), leave=True, ascii=True,
                  mininterval=max(float(kwargs.get("mininterval") or 0.0), LOG_INTERVAL_S))
    kwargs.pop("position", None)
    return tqdm(iterable, file=_LineStream(stream), disable=False, **kwargs)


# -- the CLI's log configuration ------------------------------------------------------------------------------
class _Formatter(logging.Formatter):
    """``warning: ...``, ``error: ...``, plain info lines, ``debug: [logger] ...``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        if record.levelno >= logging.INFO:
            return message
        return f"debug: [{record.name}] {message}"


class _StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (looked up per record, so a test runner's capture sees it), above any
    progress bar on screen."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = sys.stderr
            from tqdm import tqdm

            if getattr(tqdm, "_instances", None):
                tqdm.write(text, file=stream)
            else:
                stream.write(text + "\n")
                stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging must never break the program
            self.handleError(record)


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """``warnings.showwarning`` for the CLI: the message alone, on one line, as a log record."""
    logging.getLogger("py.warnings").warning("%s", " ".join(str(message).split()))


def configure(verbosity: int = 0, progress: bool | None = None) -> Callable[[], None]:
    """Set up stderr for the ``spp`` CLI; returns the function that undoes it.

    ``verbosity``: -1 warnings and errors only (and no bars unless ``progress`` is True); 0 info lines too;
    1 sppnet's debug lines; 2 every library's debug lines. ``progress``: None auto (``$SPP_PROGRESS``, else a
    terminal), True/False force the bars on/off."""
    global _forced_progress
    root = logging.getLogger()
    ours = [logging.getLogger(name) for name in OUR_LOGGERS]
    saved = (root.level, [logger.level for logger in ours], warnings.showwarning, _forced_progress)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    for logger in ours:
        logger.setLevel(level)
    warnings.showwarning = _show_warning
    _forced_progress = False if progress is None and verbosity < 0 else progress

    def undo() -> None:
        global _forced_progress
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for logger, old in zip(ours, saved[1]):
            logger.setLevel(old)
        if warnings.showwarning is _show_warning:
            warnings.showwarning = saved[2]
        _forced_progress = saved[3]

    return undo
