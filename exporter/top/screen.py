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

from iotrace.top.model import (
    COLUMNS,
    SORT_KEYS,
    Column,
    FilterError,
    Model,
    Row,
    Snapshot,
    View,
    fmt_bytes,
    fmt_count,
    marker,
    parse_filter_spec,
)

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
  f /         filter, e.g.: domain=web* vcpu=0,1 range=com* type=pio
              (a bare word is a domain; field= alone clears that field)
  d           only the selected domain (again: all)     c   clear filters

REQ/s BYTES/s RD/s WR/s: rates over the last interval. BUSIEST: the range
(under a range: the address) with most requests, and its share. P50 P95:
service times over the interval. LOST: events the source lost.
'!' marks a row needing attention: lost events, or P95 above --slow.
DOWN! marks a source that is down."""


def layout(width: int) -> list[tuple[Column, int]]:
    """Columns that fit in ``width`` (incl. the 2-char marker), widening NAME and BUSIEST first."""
    usable = width - 1 - 2          # never write the last column (curses scrolls on it)
    base = [c for c in COLUMNS if not c.wide_only]
    cols = [(c, c.width) for c in base]
    used = sum(w for _, w in cols) + len(cols) - 1
    if used > usable:                # narrower than 80: drop columns from the right
        while cols and used > usable:
            c, w = cols.pop()
            used -= w + 1
        return cols
    # Wide terminal: more room for names, then the wide-only columns, then more for names again.
    used = _grow(cols, {"name": 16, "busiest": 18}, usable, used)
    for c in COLUMNS:
        if c.wide_only and used + 1 + c.width <= usable:
            cols.append((c, c.width))
            used += 1 + c.width
    _grow(cols, {"name": 28, "busiest": 28}, usable, used)
    return cols


def _grow(cols: list, limits: dict[str, int], usable: int, used: int) -> int:
    """Widen the columns named in ``limits`` up to those widths while room is left; new ``used``."""
    for i, (c, w) in enumerate(cols):
        if c.id in limits:
            extra = min(limits[c.id] - w, usable - used)
            if extra > 0:
                cols[i] = (c, w + extra)
                used += extra
    return used


def fit(text: str, width: int, right: bool) -> str:
    if len(text) > width:
        text = text[:max(0, width - 1)] + "~" if width > 1 else text[:width]
    return text.rjust(width) if right else text.ljust(width)


def _cell(c: Column, row: Row, width: int) -> str:
    if c.id == "busiest":
        full = c.get(row)
        if len(full) > width and row.busiest and len(row.busiest) <= width:
            full = row.busiest              # no room for the share: the name matters more
        return fit(full, width, c.right)
    return fit(c.get(row), width, c.right)


def render_row(row: Row, cols) -> str:
    """One table line. Child rows (vCPUs, ranges, addresses) have no ID, so their indented label
    takes the ID and NAME columns together (longer range names fit in 80 columns)."""
    if row.kind != "domain" and len(cols) >= 2 and cols[0][0].id == "domid" \
            and cols[1][0].id == "name":
        label = "  " * row.level + row.name
        first = fit(label, cols[0][1] + 1 + cols[1][1], False)
        rest = [_cell(c, row, w) for c, w in cols[2:]]
        return marker(row) + " ".join([first] + rest)
    return marker(row) + " ".join(_cell(c, row, w) for c, w in cols)


def render_header(cols) -> str:
    return "  " + " ".join(fit(c.header, w, c.right) for c, w in cols)


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

    def _rebuild(self) -> None:
        if self.model.cur is not None:
            self.view = self.model.view()

    def say(self, text: str, seconds: float = 4.0) -> None:
        self.message = text
        self.message_until = time.monotonic() + seconds

    # -- keys ----------------------------------------------------------------------------------
    def _selected_row(self) -> Row | None:
        if not self.view or not self.view.rows:
            return None
        for r in self.view.rows:
            if r.ident == self.selected:
                return r
        return self.view.rows[0]

    def _move(self, step: int) -> None:
        rows = self.view.rows if self.view else []
        if not rows:
            return
        idents = [r.ident for r in rows]
        i = idents.index(self.selected) if self.selected in idents else 0
        i = max(0, min(len(rows) - 1, i + step))
        self.selected = idents[i]

    def handle_key(self, ch: int) -> bool | None:
        """Apply one key; False means quit."""
        if ch == curses.KEY_RESIZE:
            return None
        if self.prompt is not None:
            return self._prompt_key(ch)
        if self.show_help:
            self.show_help = False
            if ch in (ord("q"), ord("Q")):
                return False
            return None
        key = chr(ch) if 0 <= ch < 256 else ""
        m = self.model
        row = self._selected_row()
        domid = row.domid if row else None
        if key in ("q", "Q"):
            return False
        if key in ("h", "?"):
            self.show_help = True
        elif key in ("p", " "):
            self.paused = not self.paused
        elif key == "s":
            m.cycle_sort(1)
            self.say(f"sort: {SORT_KEYS[m.sort][2]}")
        elif key == "S":
            m.cycle_sort(-1)
            self.say(f"sort: {SORT_KEYS[m.sort][2]}")
        elif key == "i":
            m.reverse = not m.reverse
        elif ch in (curses.KEY_DOWN,) or key == "j":
            self._move(1)
        elif ch in (curses.KEY_UP,) or key == "k":
            self._move(-1)
        elif ch == curses.KEY_NPAGE:
            self._move(self._table_height())
        elif ch == curses.KEY_PPAGE:
            self._move(-self._table_height())
        elif ch == curses.KEY_HOME:
            self._move(-10 ** 9)
        elif ch == curses.KEY_END:
            self._move(10 ** 9)
        elif domid is not None and (key in ("\n", "\r", "+", "l") or
                                    ch in (curses.KEY_ENTER, curses.KEY_RIGHT)):
            exp = m.expansion(domid)
            if "vcpu" in exp and "range" in exp:
                self._collapse(domid)
            else:
                for what in ("vcpu", "range"):
                    if what not in m.expansion(domid):
                        m.toggle(domid, what)
            self.selected = ("domain", domid)
        elif domid is not None and (key == "-" or ch == curses.KEY_LEFT):
            self._collapse(domid)
            self.selected = ("domain", domid)
        elif domid is not None and key in ("v", "r", "a"):
            m.toggle(domid, {"v": "vcpu", "r": "range", "a": "addr"}[key])
        elif key in ("V", "R", "A"):
            m.toggle_all({"V": "vcpu", "R": "range", "A": "addr"}[key])
        elif key in ("f", "/"):
            self.prompt = ""
        elif key == "c":
            m.filter = parse_filter_spec("")
            self.say("filters cleared")
        elif key == "d" and row is not None:
            if m.filter.domains == [str(row.domid)]:
                m.filter.domains = []
            else:
                m.filter.domains = [str(row.domid)]
        else:
            return None
        self._rebuild()
        return None

    def _collapse(self, domid: int) -> None:
        for what in ("addr", "range", "vcpu"):
            if what in self.model.expansion(domid):
                self.model.toggle(domid, what)

    def _prompt_key(self, ch: int):
        if ch in (27,):                                  # Esc: cancel
            self.prompt = None
        elif ch in (10, 13, curses.KEY_ENTER):
            text, self.prompt = self.prompt, None
            try:
                self.model.filter = parse_filter_spec(text or "", self.model.filter) \
                    if text and text.strip() else parse_filter_spec("")
                desc = self.model.filter.describe()
                self.say(f"filter: {desc}" if desc else "filters cleared")
            except FilterError as exc:
                self.say(f"bad filter: {exc}", 6.0)
            self._rebuild()
        elif ch in (curses.KEY_BACKSPACE, 127, 8):
            self.prompt = self.prompt[:-1]
        elif 32 <= ch < 127:
            self.prompt += chr(ch)
        return None

    # -- drawing -------------------------------------------------------------------------------
    def _table_height(self) -> int:
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
        v, m = self.view, self.model
        snap = v.snapshot
        A = self.attr
        # line 0: title
        attr_name, desc, _ = SORT_KEYS[m.sort]
        arrow = "^" if (desc == m.reverse) else "v"
        title = (f"iotrace top - {snap.host} - {time.strftime('%H:%M:%S', time.localtime(snap.wall))}"
                 f" - every {self.interval:g}s - sort {m.sort} {arrow}")
        self._put(0, 0, title, A["title"])
        if self.paused:
            tag = " PAUSED "
            self._put(0, max(0, w - 1 - len(tag)), tag, A["paused"])
        # line 1: sources
        x = 0
        self._put(1, 0, "sources:")
        x = 9
        for st in snap.stats:
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
            if not st.up and st.error:
                s += f": {st.error}"
            self._put(1, x, s, attr)
            x += len(s) + 3
        if v.unprobed:                   # domains whose device model is not probed: why
            names = {d: (snap.domains[d].name if d in snap.domains else str(d)) for d in v.unprobed}
            first = min(v.unprobed)
            s = (f"not probed: {', '.join(names[d] for d in sorted(v.unprobed))}! "
                 f"({names[first]}: {v.unprobed[first]})")
            self._put(1, x, s, A["down"])
        # line 2: totals and filter
        tot = (f"{v.domains_shown} domains  {fmt_count(v.total_req_rate)} req/s  "
               f"{fmt_bytes(v.total_byte_rate)} B/s  rd {fmt_count(v.total_read_rate)}/s  "
               f"wr {fmt_count(v.total_write_rate)}/s")
        desc_f = m.filter.describe()
        if desc_f:
            tot += f"  filter: {desc_f}"
        self._put(2, 0, tot)
        # line 3: column header, then the table
        cols = layout(w)
        self._put(3, 0, render_header(cols).ljust(w - 1), A["head"])
        rows = v.rows
        th = self._table_height()
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
        # last line: prompt, message or key hints
        if self.prompt is not None:
            self._put(h - 1, 0, "filter (Enter applies, Esc cancels): " + self.prompt, A["title"])
        elif self.message and time.monotonic() < self.message_until:
            self._put(h - 1, 0, self.message, A["title"])
        else:
            more = f"  rows {self.top + 1}-{min(len(rows), self.top + th)}/{len(rows)}" \
                if len(rows) > th else ""
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
