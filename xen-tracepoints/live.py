"""Live xentrace source: run ``xentrace`` with its output on a pipe and decode it as it comes.

``XentraceLiveSource(addrmap, command=None, cpu_hz=None)`` is an ``iotrace.core.source.EventSource``
named "xentrace": ``start()`` spawns the command, a reader thread feeds whatever the pipe yields
to an incremental ``StreamDecoder`` (which keeps each pCPU's state, the current vCPU and the open
exits across reads, and holds a record cut by a read boundary until its end arrives) and folds
the event batches into the source's aggregator. ``totals()``, ``domains()`` and ``stats()`` are
cheap copies under the source's lock; they never wait for the pipe.

The default command, checked against tools/xentrace/xentrace.c of Xen 4.17 (RELEASE-4.17.0) and
on a real Xen 4.17 host (tests/xen):

* an output file argument, ``/dev/stdout``: parse_args requires exactly one ("get outfile
  (required last argument)": ``if (optind != (argc-1)) usage();``), and main opens it with
  ``O_WRONLY | O_CREAT | O_TRUNC``; ``/dev/stdout`` reopens fd 1, our pipe. xentrace then refuses
  only a TTY (``isatty(outfd)``). Without the argument it prints its usage and exits;
* ``-S 256``: 256 pages (1 MiB) of trace buffer per pCPU instead of DEFAULT_TBUF_SIZE 32. With
  the default, one HVM guest doing port I/O under QEMU TCG lost ~29,000 records in 20 s
  (TRC_LOST_RECORDS); with 256 pages none. Xen sizes the buffers once per boot: the first
  xentrace after boot decides, a later ``-S`` is ignored (its usage says so);
* ``-e hvm -e sched``: parse_evtmask ORs named classes into the mask, giving
  TRC_HVM | TRC_SCHED (0x0008f000 | 0x0002f000): the I/O, VMEXIT/VMENTRY and runstate records.
  TRC_LOST_RECORDS and TRC_TRACE_WRAP_BUFFER are written by Xen's trace.c whatever the mask, and
  the TRC_TRACE_CPU_CHANGE window headers by xentrace itself;
* ``-D``: discard what the buffers already hold (records from before we started);
* SIGINT/SIGTERM make it finish the current write, disable tracing and exit (close_handler).

Which domains are alive: a domain is listed from its first record on; while xenstore lists it
(``live_domids``, default ``xenstore-list /local/domain``, asked at most every ``LIVENESS_S`` from
``domains()``) its ``last_seen`` is now, so an idle or paused guest keeps its series however long
it makes no I/O; once it is destroyed ``last_seen`` stays at the last listing and the exporter
drops its series after ``domain_grace_seconds``. Without xenstore, ``last_seen`` is the domain's
last record (an idle domain then looks gone).

A command that exits (or cannot start) while the source runs sets ``stats().up`` False and
``stats().error`` to one line with its exit status and last stderr line.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque

import numpy as np

from iotrace.core.domains import DOMID_IDLE, display_name, domain_name, xenstore_domids
from iotrace.core.errors import InputError, UserError
from iotrace.core.source import DomainInfo, EventSource
from iotrace.xentrace.decoder import StreamDecoder

READ_SIZE = 1 << 16
LIVENESS_S = 5.0                  # at most one xenstore listing per this many seconds


DEFAULT_TBUF_PAGES = 256          # per pCPU; see the module doc (-S)


def default_command(xentrace: str = "xentrace", tbuf_pages: int = DEFAULT_TBUF_PAGES) -> list[str]:
    """xentrace writing HVM and scheduler records to stdout (see the module doc)."""
    return [xentrace, "-D", "-S", str(tbuf_pages), "-e", "hvm", "-e", "sched", "/dev/stdout"]


class XentraceLiveSource(EventSource):
    name = "xentrace"

    def __init__(self, addrmap=None, command=None, cpu_hz: float | None = None, *,
                 keep_addr: bool = False, read_size: int = READ_SIZE,
                 live_domids=xenstore_domids, clock=time.time):
        super().__init__(addrmap, keep_addr=keep_addr)
        self._live_domids, self._clock = live_domids, clock
        self._listed_at: float | None = None
        self.command = list(command) if command else default_command()
        if not self.command:
            raise UserError("xentrace source: empty command")
        self.cpu_hz = cpu_hz
        self.read_size = read_size
        self._proc: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._decoder = StreamDecoder(cpu_hz, name="xentrace")
        self._bytes = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("xentrace source already started")
        exe = self.command[0]
        if os.sep not in exe and shutil.which(exe) is None:
            self._fail(f"{exe}: command not found (Debian: apt-get install xen-utils-4.17)")
            raise UserError(f"xentrace source: {exe}: command not found "
                            "(Debian: apt-get install xen-utils-4.17)")
        try:
            self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          bufsize=0)
        except OSError as exc:
            self._fail(f"{exe}: cannot start: {exc.strerror}")
            raise UserError(f"xentrace source: {exe}: cannot start: {exc.strerror}") from None
        with self._lock:
            self._stats.up = True
            self._stats.error = None
            self._stats.extra.update(pid=self._proc.pid, command=" ".join(self.command))
        self._threads = [threading.Thread(target=self._read_stderr, name="xentrace-stderr",
                                          daemon=True),
                         threading.Thread(target=self._read_stdout, name="xentrace-reader",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask xentrace to finish (SIGINT, as its close_handler expects), then wait; SIGKILL if it
        does not exit within ``timeout``. Events already written are decoded and kept."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            except ProcessLookupError:
                pass
        for t in self._threads:
            t.join(timeout)
        with self._lock:
            self._stats.up = False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the command's output has ended and been decoded (True), or timeout."""
        return self._done.wait(timeout)

    # -- reader threads ----------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        proc = self._proc
        fd = proc.stdout.fileno()
        error = None
        try:
            while True:
                chunk = os.read(fd, self.read_size)
                if not chunk:
                    break
                self._bytes += len(chunk)
                batch = self._decoder.feed(chunk)
                self._ingest(batch)
            if self._bytes:                  # nothing at all: report the exit status instead
                self._ingest(self._decoder.finish())
        except InputError as exc:
            error = str(exc)
            if proc.poll() is None:
                proc.kill()
        except OSError as exc:           # pragma: no cover - pipe errors are rare
            error = f"xentrace source: reading the pipe: {exc.strerror}"
        rc = proc.wait()
        self._threads[0].join(2.0)       # the stderr reader: its last line goes in the error
        with self._lock:
            self._stats.up = False
            self._stats.extra["exit_status"] = rc
            if error:
                self._stats.error = error
            elif not self._stopping.is_set():
                last = self._stderr_tail[-1] if self._stderr_tail else "no message"
                self._stats.error = f"{self.command[0]} exited with status {rc}: {last}"
        self._done.set()

    def _read_stderr(self) -> None:
        for raw in iter(self._proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self._stderr_tail.append(line)

    def domains(self):
        """The domains seen so far; ``last_seen`` now for those xenstore still lists."""
        now = self._clock()
        if self._live_domids is not None and (self._listed_at is None or
                                              now - self._listed_at >= LIVENESS_S):
            self._listed_at = now
            live = self._live_domids()          # outside the lock: a subprocess
            if live is not None:
                with self._lock:
                    for d, info in self._domains.items():
                        if d in live:
                            info.last_seen = max(info.last_seen, now)
        return super().domains()

    def _ingest(self, batch: np.ndarray) -> None:
        now = self._clock()
        dec = self._decoder
        seen = np.unique(batch["domid"]) if len(batch) else ()
        # Names of domains seen for the first time, looked up outside the lock (xenstore).
        new_names = {int(d): domain_name(int(d)) for d in seen
                     if int(d) >= 0 and int(d) != DOMID_IDLE and int(d) not in self._domains}
        self.feed(batch)
        with self._lock:
            st = self._stats
            st.records = dec.records
            st.lost = dec.lost_records
            st.decode_errors = dec.decode_errors
            st.extra["bytes"] = self._bytes
            st.extra["windows"] = dec.windows
            for d in seen:
                d = int(d)
                if d < 0 or d == DOMID_IDLE:
                    continue
                info = self._domains.get(d)
                if info is None:
                    info = self._domains[d] = DomainInfo(d, display_name(d, new_names),
                                                         first_seen=now)
                info.last_seen = now

    def _fail(self, msg: str) -> None:
        with self._lock:
            self._stats.up = False
            self._stats.error = msg

    @property
    def warnings(self) -> list[str]:
        return list(self._decoder.warnings)
