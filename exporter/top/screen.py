"""The full-screen ``iotrace top`` view: curses rendering and key handling.

Why curses: it is in Python's standard library and needs nothing but a terminfo entry, so it works
over ssh on any Dom0 (often a minimal install where adding packages is not welcome), inside tmux and
screen, and on the serial console. A richer TUI framework (urwid, textual, rich) would be an extra
dependency for a view that is a header and a table. We draw without flicker the way curses
intends: ``erase()`` (not ``clear()``, which forces a full repaint) then ``noutrefresh()`` and one
``doupdate()`` per frame, so only changed cells reach the terminal.

Everything that needs attention has a colour *and* a character, so it stays readable on a
monochrome terminal or a log of the screen: a row starting with ``!`` has lost events (red) or a
slow p95 (yellow, above ``--slow``); a source that is down shows ``DOWN!`` in the header.
"""
from __future__ import annotations

import curses
import os
import time

from iotrace.top import keys
from iotrace.top.columns import SORT_KEYS, damage_text, fmt_bytes, fmt_count
from iotrace.top.model import Model, View
from iotrace.top.snapshot import Snapshot
from iotrace.top.table import layout, render_header, render_row

MIN_W, MIN_H = 60, 10        # below this, a message instead of a cut-up table
HEADER_LINES = 4             # title, sources, totals, column header

HELP = """\
iotrace top - keys (any key closes this help)

  q           quit                       h ?        this help
  p space     pause / resume             s S        next / previous sort key
  i           invert the sort order      up down    select (PgUp PgDn Home End)
  enter +     expand the selected domain: its vCPUs and ranges
  - left      collapse it
  v r a       expand vCPUs / ranges / ranges+addresses of the selected domain
  V R A       the same for every domain
  f /         filter, e.g.: domain=web* vcpu=0,1 range=com* type=pio dir=read
              (a bare word is a domain; field= alone clears that field)
  d           only the selected domain (again: all)     c   clear filters

Every column covers the last interval, except REQS and BYTES (since start).
REQ/s BYTES/s RD/s WR/s: rates. BUSIEST: the range (under a range: the
address) with most requests, and its share. P50 P95 AVG: service time
median, 95th percentile and mean (qemu: in the device model; xentrace: VM
exit to entry). LOST: events the source lost. REQS BYTES: totals since the
source started. VCPUS: vCPUs that sent requests. PROBES: uprobes attached
for the domain's device model (qemu source).
'!' marks a row needing attention: lost events, or P95 above --slow.
DOWN! marks a source that is down."""


def too_small_lines(w: int, h: int) -> list[str]:
    words = (f"Terminal too small ({w}x{h}): iotrace top needs at least {MIN_W}x{MIN_H}. "
             "Enlarge the window, or use batch mode: iotrace top -b. Press q to quit.").split()
    lines, cur = [], ""
    width = max(1, w - 1)
    for word in words:
        while len(word) > width:
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(word[:width])
            word = word[width:]
        if not cur:
            cur = word
        elif len(cur) + 1 + len(word) <= width:
            cur += " " + word
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    return lines[:max(1, h)]


