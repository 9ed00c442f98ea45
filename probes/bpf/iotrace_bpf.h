/* Key/value layouts shared by probes/bpf/ioreq.bpf.c and their ctypes mirrors in probes/bpf/types.py
 * (which checks every size against the numbers in the comments: change both together). */
#ifndef IOTRACE_BPF_H
#define IOTRACE_BPF_H

/* Xen's ioreq_t, xen/include/public/hvm/ioreq.h (unchanged since 2007, whitespace only since 4.17):
 * 32 bytes. The bitfield byte @30 is state:4, data_is_ptr:1, dir:1 (1 = read), df:1, pad:1. */
struct xen_ioreq {
    u64 addr;     /* @0  physical address, port, or PCI SBDF+reg */
    u64 data;     /* @8  value, or guest address of a buffer when data_is_ptr */
    u32 count;    /* @16 repetitions */
    u32 size;     /* @20 bytes per access */
    u32 vp_eport; /* @24 event channel to notify the vCPU */
    u16 _pad0;    /* @28 */
    u8 flags;     /* @30 state & 0x0f, data_is_ptr 0x10, dir 0x20, df 0x40 */
    u8 type;      /* @31 IOREQ_TYPE_* */
};                /* 32 */

#define IOREQ_FLAG_DATA_IS_PTR 0x10
#define IOREQ_FLAG_DIR_READ    0x20
#define IOREQ_FLAG_DF          0x40

/* Metrics mode: one entry per (device model process, vCPU, type, dir, size, address bucket).
 * The bucket (mirrored by iotrace.probes.live.metrics_bucket, which tests compare with):
 *   IOREQ_TYPE_COPY (MMIO, 1)   the 4 KiB page: addr & ~0xfff
 *   IOREQ_TYPE_PCI_CONFIG (2)   SEG/BUS/DEV/FN without the register: addr & ~0xffffffff
 *                               (Xen packs SEG[63:48] BUS[47:40] DEV[39:35] FN[34:32] REG[31:0]:
 *                               xen/include/public/hvm/ioreq.h, IOREQ_TYPE_PCI_CONFIG)
 *   everything else             the exact address (port I/O: at most 65536 ports) */
#define IOREQ_TYPE_PIO        0
#define IOREQ_TYPE_COPY       1
#define IOREQ_TYPE_PCI_CONFIG 2
#define MMIO_BUCKET_MASK      0xfffffffffffff000ULL
#define PCI_BUCKET_MASK       0xffffffff00000000ULL

struct ioreq_key {
    u32 tgid; /* device model process; mapped to a domid in user space */
    s32 vcpu; /* -1: buffered request (no vCPU) */
    u8 type;
    u8 dir; /* 0 write, 1 read */
    u16 _pad;
    u32 size;
    u64 addr;
}; /* 24 */

/* Service-time histogram slots kept in kernel, log-linear as HDR histograms are, the slots of
 * iotrace.core.aggregate (hist_slots) and of the xentrace core (xtcore.h xt_slot): one slot per ns
 * below 16 ns, then HIST_SUB = 8 equal slots per power of two [2^(e-1), 2^e) up to 2^34 ns
 * (17.2 s); the last slot also takes anything longer. A quantile read off them is within 12.5%
 * (1/8) of the exact one. 256 slots (2 KiB) inside the value: one lookup per request serves every
 * field. */
#define HIST_SUB_BITS 3
#define HIST_MAX_EXP  34
#define HIST_SLOTS    ((HIST_MAX_EXP - HIST_SUB_BITS + 1) << HIST_SUB_BITS) /* 256 */

/* Bit length of v (0 for 0): six shifts, no loop (bpf has no clz instruction). */
static __always_inline u32 hist_bit_length(u64 v)
{
    u32 r = 0;
    if (v >> 32) {
        v >>= 32;
        r += 32;
    }
    if (v >> 16) {
        v >>= 16;
        r += 16;
    }
    if (v >> 8) {
        v >>= 8;
        r += 8;
    }
    if (v >> 4) {
        v >>= 4;
        r += 4;
    }
    if (v >> 2) {
        v >>= 2;
        r += 2;
    }
    if (v >> 1) {
        v >>= 1;
        r += 1;
    }
    return r + (u32)v;
}

