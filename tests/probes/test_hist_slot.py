"""The kernel's histogram slot (probes/bpf/iotrace_bpf.h hist_slot) is the aggregator's: the
header's function compiled as plain C and run on edge values and random durations, compared with
iotrace.core.aggregate.hist_slots (which the xentrace core's xt_slot is compared with in
tests/xentrace). BCC compiles the same function into the probe; the live tests check what it
binned against the stand-in's durations."""
from __future__ import annotations

import subprocess

import numpy as np

from iotrace.core.aggregate import N_SLOTS, hist_slots
from iotrace.probes.bpf import types as T
from support import REPO, require_tool

PROGRAM = r"""
#include <stdint.h>
#include <stdio.h>
typedef uint64_t u64; typedef int64_t s64; typedef uint32_t u32; typedef int32_t s32;
typedef uint16_t u16; typedef uint8_t u8;
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
#include "iotrace_bpf.h"
int main(void)
{
    unsigned long long v;
    printf("%d\n", HIST_SLOTS);
    while (scanf("%llu", &v) == 1)
        printf("%u\n", hist_slot((u64)v));
    return 0;
}
"""


def test_kernel_slot_function_equals_the_aggregators(tmp_path):
    cc = require_tool("cc")
    src = tmp_path / "slot.c"
    src.write_text(PROGRAM)
    exe = tmp_path / "slot"
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-I", str(REPO / "probes" / "bpf"),
                    "-o", str(exe), str(src)], check=True)
    rng = np.random.default_rng(1)
    edges = [0, 1, 7, 8, 15, 16, 17, 1023, 1024, 1151, 1152, 2**33, 2**34 - 1, 2**34,
             2**40 + 5, 2**63, 2**64 - 1]
    values = edges + [int(x) for x in rng.integers(0, 2**36, 20_000, dtype=np.uint64)] + \
        [int(x) for x in (2.0 ** rng.uniform(0, 40, 20_000)).astype(np.uint64)]
    out = subprocess.run([str(exe)], input="\n".join(map(str, values)), capture_output=True,
                         text=True, check=True).stdout.split()
    assert int(out[0]) == N_SLOTS == T.HIST_SLOTS
    got = [int(x) for x in out[1:]]
    # hist_slots takes int64 (durations): values past 2^63 are in the last slot either way
    want = hist_slots(np.array([min(v, 2**63 - 1) for v in values], dtype=np.int64)).tolist()
    assert got == want
