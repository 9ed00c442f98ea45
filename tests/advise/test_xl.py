"""The xl backend (iotrace.advise.xl) against xl's own syntax and output, read from the real xl
binary of this machine (Xen 4.17's; no Xen runs here, so no command can succeed, and no stand-in
binary pretends otherwise). On a real Dom0, tests/xen runs `--apply xl` for real."""
from __future__ import annotations

import getopt

import pytest

from iotrace.advise import xl as XL
from iotrace.analysis.host import is_dom0
from support import xl as X


@pytest.fixture(scope="module")
def xl_strings():
    return X.strings(str(X.xl_binary()))


def credit2_help(strings) -> list[str]:
    i = strings.index("Get/set credit2 scheduler parameters")
    return list(strings[i:i + 8])


def test_credit2_options_are_documented_by_this_xl(xl_strings):
    helptext = "\n".join(credit2_help(xl_strings))
    assert "[-d <Domain> [-w[=WEIGHT]]]" in helptext
    assert "-d DOMAIN, --domain=DOMAIN" in helptext
    assert "-w WEIGHT, --weight=WEIGHT" in helptext
    assert "-c CAP,    --cap=CAP" in helptext


@pytest.mark.parametrize("argv", [
    XL.weight_argv("xl", 3, 128), XL.weight_argv("xl", 0, 65535), XL.weight_argv("xl", 7, 1),
    XL.cap_argv("xl", 3, 50), XL.cap_argv("xl", 3, 0), XL.read_argv("xl", 12), XL.read_argv("xl"),
])
def test_command_lines_parse_with_xl_s_own_getopt_string(xl_strings, argv):
    """main_sched_credit2 (tools/xl/xl_sched.c) parses its options with getopt "d:w:c:p:r:s"
    (SWITCH_FOREACH_OPT adds "h"): the same string, from this xl, parses ours completely."""
    spec = next(s for s in xl_strings if s.startswith("hd:w:c:p:r:s"))
    assert argv[:2] == ["xl", "sched-credit2"]
    opts, rest = getopt.getopt(argv[2:], spec)
    assert rest == []
    got = dict(opts)
    assert set(got) <= {"-d", "-w", "-c"}
    if "-w" in got:
        assert 1 <= int(got["-w"]) <= 65535 and "-c" not in got
    if len(argv) > 2:
        assert got["-d"].isdigit()             # a domid, never a name (names can be reused)


def test_weights_and_caps_outside_xl_s_range_are_refused():
    for bad in (0, 65536, -1):
        with pytest.raises(ValueError):
            XL.weight_argv("xl", 3, bad)
    with pytest.raises(ValueError):
        XL.cap_argv("xl", 3, -5)


def test_read_back_parses_what_this_xl_prints(xl_strings):
    """sched_credit2_domain_output prints "%-33s %4s %6s %4s" (header) and "%-33s %4d %6d %4d"
    (a row), after "Cpupool %s: ratelimit=%dus" when listing all domains."""
    assert "%-33s %4d %6d %4d" in xl_strings and "%-33s %4s %6s %4s" in xl_strings
    pool = next(s for s in xl_strings if s.startswith("Cpupool %s: ratelimit="))
    rows = [("Domain-0", 0, 512, 0), ("a guest with a long name, longer than 33", 17, 64, 50),
            ("web", 3, 65535, 0)]
    text = X.c_to_python(pool) % ("Pool-0", 1000) + "\n"
    text += "%-33s %4s %6s %4s\n" % ("Name", "ID", "Weight", "Cap")
    text += "".join("%-33s %4d %6d %4d\n" % r for r in rows)
    got = XL.parse_sched_credit2(text)
    assert got == {d: XL.Credit2(d, n, w, c) for n, d, w, c in rows}


def test_the_real_xl_fails_here_in_one_line():
    if is_dom0():
        pytest.skip("a real Dom0: xl works here")
    be = XL.XlBackend(str(X.xl_binary()))
    with pytest.raises(XL.XlError) as exc:
        be.read_all()
    msg = str(exc.value)
    assert "\n" not in msg and "sched-credit2 failed" in msg
    with pytest.raises(XL.XlError):
        be.set_weight(3, 128)


def test_no_xl_installed_is_one_line(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(XL.XlError, match="xl is not installed"):
        XL.XlBackend().read_all()