class TopScreen:
    """Owns the curses screen; ``take()`` returns a fresh Snapshot each interval."""

    def __init__(self, model: Model, take, interval: float, count: int | None = None):
        self.model = model
        self.take = take
        self.interval = interval
        self.count = count
        self.paused = False
        self.show_help = False
        self.prompt: str | None = None       # text being typed at the filter prompt
        self.message = ""
        self.message_until = 0.0
        self.selected: tuple = ()            # ident of the selected row
        self.top = 0                         # first table row on screen
        self.refreshes = 0
        self.view: View | None = None
        self.attr = {}
        self.colour = True

    # -- setup ---------------------------------------------------------------------------------
    def _colours(self) -> None:
        a = {"lost": curses.A_BOLD, "slow": curses.A_BOLD, "down": curses.A_BOLD,
             "head": curses.A_REVERSE, "title": curses.A_BOLD, "paused": curses.A_BOLD}
        try:
            if self.colour and curses.has_colors():
                curses.start_color()
                try:
                    curses.use_default_colors()
                    bg = -1
                except curses.error:
                    bg = curses.COLOR_BLACK
                curses.init_pair(1, curses.COLOR_RED, bg)
                curses.init_pair(2, curses.COLOR_YELLOW, bg)
                curses.init_pair(3, curses.COLOR_CYAN, bg)
                a["lost"] = a["down"] = curses.color_pair(1) | curses.A_BOLD
                a["slow"] = curses.color_pair(2) | curses.A_BOLD
                a["title"] = curses.color_pair(3) | curses.A_BOLD
                a["paused"] = curses.color_pair(2) | curses.A_BOLD | curses.A_REVERSE
        except curses.error:
            pass
        self.attr = a

    def run(self, stdscr) -> None:
        self.scr = stdscr
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        stdscr.keypad(True)
        try:
            curses.set_escdelay(25)          # Esc cancels the filter prompt without a 1 s wait
        except (AttributeError, curses.error):
            pass
        self._colours()
        if self.model.cur is None:
            self.model.update(self.take())
        self.view = self.model.view()     # first frame at once; rates after one interval
        next_tick = self.model.cur.t + self.interval   # one interval after the baseline
        while True:
            self.draw()
            wait = next_tick - time.monotonic()
            stdscr.timeout(max(0, int(wait * 1000)))
            ch = stdscr.getch()
            if ch == -1 or time.monotonic() >= next_tick:
                if time.monotonic() >= next_tick:
                    next_tick += self.interval
                    if next_tick < time.monotonic():      # fell behind (suspended): resync
                        next_tick = time.monotonic() + self.interval
                    if not self.paused:
                        self._refresh_data()
                        if self.count is not None and self.refreshes >= self.count:
                            self.draw()
                            return
            if ch != -1 and self.handle_key(ch) is False:
                return

    def _refresh_data(self) -> None:
        snap: Snapshot = self.take()
        self.model.update(snap)
        self.refreshes += 1
        self.view = self.model.view()

    def rebuild(self) -> None:
        if self.model.cur is not None:
            self.view = self.model.view()

    def say(self, text: str, seconds: float = 4.0) -> None:
        self.message = text
        self.message_until = time.monotonic() + seconds

    def handle_key(self, ch: int) -> bool | None:
        """Apply one key (iotrace.top.keys); False means quit."""
        return keys.handle_key(self, ch)

    # -- drawing -------------------------------------------------------------------------------
    def table_height(self) -> int:
        h, _ = self.scr.getmaxyx()
        return max(1, h - HEADER_LINES - 1)

    def _put(self, y: int, x: int, text: str, attr: int = 0) -> None:
        h, w = self.scr.getmaxyx()
        if y >= h or x >= w - 1:
            return
        try:
            self.scr.addnstr(y, x, text, w - 1 - x, attr)
        except curses.error:
            pass

    def draw(self) -> None:
        scr = self.scr
        scr.erase()
        h, w = scr.getmaxyx()
        if w < MIN_W or h < MIN_H:
            for y, line in enumerate(too_small_lines(w, h)):
                self._put(y, 0, line, self.attr.get("title", 0))
        elif self.show_help:
            for y, line in enumerate(HELP.splitlines()[:h - 1]):
                self._put(y, 0, line, self.attr["title"] if y == 0 else 0)
        else:
            self._draw_main(h, w)
        scr.noutrefresh()
        curses.doupdate()

    def _draw_main(self, h: int, w: int) -> None:
        self._draw_title(w)
        self._draw_sources()
        self._draw_totals()
        shown = self._draw_table(h, w)
        self._draw_status(h, shown)

    def _draw_title(self, w: int) -> None:
        """Line 0: host, time, interval, sort; PAUSED on the right."""
        snap, m = self.view.snapshot, self.model
        _, desc, _ = SORT_KEYS[m.sort]
        arrow = "^" if (desc == m.reverse) else "v"
        title = (f"iotrace top - {snap.host} - {time.strftime('%H:%M:%S', time.localtime(snap.wall))}"
                 f" - every {self.interval:g}s - sort {m.sort} {arrow}")
        self._put(0, 0, title, self.attr["title"])
        if self.paused:
            tag = " PAUSED "
            self._put(0, max(0, w - 1 - len(tag)), tag, self.attr["paused"])

    def _draw_sources(self) -> None:
        """Line 1: each source, up or DOWN!, its events, lost events and probes."""
        v, A = self.view, self.attr
        self._put(1, 0, "sources:")
        x = 9
        for st in v.snapshot.stats:
            if st.up:
                s = f"{st.name} up"
                attr = 0
            else:
                s = f"{st.name} DOWN!"
                attr = A["down"]
            s += f" ev {fmt_count(st.events)} lost {fmt_count(st.lost)}"
            if v.lost_delta.get(st.name):
                s += f" (+{v.lost_delta[st.name]})!"
                attr = A["lost"]
            if st.probes_attached or st.probes_failed:
                s += f" probes {st.probes_attached}"
                if st.probes_failed:
                    s += f" ({st.probes_failed} failed)!"
                    attr = A["down"]
            damage = damage_text(st, ", {} chunk(s) skipped", ", truncated")
            if st.decode_errors or damage:
                s += f" damaged: {st.decode_errors} undecodable{damage}!"
                attr = A["lost"]
            if not st.up and st.error:
                s += f": {st.error}"
            self._put(1, x, s, attr)
            x += len(s) + 3
        if v.unprobed:                   # domains whose device model is not probed: why
            snap = v.snapshot
            names = {d: (snap.domains[d].name if d in snap.domains else str(d)) for d in v.unprobed}
            first = min(v.unprobed)
            s = (f"not probed: {', '.join(names[d] for d in sorted(v.unprobed))}! "
                 f"({names[first]}: {v.unprobed[first]})")
            self._put(1, x, s, A["down"])

    def _draw_totals(self) -> None:
        """Line 2: totals over the domains shown, and the filter."""
        v, m = self.view, self.model
        tot = (f"{v.domains_shown} domain{'' if v.domains_shown == 1 else 's'}  "
               f"{fmt_count(v.total_req_rate)} req/s  "
               f"{fmt_bytes(v.total_byte_rate)} B/s  rd {fmt_count(v.total_read_rate)}/s  "
               f"wr {fmt_count(v.total_write_rate)}/s")
        desc_f = m.filter.describe()
        if desc_f and not v.rows:              # the totals are all 0: say why instead
            self._put(2, 0, f"the filter matches nothing: {desc_f}", self.attr["slow"])
            return
        if desc_f:
            tot += f"  filter: {desc_f}"
        self._put(2, 0, tot)

    def _draw_table(self, h: int, w: int) -> int:
        """Line 3: the column header; then the rows that fit, scrolled to keep the selected one
        visible. Returns how many rows there are."""
        A, m = self.attr, self.model
        cols = layout(w)
        self._put(3, 0, render_header(cols).ljust(w - 1), A["head"])
        rows = self.view.rows
        th = self.table_height()
        idents = [r.ident for r in rows]
        if rows and self.selected not in idents:
            self.selected = idents[0]
        sel = idents.index(self.selected) if rows else 0
        if sel < self.top:
            self.top = sel
        elif sel >= self.top + th:
            self.top = sel - th + 1
        self.top = max(0, min(self.top, max(0, len(rows) - th)))
        if not rows:
            what = "matching the filter " if m.filter.active() else ""
            self._put(HEADER_LINES, 2, f"no domains {what}seen yet")
        for i, row in enumerate(rows[self.top:self.top + th]):
            attr = 0
            if "lost" in row.flags:
                attr = A["lost"]
            elif "slow" in row.flags:
                attr = A["slow"]
            if row.ident == self.selected:
                attr |= curses.A_REVERSE
            self._put(HEADER_LINES + i, 0, render_row(row, cols), attr)
        return len(rows)

    def _draw_status(self, h: int, n_rows: int) -> None:
        """The last line: the filter prompt, a message, or the key hints."""
        th = self.table_height()
        if self.prompt is not None:
            self._put(h - 1, 0, "filter (Enter applies, Esc cancels): " + self.prompt,
                      self.attr["title"])
        elif self.message and time.monotonic() < self.message_until:
            self._put(h - 1, 0, self.message, self.attr["title"])
        else:
            more = f"  rows {self.top + 1}-{min(n_rows, self.top + th)}/{n_rows}" \
                if n_rows > th else ""
            self._put(h - 1, 0, "q quit  h help  s sort  f filter  enter expand  p pause" + more)


def run_screen(model: Model, take, interval: float, count: int | None,
               colour: bool = True) -> None:
    """Run the view until q (or ``count`` refreshes)."""
    screen = TopScreen(model, take, interval, count)
    screen.colour = colour
    # The terminal's own size, not LINES/COLUMNS from the environment: those are often stale
    # (exported by a parent, or by pytest) and would make curses draw past the real edge.
    # (curses.use_env(False) would not do: it falls back to terminfo's fixed size.)
    for var in ("LINES", "COLUMNS"):
        os.environ.pop(var, None)
    curses.wrapper(screen.run)