/* The slot of a duration in ns: below 2^3 the value itself; from there the power of two's index
 * (e - 3) times 8 plus the 3 bits after the leading one; HIST_SLOTS - 1 from 2^34 ns on. The
 * caller still bounds the result with BOUNDED_INDEX before indexing (the verifier does not follow
 * this arithmetic). tests/probes/test_hist_slot.py compiles this function as plain C and compares
 * it with iotrace.core.aggregate.hist_slots. */
static __always_inline u32 hist_slot(u64 ns)
{
    u32 e = hist_bit_length(ns);
    if (e <= HIST_SUB_BITS)
        return (u32)ns;
    if (e > HIST_MAX_EXP)
        return HIST_SLOTS - 1;
    return ((e - HIST_SUB_BITS) << HIST_SUB_BITS) |
           ((u32)(ns >> (e - 1 - HIST_SUB_BITS)) & ((1u << HIST_SUB_BITS) - 1));
}

/* BOUNDED_INDEX(var, n): clamp the integer lvalue `var` to [0, n-1] (n a constant) in a way every
 * kernel's verifier can prove, before `var` indexes an array of n elements (in a map value, on the
 * stack). Why not plain C: for
 *     if (slot >= HIST_SLOTS) slot = HIST_SLOTS - 1;
 *     __sync_fetch_and_add(&s->hist[slot], 1);
 * clang compared a zero-extended COPY of slot in one register and indexed with the original in
 * another; kernel 6.18's verifier happened to follow that, Debian 12's 6.1 rejected the program
 * ("R8 unbounded memory access", issue #16). A mask (`& (N-1)`) is sound only for power-of-two N.
 * Here the test and the clamp are one asm block on one 64-bit register: the verifier sees
 * `if rX < n goto ok; rX = n-1; ok:` and knows rX is in [0, n-1] on both paths, and the compiler
 * must use that output register (a copy of it carries the same bounds) for the access; it cannot
 * move the check to another register because it does not see into the asm. Use it for every
 * computed index (the log-linear histogram slot, hist_slot above, included). */
#define BOUNDED_INDEX(var, n)                                                                      \
    do {                                                                                           \
        u64 __bi = (u64)(var);                                                                     \
        asm volatile("if %[i] < %[lim] goto l_in_%=\n\t"                                           \
                     "%[i] = %[last]\n"                                                            \
                     "l_in_%=:"                                                                    \
                     : [i] "+r"(__bi)                                                              \
                     : [lim] "i"(n), [last] "i"((n)-1));                                           \
        (var) = __bi;                                                                              \
    } while (0)

struct ioreq_stats {
    u64 count; /* requests (with TIMING: left 0 in kernel, = the sum of hist[]) */
    u64 bytes; /* size x count */
    u64 svc_n; /* requests with a service time (with TIMING: likewise = sum of hist[]) */
    u64 svc_sum_ns;
    u64 hist[HIST_SLOTS];
}; /* 2080 */

/* Event mode: one record per request through the ring buffer (snoop, record). */
struct ioreq_event {
    u64 ts_ns; /* bpf_ktime_get_ns() at entry (CLOCK_MONOTONIC) */
    u32 tgid;
    u32 tid;
    s32 vcpu;
    u8 type;
    u8 dir;
    u8 data_is_ptr;
    u8 df;
    u32 size;
    u32 count;
    u64 addr;
    u64 data;
    s64 service_ns; /* -1 when service timing is off */
};                  /* 56 */

/* What the entry probe leaves for the return probe, per thread. */
struct inflight {
    u64 ts_ns;
    struct ioreq_key k;
    u64 data;
    u32 count;
    u8 data_is_ptr;
    u8 df;
    u16 active; /* 1 between entry and return */
    u64 req;    /* the ioreq_t's address: a read's data is filled in by the time it returns */
};              /* 56 */

/* Indices of the per-CPU counters array. */
#define CNT_LOST_EVENTS 0 /* ring buffer full */
#define CNT_STATS_FULL  1 /* stats map full: request not counted */
#define CNT_READ_ERRORS 2 /* ioreq_t could not be read */
#define CNT_NO_ENTRY    3 /* return without entry (attached mid-request), or no slot */
#define N_COUNTERS      4

#endif
