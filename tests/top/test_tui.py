"""``iotrace top`` full-screen view, driven headlessly through a real tmux server.

Each test starts the view in a detached tmux session of fixed size on a private tmux socket, sends
keys with ``send-keys`` and reads the screen with ``capture-pane``. The view is fed by ``FeedSource``
below (an ``EventSource`` fed with batches built via ``iotrace.core.events.empty()``): run as a script,
this file *is* that program (``python tests/test_top_tui.py [--mode M] <iotrace top arguments>``).

FeedSource traffic per 0.1 s tick (so the expected order of rows is known):
  alpha (domid 1): vcpu 0 -> com1 writes 300 x 1 B; vcpu 1 -> ide-primary reads 100 x 2 B; 5 us
  beta  (domid 2): vcpu -1 -> vga-lowmem writes 150 x 8 B (buffered); 20 us
  gamma (domid 3): vcpu 0 -> pci_config reads 20 x 4 B; 3 ms (slow); the source lost 7 of its events
=> by requests/s: alpha (400) > beta (150) > gamma (20); by bytes/s: beta (1200) > alpha (500) > gamma (80).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TICK = 0.1


def _feed_source_class():
    from iotrace.core import events
    from support.fakes import FedSource, batch

    def tick_batches():
        return [
            batch(300, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1, 5_000),
            batch(100, 1, 1, events.TYPE_PIO, 0x1f0, events.DIR_READ, 2, 5_000),
            batch(150, 2, -1, events.TYPE_MMIO, 0xa0000, events.DIR_WRITE, 8, 20_000),
            batch(20, 3, 0, events.TYPE_PCI_CONFIG, 0x0000_0800_0000_0000, events.DIR_READ, 4,
                  3_000_000),
        ]

    class FeedSource(FedSource):
        def __init__(self, mode: str = "steady", ticks: int = 10):
            super().__init__("feed", keep_addr=True)
            self.mode, self.ticks = mode, ticks
            self._halt = threading.Event()
            self._thread = None

        def start(self):
            self.set_up(True)
            self.add_lost(7, by_domid={3: 7})
            for d, n in ((1, "alpha"), (2, "beta"), (3, "gamma")):
                self.add_domain(d, n)
            if self.mode == "many":          # 40 more, quieter domains: the table scrolls
                for d in range(10, 50):
                    self.add_domain(d, f"guest{d}")
            if self.mode == "once":          # like a replay at --speed 0: everything at start
                for _ in range(self.ticks):
                    for b in tick_batches():
                        self.feed(b)
                return
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

        def _run(self):
            while not self._halt.wait(TICK):
                for b in tick_batches():
                    self.feed(b)
                if self.mode == "many":
                    for d in range(10, 50):
                        self.feed(batch(60 - d, d, 0, events.TYPE_PIO, 0x3f8,
                                        events.DIR_WRITE, 1, 5_000))
                if self.mode == "down" and self.stats().events > 2000:
                    self.set_up(False, "device model exited")
                    return

        def stop(self):
            self._halt.set()
            if self._thread:
                self._thread.join(2)

    return FeedSource


def main(argv: list[str]) -> int:
    import argparse

    from iotrace.cli import top as cmd_top
    from iotrace.core.errors import UserError
    mode = "steady"
    if argv[:1] == ["--mode"]:
        mode, argv = argv[1], argv[2:]
    p = argparse.ArgumentParser(prog="iotrace top")
    cmd_top.add_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_top.run_source(args, _feed_source_class()(mode))
    except UserError as exc:
        print(f"iotrace top: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    sys.exit(main(sys.argv[1:]))


# ---------------------------------------------------------------------------------------------
import pytest  # noqa: E402

from support.tmux import Tmux, table_rows  # noqa: E402

pytestmark = pytest.mark.integration
PY = str(REPO / ".venv" / "bin" / "python")


def top_cmd(*args: str, mode: str = "steady") -> str:
    env = f"PYTHONPATH={shlex.quote(str(REPO / 'tests'))}"
    return (f"env {env} {shlex.quote(PY)} {shlex.quote(str(Path(__file__)))} --mode {mode} "
            + " ".join(shlex.quote(a) for a in args))


@pytest.fixture
def tmux_top(request):
    sessions = []

    def start(*args, mode="steady", width=80, height=24):
        t = Tmux(top_cmd(*args, mode=mode), width, height)
        sessions.append(t)
        return t
    yield start
    for t in sessions:
        t.kill()


def names(rows: list[str]) -> list[str]:
    return [r[2:].split()[1] if r[2:].split()[0].isdigit() else r[2:].split()[0] for r in rows]


def has_rates(screen: str) -> bool:
    """The table is there and its first row has a number (not '-') as REQ/s."""
    if "REQ/s" not in screen or "alpha" not in screen or "gamma" not in screen:
        return False
    rows = table_rows(screen)
    fields = rows[0][2:].split() if rows else []
    return len(fields) > 2 and fields[2][0].isdigit()


def test_renders_in_80x24_and_quits(tmux_top):
    t = tmux_top("0.3")
    s = t.wait_for(has_rates, what="a table with rates")
    lines = s.splitlines()
    assert len(lines) <= 24 and all(len(ln) <= 80 for ln in lines)
    assert lines[0].startswith("iotrace top - ")
    assert "sources: feed up" in s and "lost 7" in s
    rows = table_rows(s)
    assert names(rows) == ["alpha", "beta", "gamma"]      # sorted by requests/s
    alpha = rows[0].split()
    # REQ/s of alpha: 400 per 0.1 s tick = 4000/s; allow for scheduling jitter on 2 cores.
    assert 2000 <= float(alpha[3]) <= 5500, rows[0]
    assert "com1" in rows[0]                               # busiest range of alpha
    assert rows[2].startswith("!"), rows[2]                 # gamma: lost events and slow p95
    assert "ms" in rows[2]
    assert not rows[0].startswith("!")
    assert s.splitlines()[-1].startswith("q quit")
    t.keys("q")
    t.wait_for(lambda x: "EXIT=0" in x, what="exit 0 after q")


def test_sort_keys_change_the_order(tmux_top):
    t = tmux_top("0.3")
    t.wait_for(has_rates, what="first table")
    t.keys("s")                                             # next sort key: bytes/s
    s = t.wait_for(lambda x: "sort bytes" in x and has_rates(x), what="sort by bytes")
    assert names(table_rows(s)) == ["beta", "alpha", "gamma"]
    t.keys("i")                                             # inverted
    s = t.wait_for(lambda x: "sort bytes ^" in x, what="inverted order")
    assert names(table_rows(s)) == ["gamma", "alpha", "beta"]


def test_sort_option_and_name_sort(tmux_top):
    t = tmux_top("--sort", "name", "0.3")
    s = t.wait_for(has_rates, what="first table")
    assert "sort name ^" in s
    assert names(table_rows(s)) == ["alpha", "beta", "gamma"]
    t.keys("i")
    s = t.wait_for(lambda x: "sort name v" in x, what="inverted")
    assert names(table_rows(s)) == ["gamma", "beta", "alpha"]


def test_filter_prompt_and_clear(tmux_top):
    t = tmux_top("0.3")
    t.wait_for(has_rates, what="first table")
    t.keys("f")
    t.wait_for(lambda x: "filter (Enter applies" in x, what="filter prompt")
    t.keys("-l", "domain=be*")
    t.keys("Enter")
    s = t.wait_for(lambda x: "filter: domain=be*" in x and "alpha" not in x, what="filtered")
    assert names(table_rows(s)) == ["beta"]
    assert s.splitlines()[2].startswith("1 domain ")          # not "1 domains"
    t.keys("f")
    t.keys("-l", "type=pio")                               # adds to the domain filter
    t.keys("Enter")
    s = t.wait_for(lambda x: "the filter matches nothing: domain=be* type=pio" in x,
                   what="type filter, said to match nothing")
    assert "no domains matching the filter" in s           # beta has MMIO only
    t.keys("c")
    s = t.wait_for(lambda x: "alpha" in x and "gamma" in x, what="cleared")
    assert "filter:" not in s.splitlines()[2]


def test_bad_filter_is_one_line_not_a_crash(tmux_top):
    t = tmux_top("0.3")
    t.wait_for(has_rates, what="first table")
    t.keys("f")
    t.keys("-l", "colour=red")
    t.keys("Enter")
    s = t.wait_for(lambda x: "bad filter" in x, what="error line")
    assert "unknown filter field 'colour'" in s
    assert has_rates(t.screen())


def test_command_line_filters(tmux_top):
    t = tmux_top("--type", "pio", "--vcpu", "1", "0.3")
    s = t.wait_for(lambda x: "alpha" in x and "REQ/s" in x and
                   table_rows(x)[0][2:].split()[2][0].isdigit(), what="filtered table")
    rows = table_rows(s)
    assert names(rows) == ["alpha"]
    # only vcpu 1 (ide-primary reads, 100 per tick = 1000/s) remains
    assert "ide-p~:100%" in rows[0]                        # a cut name keeps its share
    assert 500 <= float(rows[0].split()[3]) <= 1400, rows[0]


def test_expand_collapse_vcpus_ranges_addresses(tmux_top):
    t = tmux_top("0.3")
    t.wait_for(has_rates, what="first table")
    t.keys("Enter")                                         # first row = alpha

    def expanded(x) -> bool:
        # the whole expanded frame (a redraw caught half-way has only part of it)
        rows = table_rows(x)
        labels = [r[2:].strip().split("  ")[0].strip() for r in rows[1:5]]
        return (len(rows) > 4 and names(rows)[0] == "alpha" and rows[0][1] == "-"
                and labels == ["vcpu 0", "vcpu 1", "com1", "ide-primary"]
                and "beta" in names(rows))
    t.wait_for(expanded, what="alpha expanded: '-', vcpu 0, vcpu 1, com1, ide-primary; beta")
    t.keys("a")                                             # addresses under the ranges
    t.wait_for(lambda x: "0x3f8" in x and "0x1f0" in x, what="addresses")
    t.keys("-")
    # a redraw caught half-way can lack both; wait for the whole collapsed frame
    t.wait_for(lambda x: "vcpu 1" not in x and "0x3f8" not in x and "REQ/s" in x and table_rows(x)
               and table_rows(x)[0][1] == "+", what="collapsed alpha marked '+'")
    t.keys("Down", "v")                                     # beta: its only vCPU is unknown
    t.wait_for(lambda x: "vcpu ?" in x and names(table_rows(x))[:3] == ["alpha", "beta", "vcpu"],
               what="beta's vcpus under it")
    t.keys("V")                                             # vCPUs of every domain
    t.wait_for(lambda x: x.count("vcpu 0") == 2, what="all expanded")


def test_help_pause_and_quit_from_help(tmux_top):
    t = tmux_top("0.3")
    t.wait_for(has_rates, what="first table")
    t.keys("h")
    s = t.wait_for(lambda x: "iotrace top - keys" in x, what="help")
    assert "quit" in s and "filter" in s and "DOWN! marks a source" in s   # all of it fits
    t.keys("x")                                             # any key closes help
    t.wait_for(lambda x: "REQ/s" in x, what="table again")
    t.keys("p")
    s = t.wait_for(lambda x: "PAUSED" in x, what="paused")
    time.sleep(0.8)                                         # > 2 intervals: nothing may change
    frozen = table_rows(s)
    assert table_rows(t.screen()) == frozen
    t.keys("p")
    t.wait_for(lambda x: "PAUSED" not in x, what="resumed")
    t.keys("?")
    t.wait_for(lambda x: "iotrace top - keys" in x, what="help again")
    t.keys("q")
    t.wait_for(lambda x: "EXIT=0" in x, what="quit from help")


def test_too_small_terminal_then_resize(tmux_top):
    t = tmux_top("0.3", width=40, height=8)
    s = t.wait_for(lambda x: "too small" in x, what="too-small message")
    assert "40x8" in s and "Traceback" not in s
    t.tmux("resize-window", "-t", "t", "-x", "80", "-y", "24")
    t.wait_for(has_rates, what="table after resize")
    t.keys("q")
    t.wait_for(lambda x: "EXIT=0" in x, what="exit")


def test_wide_terminal_shows_more_columns(tmux_top):
    t = tmux_top("0.3", width=160, height=30)
    s = t.wait_for(has_rates, what="wide table")
    head = next(ln for ln in s.splitlines() if "REQ/s" in ln)
    for col in ("REQS", "BYTES", "AVG", "VCPUS"):
        assert col in head
    assert "ide-primary" not in head and "ide-primary" in s or "com1:" in s


def test_colour_for_attention_and_no_color(tmux_top):
    t = tmux_top("0.3", mode="down")
    s = t.wait_for(lambda x: "DOWN!" in x, what="source down")
    assert "device model exited" in s
    esc = t.screen(escapes=True)
    gamma = next(ln for ln in esc.splitlines() if "gamma" in ln)
    assert "\x1b[" in gamma and "31m" in gamma            # red: lost events
    t3 = tmux_top("--slow", "15us", "0.3")                 # beta's p95 (~30 us) is now slow
    t3.wait_for(lambda x: has_rates(x) and table_rows(x)[1].startswith("!"), what="slow beta")
    beta = next(ln for ln in t3.screen(escapes=True).splitlines() if "beta" in ln)
    assert "33m" in beta                                    # yellow: slow p95
    assert not table_rows(t3.screen())[0].startswith("!")  # alpha (~8 us) is not
    t2 = tmux_top("--no-color", "0.3")
    t2.wait_for(has_rates, what="table")
    esc = t2.screen(escapes=True)
    assert "31m" not in esc and "33m" not in esc
    assert next(ln for ln in t2.screen().splitlines() if "gamma" in ln).startswith("!")


def test_not_a_terminal_needs_batch():
    r = subprocess.run([PY, __file__, "0.2", "1"], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "iotrace top: not a terminal: use -b for plain-text output (e.g. iotrace top -b 1 10)"]


def test_real_cli_on_a_replay(tmux_top, iotrace_exe, tmp_path):
    """The installed `iotrace top --replay FILE --speed 0` in 80x24: first interval counts the
    whole recording, later ones are idle; expand, sort by name, quit."""
    from iotrace.core import events
    from iotrace.offline.recording import RecordingWriter
    rec = tmp_path / "two.iotrec"
    with RecordingWriter(rec, {"source": "qemu", "domains": {1: "alpha", 2: "beta"}}) as w:
        for domid, vcpu, typ, addr, n in ((1, 0, events.TYPE_PIO, 0x3f8, 900),
                                          (1, 1, events.TYPE_PIO, 0x1f0, 100),
                                          (2, 0, events.TYPE_MMIO, 0xfed00000, 300)):
            b = events.empty(n)
            b["domid"], b["vcpu"], b["type"], b["addr"], b["size"] = domid, vcpu, typ, addr, 4
            w.write(b)
    t = Tmux(f"{shlex.quote(iotrace_exe)} top --replay {shlex.quote(str(rec))} --speed 0 0.5")
    try:
        s = t.wait_for(lambda x: "alpha" in x and "beta" in x and "replay up" in x,
                       what="replay table")
        assert all(len(ln) <= 80 for ln in s.splitlines())
        assert "ev 1300" in s
        rows = table_rows(s)
        assert names(rows) == ["alpha", "beta"]
        s = t.wait_for(lambda x: table_rows(x)[0][2:].split()[2] == "0", what="idle interval")
        t.keys("Enter")
        s = t.wait_for(lambda x: "vcpu 1" in x, what="expanded")
        labels = [r[2:].strip().split("  ")[0] for r in table_rows(s)]
        assert labels[1:5] == ["vcpu 0", "vcpu 1", "com1", "ide-primary"], labels
        t.keys("S")                                          # previous sort key: name
        s = t.wait_for(lambda x: "sort name" in x, what="sort by name")
        t.keys("q")
        t.wait_for(lambda x: "EXIT=0" in x, what="exit 0")
    finally:
        t.kill()


def test_count_ends_the_view_and_d_picks_a_domain(tmux_top):
    t = tmux_top("0.2", "3")                                # three refreshes, then exit 0
    t.wait_for(lambda x: "EXIT=0" in x, what="exit after count")
    t2 = tmux_top("0.3")
    t2.wait_for(has_rates, what="table")
    t2.keys("Down", "d")                                     # only beta
    s = t2.wait_for(lambda x: "filter: domain=2" in x, what="domain picked")
    assert names(table_rows(s)) == ["beta"]
    t2.keys("d")                                             # again: everyone
    s = t2.wait_for(lambda x: "filter:" not in x.splitlines()[2], what="all again")
    assert names(table_rows(s)) == ["alpha", "beta", "gamma"]


def test_escape_cancels_the_filter_prompt(tmux_top):
    t = tmux_top("0.3")
    t.wait_for(has_rates, what="table")
    t.keys("/")
    t.wait_for(lambda x: "filter (Enter applies" in x, what="prompt")
    t.keys("-l", "domain=alpha")
    t.keys("Escape")
    s = t.wait_for(lambda x: "filter (Enter" not in x, timeout=3, what="prompt gone")
    assert names(table_rows(s)) == ["alpha", "beta", "gamma"]


def test_long_table_scrolls_with_the_selection(tmux_top):
    t = tmux_top("--sort", "name", "0.3", mode="many")    # a stable order to page through
    s = t.wait_for(lambda x: "rows 1-19/43" in x and table_rows(x)[0][2:].split()[2][0].isdigit(),
                   what="scroll hint")
    assert len(table_rows(s)) == 19
    t.keys("End")
    s = t.wait_for(lambda x: "rows 25-43/43" in x, what="scrolled to the end")
    rows = table_rows(s)
    assert "guest49" in rows[-1] and "\x1b" not in rows[-1]
    t.keys("Home")
    s = t.wait_for(lambda x: "rows 1-19/43" in x, what="back to the top")
    assert names(table_rows(s))[:4] == ["alpha", "beta", "gamma", "guest10"]
    t.keys("NPage")                             # selection 19 rows down, kept on screen
    s = t.wait_for(lambda x: "rows 2-20/43" in x, what="page down")
    assert table_rows(s)[-1].startswith(" +   26 guest26")


def test_a_damaged_replay_shows_on_the_source_line(iotrace_exe, tmp_path):
    """top --replay of a recording with one flipped bit: the source line says it is damaged
    (and is red); after q, the warning naming the file is on the terminal (issue #12, 9)."""
    from iotrace.core import events
    from iotrace.offline.recording import RecordingWriter
    rec = tmp_path / "bad.iotrec"
    with RecordingWriter(rec, {"source": "qemu", "domains": {1: "alpha"}},
                         chunk_records=300) as w:
        b = events.empty(900)
        b["domid"], b["vcpu"], b["addr"], b["size"] = 1, 0, 0x3f8, 1
        w.write(b)
    raw = bytearray(rec.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    rec.write_bytes(bytes(raw))
    t = Tmux(f"{shlex.quote(iotrace_exe)} top --replay {shlex.quote(str(rec))} --speed 0 0.5")
    try:
        s = t.wait_for(lambda x: "alpha" in x and "replay up" in x, what="replay table")
        assert "ev 600" in s and "damaged: 300 undecodable, 1 chunk(s) skipped!" in s
        line = next(ln for ln in t.screen(escapes=True).splitlines() if "damaged" in ln)
        assert "31m" in line                                    # red: attention
        t.keys("q")
        s = t.wait_for(lambda x: "EXIT=0" in x, what="exit 0")
        assert "iotrace top: source replay: warning:" in s and "checksum mismatch" in s
    finally:
        t.kill()
