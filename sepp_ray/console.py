"""What a user sees: our own lines on the console, everything Ray says in a log file.

Ray writes to the driver's file descriptors from Python (Ray Data's progress tables and bars,
Ray Train's result lines, worker output forwarded by ``log_to_driver``) and from C++ (core
worker and GCS warnings that look like failures on a healthy run). Filtering those line by line
is a losing game, so a quiet process points file descriptors 1 and 2 at a log file and keeps a
private copy of the terminal for :func:`say`, the pretraining bar and warnings of this package.
A ``ray job submit`` driver is quiet the same way, so ``ray job logs`` reads like a local run.
``--verbose`` or ``SEPP_VERBOSE=1`` leaves the descriptors alone and shows everything.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

VERBOSE_ENV = "SEPP_VERBOSE"
_console: TextIO | None = None  # the terminal's stdout, while the process is quiet
_console_err: TextIO | None = None  # and its stderr


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def console(err: bool = False) -> TextIO:
    """The stream a user reads: the terminal kept aside while quiet, else stdout (stderr)."""
    if err:
        return _console_err if _console_err is not None else sys.stderr
    return _console if _console is not None else sys.stdout


def say(msg: str, err: bool = False) -> None:
    """One line for the user (never lost in Ray's output); ``err`` for errors and warnings."""
    print(msg, file=console(err), flush=True)


class _Once(logging.Filter):
    """Each distinct warning reaches the console once; the log file keeps every occurrence."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever :func:`console` is at the time of the record."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(console(err=True))
        super().emit(record)


def _warnings_to_console() -> logging.Handler:
    handler = _ConsoleHandler(console(err=True))
    handler.setLevel(logging.WARNING)
    handler.addFilter(_Once())
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.getLogger("sepp_ray").addHandler(handler)
    return handler


@contextmanager
def quiet(log_path: str | None, verbose: bool = False) -> Iterator[str | None]:
    """Inside the block, fds 1 and 2 append to ``log_path`` and :func:`say` reaches the
    terminal; warnings of ``sepp_ray`` loggers are shown once. Yields the log path, or None
    when verbose (nothing is redirected)."""
    global _console, _console_err
    if verbose or log_path is None or _console is not None:
        yield None
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    for s in (sys.stdout, sys.stderr):
        s.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(log_fd, f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n".encode())
    # A stdout that is not fd 1 (a test's capture object) stays what the user reads.
    real = {1: _fileno(sys.stdout) == 1, 2: _fileno(sys.stderr) == 2}
    _console = os.fdopen(os.dup(saved[1]), "w", buffering=1) if real[1] else sys.stdout
    _console_err = os.fdopen(os.dup(saved[2]), "w", buffering=1) if real[2] else sys.stderr
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    os.close(log_fd)
    handler = _warnings_to_console()
    try:
        yield log_path
    finally:
        logging.getLogger("sepp_ray").removeHandler(handler)
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        for fd, stream in ((1, _console), (2, _console_err)):
            if real[fd] and stream is not None:
                stream.close()
        _console = _console_err = None


def _fileno(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None


def log_path_for(out: str, command: str) -> str | None:
    """Where a command writing to ``out`` keeps Ray's output: ``<out>/logs/<command>.log``
    for a pipeline or sweep work folder; beside any other output (whose folder holds only what
    its manifest lists) as ``<parent>/logs/<name>.<command>.log``. A remote output's log stays
    on this machine, in the temp folder. None without an output."""
    if not out:
        return None
    if "://" in out and not out.startswith("file://"):
        name = out.rstrip("/").rsplit("/", 1)[-1]
        return os.path.join(tempfile.gettempdir(), "sepp-logs", f"{name}.{command}.log")
    path = os.path.abspath(out.removeprefix("file://")).rstrip("/")
    if command in ("pipeline", "sweep"):
        return os.path.join(path, "logs", f"{command}.log")
    parent, name = os.path.split(path)
    return os.path.join(parent, "logs", f"{name}.{command}.log")


def headline(manifest: dict[str, Any]) -> str:
    """The one figure that says a stage did its job, from its manifest."""
    kind = manifest.get("kind")
    if kind == "images":
        sk = manifest.get("skipped", {}).get("count", 0)
        return f"{manifest.get('num_images')} images, {sk} skipped"
    if "num_pairs" in manifest:
        return f"{manifest['num_pairs']} pairs"
    if "num_embeddings" in manifest:
        return f"{manifest['num_embeddings']} embeddings"
    fm = manifest.get("final_metrics") or {}
    if "epochs" in manifest and "final_checkpoint" in manifest:
        knn = f", kNN top-1 {fm['knn_top1']:.3f}" if "knn_top1" in fm else ""
        loss = f", loss {fm['loss']:.3f}" if "loss" in fm else ""
        # the epochs it ran: under a step budget a run with pair items runs fewer than asked
        epochs = manifest.get("epochs_run", manifest["epochs"])
        steps = f", {manifest['total_steps']} steps" if "total_steps" in manifest else ""
        plane = (manifest.get("data_plane") or {}).get("mode")
        where = f", {plane} data" if plane else ""  # held in memory, or streamed
        return f"{epochs} epochs{steps}{loss}{knn}{where}"
    if "checkpoints" in manifest:
        return f"{len(manifest['checkpoints'])} checkpoints evaluated"
    return "done"
