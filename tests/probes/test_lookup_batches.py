"""loader.lookup_batches on a real BPF hash map (root): every entry once, across batch
boundaries, through bounded buffers (BCC's items_lookup_batch zeroes max_entries-sized ones on
every call: 138 MB for the stats map, the real-Xen Dom0's unanswered /metrics)."""
from __future__ import annotations

import ctypes as ct
import time
from pathlib import Path

import pytest

from iotrace.probes.bpf import loader

pytestmark = [pytest.mark.root, pytest.mark.integration]

PROGRAM = str(Path(__file__).with_name("bpf") / "big_hash.bpf.c")


@pytest.fixture(scope="module")
def table():
    bcc = loader.import_bcc()
    b = bcc.BPF(src_file=PROGRAM)
    t = b[b"h"]
    for i in range(5000):
        v = t.Leaf()
        v.a = i * 7
        t[t.Key(i * 13)] = v
    yield t
    b.cleanup()


@pytest.mark.parametrize("size", [1, 7, 1024, 65536])
def test_every_entry_once_whatever_the_batch(table, size):
    got = loader.lookup_batches(table, size=size)
    assert sorted((k.value, v.a) for k, v in got) == [(i * 13, i * 7) for i in range(5000)]


def test_the_copies_outlive_the_buffers(table):
    got = loader.lookup_batches(table, size=16)
    again = loader.lookup_batches(table, size=16)        # the same buffers' sizes reused
    assert [(k.value, v.a) for k, v in got] == [(k.value, v.a) for k, v in again]
    assert all(isinstance(k, ct.Structure) or isinstance(k, ct._SimpleCData) for k, _ in got)


def test_an_empty_map_reads_empty():
    bcc = loader.import_bcc()
    b = bcc.BPF(src_file=PROGRAM)
    try:
        assert loader.lookup_batches(b[b"h"]) == []
    finally:
        b.cleanup()


def test_bounded_buffers_cost_less_than_bccs(table):
    """Not a timing assertion on its own: the same map read both ways in this run, ours must
    not be the slower (BCC's allocates 65,536 x 2 KiB per call; ours 1,024 entries)."""
    t0 = time.perf_counter()
    loader.lookup_batches(table)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    list(table.items_lookup_batch())
    bccs = time.perf_counter() - t0
    assert ours < bccs, (ours, bccs)
