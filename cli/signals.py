"""Stopping `sdrt` within a second on Ctrl-C (SIGINT) and SIGTERM, even during a native inference call.

Python runs signal handlers in the main thread between bytecodes, so a handler waits for the onnxruntime or OpenVINO
call the main thread is in: minutes at large sizes. `run_interruptibly` runs the work in a worker thread while the
main thread only waits, so the signal's exception (KeyboardInterrupt, Terminated) is raised in the main thread at
once. A native call cannot be stopped from Python: `stopped` ends the process without waiting for the worker. The
work must therefore leave nothing on disk that a sudden end would leave half-written (the CLI writes its images in
the main thread, after the work).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")

WORKER_NAME = "sdrt-work"
# How often the waiting main thread wakes: a signal the kernel delivered to another thread is handled by then.
_POLL_S = 0.1
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT (BaseException: no `except Exception`
    swallows it)."""


def _raise_terminated(signum: int, frame: object) -> NoReturn:
    raise Terminated


def install() -> None:
    """Turn SIGTERM into Terminated in the main thread; SIGINT already raises KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def run_interruptibly(work: Callable[[], T]) -> T:
    """`work()`'s result or exception, computed in a worker thread; a stop signal raises here at once."""
    outcome: list[tuple[bool, object]] = []
    done = threading.Event()

    def target() -> None:
        # The kernel gives a process's signal to any thread that does not block it: keep them for the main thread
        # (threads the native libraries start from here inherit the mask).
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed to the main thread, which raises it
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=target, name=WORKER_NAME, daemon=True).start()
    # Not Thread.join: interrupted by a signal, it marks the thread stopped while it still runs (Python 3.11).
    while not done.wait(_POLL_S):
        pass
    succeeded, value = outcome[0]
    if not succeeded:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def stopped(reason: BaseException) -> int:
    """Say in one line that a stop signal ended the command and return its exit status (128 + the signal); if a
    worker is still inside a native call, end the process now instead: interpreter shutdown would wait for it."""
    signum = signal.SIGTERM if isinstance(reason, Terminated) else signal.SIGINT
    status = 128 + signum
    abandoned = any(thread.name == WORKER_NAME and thread.is_alive() for thread in threading.enumerate())
    # A progress bar may have left its line unfinished.
    print(f"{chr(10) if abandoned else ''}sdrt: stopped by {signal.Signals(signum).name}; no partial files left",
          file=sys.stderr)
    if abandoned:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
