"""Stopping a job: Ctrl-C (SIGINT) and SIGTERM end it within seconds, with one line.

Python runs a signal handler only between bytecodes of the main thread, so a job inside a long
device call or compilation would notice the signal only when that call returns, tens of
seconds later. So the signal also wakes a thread (`signal.set_wakeup_fd`), which stops the
evaluation workers at once and ends the process itself when the main thread has not unwound
within `GRACE_SECONDS`; a run stopped that way resumes like one killed with `kill -9`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator

GRACE_SECONDS = 3.0
# What a stopped job prints (on stderr) and its exit status (128 + the signal, as a shell says).
STOPPED = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(grace: float = GRACE_SECONDS) -> Iterator[None]:
    """Within: SIGINT and SIGTERM stop the job. The main thread gets `Stopped` (once: a second
    signal while it unwinds changes nothing), the evaluation workers end at once, and the
    block exits with `SystemExit(128 + signal)` after one line on stderr ("interrupted",
    "terminated"); a process still alive `grace` seconds after the signal is ended there.
    Outside the main thread (where signals cannot be handled) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"signum": None, "reported": False}
    lock = threading.Lock()

    def report(signum: int, *, flush: bool = True) -> int:
        with lock:
            if not state["reported"]:
                state["reported"] = True
                if flush:  # not from the thread: the main thread may hold the stream's lock
                    sys.stderr.flush()
                os.write(2, f"{STOPPED.get(signum, f'stopped by signal {signum}')}\n".encode())
        return 128 + signum

    def handler(signum, frame):
        if state["signum"] is None:
            state["signum"] = signum
            raise Stopped(signum)

    def watch(reader: socket.socket) -> None:
        while data := reader.recv(1):
            if data[0] in STOPPED:
                break
        else:
            reader.close()  # the block ended without a signal
            return
        # Not imported: no workers started (and importing here could wait on the main thread).
        if evaluation := sys.modules.get("camu_jax.evaluation"):
            with contextlib.suppress(Exception):  # nothing may keep this thread from the end
                evaluation.stop_workers()
        threading.Event().wait(grace)
        os._exit(report(data[0], flush=False))

    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = {s: signal.signal(s, handler) for s in STOPPED}
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=watch, args=(reader,), name="camu-jax-stop", daemon=True).start()
    try:
        yield
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        raise SystemExit(report(signum)) from None
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        if state["signum"] is None:
            writer.close()  # ends the thread; after a signal it stays to end the process
