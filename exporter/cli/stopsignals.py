"""How the long-running verbs without a stop flag of their own (top, advise) end on a signal.

SIGINT, SIGTERM and SIGHUP (Ctrl-C, a supervisor, ``iotrace demo``, a closed ssh session) all
raise ``KeyboardInterrupt`` in the main thread, so the verb leaves through its ``finally``: the
source is stopped (its uprobes detached, its xentrace ended) and the terminal restored.

SIGINT is set explicitly too: a process started in the background by a non-interactive shell
(``iotrace advise ... &`` in a script, ``nohup``) inherits SIGINT *ignored* (POSIX: asynchronous
lists ignore it without job control), and Python then keeps it ignored instead of raising
``KeyboardInterrupt``: ``kill -INT`` did nothing to such an advise in Dom0 (tests/xen).
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_stop_signals() -> None:
    """Make every STOP_SIGNALS raise KeyboardInterrupt (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _interrupt)
