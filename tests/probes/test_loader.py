"""probes/bpf/loader.py without a kernel: the verifier's verdict out of the logs kernels print, and
the test-only extra flags. (The real thing, on real kernels: tests/probes/test_health.py on the
host, the "refused" case of tests/vm/test_kernels.py on 6.1 and 6.12.)"""
from __future__ import annotations

from iotrace.probes.bpf import loader
from iotrace.probes.hook.resolve import Resolution

# Kernel 6.18 (the host), ioreq.bpf.c with -DIOTRACE_TEST_OOB=1, as BCC 0.26 prints it on stderr.
LOG_618 = """bpf: Failed to load program: Permission denied
Validating on_return() func#0...
0: R1=ctx() R10=fp0
; int on_return(struct pt_regs *ctx) @ main.c:234
0: (bf) r6 = r1                       ; R1=ctx() R6_w=ctx()
123: (0f) r2 += r8                    ; R2=map_value(map=stats,ks=24,vs=352,off=312) R8=map_value(map=stats,ks=24,vs=352)
124: (db) lock *(u64 *)(r2 +352) += r1
invalid access to map value, value_size=352 off=664 size=8
R2 min value is outside of the allowed memory range
processed 90 insns (limit 1000000) max_states_per_insn 0 total_states 9 peak_states 9 mark_read 0

"""

# Kernel 6.1 (Debian 12), the unfixed ioreq.bpf.c (issue #16): the refused instruction and the
# verdict as the kernel matrix reported them; the lines around them are shaped like 6.1's.
LOG_61 = """; __sync_fetch_and_add(&s->hist[slot], 1); @ main.c:256
128: (0f) r8 += r2                    ; R2_w=scalar() R8_w=map_value(off=0,ks=24,vs=352)
129: (db) lock *(u64 *)(r8 +32) += r1
R8 unbounded memory access, make sure to bounds check any such access
processed 1418 insns (limit 1000000) max_states_per_insn 5 total_states 106 peak_states 51 mark_read 9
"""

# libbpf's framing (newer BCC/libbpf print the log between markers).
LOG_LIBBPF = """libbpf: prog 'on_return': BPF program load failed: Permission denied
libbpf: prog 'on_return': -- BEGIN PROG LOAD LOG --
12: (79) r1 = *(u64 *)(r1 +0)
R1 invalid mem access 'scalar'
processed 13 insns (limit 1000000) max_states_per_insn 0 total_states 1 peak_states 1 mark_read 1
-- END PROG LOAD LOG --
libbpf: prog 'on_return': failed to load: -13
"""


def test_the_verdict_is_the_message_between_the_last_insn_and_the_statistics():
    assert loader.verifier_error(LOG_618) == (
        "invalid access to map value, value_size=352 off=664 size=8; R2 min value is outside of "
        "the allowed memory range (at insn 124: (db) lock *(u64 *)(r2 +352) += r1)")
    assert loader.verifier_error(LOG_61) == (
        "R8 unbounded memory access, make sure to bounds check any such access "
        "(at insn 129: (db) lock *(u64 *)(r8 +32) += r1)")
    assert loader.verifier_error(LOG_LIBBPF) == \
        "R1 invalid mem access 'scalar' (at insn 12: (79) r1 = *(u64 *)(r1 +0))"


def test_no_verifier_log_no_verdict():
    assert loader.verifier_error("") is None
    assert loader.verifier_error("bpf: Failed to load program: Operation not permitted\n") is None


def test_extra_cflags_come_from_the_environment_only(monkeypatch):
    res = Resolution(path="/x", build_id=None, func_vaddr=0x1000, func_offset=0x1000,
                     send_vcpu_offset=0x50)
    monkeypatch.delenv(loader.EXTRA_CFLAGS_ENV, raising=False)
    plain = loader.cflags_for(res, "metrics", True)
    assert not [f for f in plain if "IOTRACE_TEST" in f]
    monkeypatch.setenv(loader.EXTRA_CFLAGS_ENV, "-DIOTRACE_TEST_OOB=1 -DX='a b'")
    assert loader.cflags_for(res, "metrics", True) == plain + ["-DIOTRACE_TEST_OOB=1", "-DX=a b"]
    assert loader.describe("events", False) == "ioreq.bpf.c, events mode without service times"
