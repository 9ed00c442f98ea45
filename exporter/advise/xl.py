"""The ``xl`` backend: Xen credit2 per-domain weights (and caps, opt-in) through ``xl sched-credit2``.

Command lines, as xl documents them (xl(1) "sched-credit2"; tools/xl/xl_cmdtable.c; parsed by
tools/xl/xl_sched.c main_sched_credit2 with getopt "d:w:c:p:r:s"):

    xl sched-credit2 -d DOMID            # read: header "Name ID Weight Cap", one row per domain,
                                         #   printed "%-33s %4d %6d %4d" (sched_credit2_domain_output)
    xl sched-credit2                     # read all: "Cpupool NAME: ratelimit=...", header, rows
    xl sched-credit2 -d DOMID -w WEIGHT  # set the weight (1..65535, default 256)
    xl sched-credit2 -d DOMID -c CAP     # set the cap, % of one pCPU (0 = none): --allow-caps only

Changes are runtime only: Xen keeps them for the life of the domain, never in its config file
(a domain created again starts from its configured weight). Before every write the domain's
UUID is checked again with ``xl list -v`` (a domid reused between the analysis and the write is
another domain), and every write is read back.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from iotrace.analysis.host import XL_TIMEOUT, read_xl_list, xl_command
from iotrace.analysis.settings import MAX_CAP, XL_RANGE
from iotrace.core.errors import UserError

# "%-33s %4d %6d %4d": name (may hold spaces), ID, Weight, Cap.
_ROW = re.compile(r"^(?P<name>.*\S)\s+(?P<id>\d+)\s+(?P<weight>\d+)\s+(?P<cap>\d+)\s*$")


@dataclass(frozen=True)
class Credit2:
    domid: int
    name: str
    weight: int
    cap: int


def read_argv(xl: str, domid: int | None = None) -> list[str]:
    return [xl, "sched-credit2"] + (["-d", str(int(domid))] if domid is not None else [])


def weight_argv(xl: str, domid: int, weight: int) -> list[str]:
    if not XL_RANGE[0] <= int(weight) <= XL_RANGE[1]:
        raise ValueError(f"credit2 weight {weight} outside {XL_RANGE[0]}..{XL_RANGE[1]}")
    return [xl, "sched-credit2", "-d", str(int(domid)), "-w", str(int(weight))]


def cap_argv(xl: str, domid: int, cap: int) -> list[str]:
    if not 0 <= int(cap) <= MAX_CAP:
        raise ValueError(f"credit2 cap {cap} outside 0..{MAX_CAP}")
    return [xl, "sched-credit2", "-d", str(int(domid)), "-c", str(int(cap))]


def parse_sched_credit2(text: str) -> dict[int, Credit2]:
    """Rows of ``xl sched-credit2 [-d N]`` (pool lines and the header are skipped)."""
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith(("Cpupool ", "Name ")):
            continue
        m = _ROW.match(line)
        if m:
            d = int(m.group("id"))
            out[d] = Credit2(d, m.group("name"), int(m.group("weight")), int(m.group("cap")))
    return out


class XlError(UserError):
    exit_code = 1


class XlBackend:
    """Reads and sets credit2 weights/caps with the real ``xl`` (no Xen here: it fails, clearly)."""

    knob = "xl"

    def __init__(self, xl: str | None = None, timeout: float = XL_TIMEOUT):
        self.xl = xl or xl_command()
        self.timeout = timeout

    def _run(self, argv: list[str]) -> str:
        if not self.xl:
            raise XlError("xl is not installed here (the xl backend runs in a Xen Dom0)")
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise XlError(f"{' '.join(argv)}: no answer in {self.timeout:g} s") from None
        except OSError as exc:
            raise XlError(f"{' '.join(argv)}: {exc.strerror}") from None
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["exit status %d" % res.returncode])[-1]
            raise XlError(f"{' '.join(argv)} failed: {last}")
        return res.stdout

    def read_all(self) -> dict[int, Credit2]:
        return parse_sched_credit2(self._run(read_argv(self.xl)))

    def read(self, domid: int) -> Credit2:
        rows = parse_sched_credit2(self._run(read_argv(self.xl, domid)))
        if domid not in rows:
            raise XlError(f"xl sched-credit2 -d {domid}: no row for domain {domid}")
        return rows[domid]

    def uuid_of(self, domid: int) -> str | None:
        doms = read_xl_list(self.xl, self.timeout)
        if doms is None:
            raise XlError("xl list -v failed: cannot check the domain's UUID")
        d = doms.get(domid)
        return d.uuid if d is not None else None

    def domid_of(self, uuid: str) -> int | None:
        """The current domid of the domain with this UUID (None: not running)."""
        doms = read_xl_list(self.xl, self.timeout) or {}
        for d in doms.values():
            if d.uuid == uuid:
                return d.domid
        return None

    def _check_uuid(self, domid: int, uuid: str | None) -> None:
        if uuid is None:
            return
        now = self.uuid_of(domid)
        if now != uuid:
            raise XlError(f"domain {domid} is now {now or 'gone'}, not {uuid}: not changed")

    def set_weight(self, domid: int, weight: int, uuid: str | None = None) -> list[str]:
        """Set and read back; returns the command line run."""
        argv = weight_argv(self.xl or "xl", domid, weight)
        self._check_uuid(domid, uuid)
        self._run(argv)
        got = self.read(domid).weight
        if got != int(weight):
            raise XlError(f"{' '.join(argv)}: read back weight {got}, not {weight}")
        return argv

    def set_cap(self, domid: int, cap: int, uuid: str | None = None) -> list[str]:
        argv = cap_argv(self.xl or "xl", domid, cap)
        self._check_uuid(domid, uuid)
        self._run(argv)
        got = self.read(domid).cap
        if got != int(cap):
            raise XlError(f"{' '.join(argv)}: read back cap {got}, not {cap}")
        return argv
