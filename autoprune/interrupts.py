"""Ctrl-C (and SIGTERM) for long runs: stop at once, keep what was written, never lose the request.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to be. Two places can
lose it: a store write cut in half (so those are wrapped in :func:`deferred_sigint`, which holds the signal until
the write is done), and code that swallows exceptions — a ``__del__`` method or a weakref callback (Python prints
"Exception ignored in ..." and goes on), a library's cleanup handler. The second is why a Ctrl-C sent in the
middle of a trial could be ignored and the search ran to its end.

So the command line installs :func:`handle_sigint`, which records the request before it raises, and the long
loops call :func:`check` at safe points (the searcher before each trial, the evaluators before every forward
pass): a request whose ``KeyboardInterrupt`` was swallowed is raised again there. Library use without the CLI
keeps Python's default SIGINT handler; :func:`check` then reacts only to a SIGTERM received inside
:func:`sigterm_as_interrupt`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["check", "clear", "deferred_sigint", "handle_sigint", "install", "requested", "sigterm_as_interrupt"]

_requested = threading.Event()


def handle_sigint(signum: int, frame: FrameType | None) -> None:
    """The CLI's SIGINT handler: record the request, then raise ``KeyboardInterrupt`` as Python's default does."""
    _requested.set()
    raise KeyboardInterrupt


def install() -> None:
    """Install :func:`handle_sigint` (main thread only; elsewhere a no-op) and forget earlier requests."""
    _requested.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handle_sigint)


def requested() -> bool:
    """True once a Ctrl-C (or SIGTERM inside :func:`sigterm_as_interrupt`) arrived and was not cleared."""
    return _requested.is_set()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if an interrupt was requested (again, if its first raise was swallowed)."""
    if _requested.is_set():
        raise KeyboardInterrupt


def clear() -> None:
    """Forget the request (the interrupt was handled and the program goes on)."""
    _requested.clear()


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold back Ctrl-C while the block runs (a store write); raise the ``KeyboardInterrupt`` afterwards.

    The held signal is handed to the handler that was installed before (so it is recorded by
    :func:`handle_sigint` under the CLI). A no-op outside the main thread (signal handlers live there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[FrameType | None] = []
    previous = signal.getsignal(signal.SIGINT)

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(frame)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(signal.SIGINT, pending[0])
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C inside the block (clean stop of batch jobs); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        _requested.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
