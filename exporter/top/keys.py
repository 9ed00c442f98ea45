"""The keys of the full-screen view: what each one does to the view's state.

``handle_key(scr, ch)`` applies one key to a ``iotrace.top.screen.TopScreen`` (its model, selection,
prompt, pause and help state) and returns False to quit. The keys are listed in the view's help
(``iotrace.top.screen.HELP``) and tested through tmux (tests/top/test_tui.py).
"""
from __future__ import annotations

import curses

from iotrace.core.filters import FilterError, parse_filter_spec
from iotrace.top.columns import SORT_KEYS, Row


def selected_row(scr) -> Row | None:
    if not scr.view or not scr.view.rows:
        return None
    for r in scr.view.rows:
        if r.ident == scr.selected:
            return r
    return scr.view.rows[0]

def move(scr, step: int) -> None:
    rows = scr.view.rows if scr.view else []
    if not rows:
        return
    idents = [r.ident for r in rows]
    i = idents.index(scr.selected) if scr.selected in idents else 0
    i = max(0, min(len(rows) - 1, i + step))
    scr.selected = idents[i]

def handle_key(scr, ch: int) -> bool | None:
    """Apply one key; False means quit."""
    if ch == curses.KEY_RESIZE:
        return None
    if scr.prompt is not None:
        return _prompt_key(scr, ch)
    if scr.show_help:
        scr.show_help = False
        if ch in (ord("q"), ord("Q")):
            return False
        return None
    key = chr(ch) if 0 <= ch < 256 else ""
    m = scr.model
    row = selected_row(scr)
    domid = row.domid if row else None
    if key in ("q", "Q"):
        return False
    if key in ("h", "?"):
        scr.show_help = True
    elif key in ("p", " "):
        scr.paused = not scr.paused
    elif key == "s":
        m.cycle_sort(1)
        scr.say(f"sort: {SORT_KEYS[m.sort][2]}")
    elif key == "S":
        m.cycle_sort(-1)
        scr.say(f"sort: {SORT_KEYS[m.sort][2]}")
    elif key == "i":
        m.reverse = not m.reverse
    elif ch in (curses.KEY_DOWN,) or key == "j":
        move(scr, 1)
    elif ch in (curses.KEY_UP,) or key == "k":
        move(scr, -1)
    elif ch == curses.KEY_NPAGE:
        move(scr, scr.table_height())
    elif ch == curses.KEY_PPAGE:
        move(scr, -scr.table_height())
    elif ch == curses.KEY_HOME:
        move(scr, -10 ** 9)
    elif ch == curses.KEY_END:
        move(scr, 10 ** 9)
    elif domid is not None and (key in ("\n", "\r", "+", "l") or
                                ch in (curses.KEY_ENTER, curses.KEY_RIGHT)):
        exp = m.expansion(domid)
        if "vcpu" in exp and "range" in exp:
            _collapse(scr, domid)
        else:
            for what in ("vcpu", "range"):
                if what not in m.expansion(domid):
                    m.toggle(domid, what)
        scr.selected = ("domain", domid)
    elif domid is not None and (key == "-" or ch == curses.KEY_LEFT):
        _collapse(scr, domid)
        scr.selected = ("domain", domid)
    elif domid is not None and key in ("v", "r", "a"):
        m.toggle(domid, {"v": "vcpu", "r": "range", "a": "addr"}[key])
    elif key in ("V", "R", "A"):
        m.toggle_all({"V": "vcpu", "R": "range", "A": "addr"}[key])
    elif key in ("f", "/"):
        scr.prompt = ""
    elif key == "c":
        m.filter = parse_filter_spec("")
        scr.say("filters cleared")
    elif key == "d" and row is not None:
        if m.filter.domains == [str(row.domid)]:
            m.filter.domains = []
        else:
            m.filter.domains = [str(row.domid)]
    else:
        return None
    scr.rebuild()
    return None

def _collapse(scr, domid: int) -> None:
    for what in ("addr", "range", "vcpu"):
        if what in scr.model.expansion(domid):
            scr.model.toggle(domid, what)

def _prompt_key(scr, ch: int):
    if ch in (27,):                                  # Esc: cancel
        scr.prompt = None
    elif ch in (10, 13, curses.KEY_ENTER):
        text, scr.prompt = scr.prompt, None
        try:
            scr.model.filter = parse_filter_spec(text or "", scr.model.filter) \
                if text and text.strip() else parse_filter_spec("")
            desc = scr.model.filter.describe()
            scr.say(f"filter: {desc}" if desc else "filters cleared")
        except FilterError as exc:
            scr.say(f"bad filter: {exc}", 6.0)
        scr.rebuild()
    elif ch in (curses.KEY_BACKSPACE, 127, 8):
        scr.prompt = scr.prompt[:-1]
    elif 32 <= ch < 127:
        scr.prompt += chr(ch)
    return None
