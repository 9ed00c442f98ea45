/* iotrace: uprobe (and optional return probe) on QEMU's
 *     static void handle_ioreq(XenIOState *state, ioreq_t *req)
 * (hw/i386/xen/xen-hvm.c up to QEMU 8.0, hw/xen/xen-hvm-common.c from 8.1).
 *
 * Build-time parameters (cflags from probes/bpf/loader.py, per binary):
 *   SEND_VCPU_OFF   offsetof(XenIOState, send_vcpu): 0x50 in QEMU 7.2, 0x48 from 8.1. cpu_get_ioreq
 *                   sets it before cpu_handle_ioreq calls handle_ioreq(state, &copy) on a stack
 *                   copy, so the vCPU cannot be derived from req's address.
 *   HAVE_BUF, BUF_LO, BUF_HI   return addresses (as deltas from handle_ioreq's own address, so the
 *                   PIE load base cancels) that belong to handle_buffered_iopage: its requests are a
 *                   zeroed local ioreq_t with no vCPU (send_vcpu is stale) -> vcpu -1.
 *   EVENT_MODE      1: one ring buffer record per request; 0: in-kernel aggregation only.
 *   TIMING          1: a return probe measures the service time (a second trap per request).
 *   STATS_ENTRIES, RINGBUF_PAGES   map sizes.
 *
 * Metrics mode keys by address BUCKET, not by address (events mode keeps the exact address): an
 * MMIO request (IOREQ_TYPE_COPY) by its 4 KiB page, a PCI config request by its SEG/BUS/DEV/FN
 * without the register, port I/O by its exact port (iotrace_bpf.h; mirrored in user space by
 * iotrace.probes.live.metrics_bucket). A guest sweeping a framebuffer or probing config registers
 * otherwise makes one new key per address (the Linux boot stream: 41,592 keys in 173,850
 * requests, a map insert for ~24% of them). Range names are unaffected as long as MMIO ranges are
 * page-aligned: a bucketed MMIO address names the range its page START falls in.
 *
 * Hot path in metrics mode without timing: one user read of the stack window holding the return
 * address and the ioreq_t (two reads if they are apart) and one of send_vcpu (not for a buffered
 * request), one hash lookup (an insert and a second lookup for a new key) and two atomic adds.
 * With timing the entry only fills the thread's task-local slot and the return probe does the
 * lookup-or-insert and three atomic adds: bytes, service time sum, histogram slot (a request
 * whose return is never seen, e.g. the process was killed while serving it, is not counted). No
 * per-request wake-up of user space in metrics mode.
 */
#include <uapi/linux/ptrace.h>
#include "iotrace_bpf.h"

/* The stack window read at entry: the return address and an ioreq_t up to 64 bytes above it. */
#define WIN_WORDS 12

BPF_PERCPU_ARRAY(counters, u64, N_COUNTERS);

static __always_inline void count(int idx)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        (*c)++;
}

#if EVENT_MODE
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
/* Entries are allocated as keys appear (2080-byte values: no preallocation of the whole map). */
BPF_F_TABLE("hash", struct ioreq_key, struct ioreq_stats, stats, STATS_ENTRIES, BPF_F_NO_PREALLOC);
/* A zeroed value to initialise new entries from (too big for the 512-byte BPF stack). */
BPF_ARRAY(zero_stats, struct ioreq_stats, 1);

static __always_inline struct ioreq_stats *stats_for(struct ioreq_key *k)
{
    struct ioreq_stats *s = stats.lookup(k);
    if (s)
        return s; /* the hot path: one hash lookup */
    int idx = 0;
    struct ioreq_stats *zero = zero_stats.lookup(&idx);
    if (!zero)
        return 0;
    /* Insert if absent (-EEXIST when another CPU was first is fine), then look it up: one lookup
     * fewer than lookup_or_try_init, which starts with a lookup that just missed here. */
    stats.insert(k, zero);
    s = stats.lookup(k);
    if (!s)
        count(CNT_STATS_FULL);
    return s;
}
#endif

#if TIMING
/* Per-thread slot for the request in progress (task local storage: no hashing, no lock, and it
 * goes away with the thread). */
BPF_TASK_STORAGE(inflight, struct inflight);
#endif

#if EVENT_MODE
static __always_inline void emit(u64 ts, u64 pid_tgid, struct ioreq_key *k, u64 data, u32 cnt,
                                 u8 data_is_ptr, u8 df, s64 service_ns)
{
    struct ioreq_event ev = {};
    ev.ts_ns = ts;
    ev.tgid = pid_tgid >> 32;
    ev.tid = (u32)pid_tgid;
    ev.vcpu = k->vcpu;
    ev.type = k->type;
    ev.dir = k->dir;
    ev.data_is_ptr = data_is_ptr;
    ev.df = df;
    ev.size = k->size;
    ev.count = cnt;
    ev.addr = k->addr;
    ev.data = data;
    ev.service_ns = service_ns;
    if (events.ringbuf_output(&ev, sizeof(ev), 0) != 0)
        count(CNT_LOST_EVENTS);
}
#endif

int on_entry(struct pt_regs *ctx)
{
    struct xen_ioreq req;
    u64 rq = PT_REGS_PARM2(ctx);
#if HAVE_BUF
    u64 sp = PT_REGS_SP(ctx);
    /* At the first instruction the return address is at [rsp]; the uprobe sets ip to the probed
     * address (kernel/events/uprobes.c handle_swbp), so ret - ip is a link-time constant. Both
     * callers pass a local of their own frame (cpu_handle_ioreq's `copy`, handle_buffered_iopage's
     * `req`), usually a few words above the return address: then one user read of that window
     * brings both (each bpf_probe_read_user costs ~50-100 ns); otherwise two reads. */
    u64 ret = 0;
    u64 dlt = rq - sp;
    u64 win[WIN_WORDS];
    if (dlt >= 8 && dlt + sizeof(req) <= sizeof(win) && !(dlt & 7) &&
        bpf_probe_read_user(win, sizeof(win), (void *)sp) == 0) {
        /* dlt is 8..64 here: the ioreq_t is win[1 + j .. 4 + j], j = 0..7 (the mask is for the
         * verifier, which needs the variable stack offset bounded). */
        u64 *w = &win[1] + (((dlt >> 3) - 1) & 7);
        u64 *rw = (u64 *)&req;
        ret = win[0];
        rw[0] = w[0];
        rw[1] = w[1];
        rw[2] = w[2];
        rw[3] = w[3];
    } else {
        if (bpf_probe_read_user(&req, sizeof(req), (void *)rq) != 0) {
            count(CNT_READ_ERRORS);
            return 0;
        }
        bpf_probe_read_user(&ret, sizeof(ret), (void *)sp);
    }
#else
    if (bpf_probe_read_user(&req, sizeof(req), (void *)rq) != 0) {
        count(CNT_READ_ERRORS);
        return 0;
    }
#endif
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct ioreq_key k = {};
    k.tgid = pid_tgid >> 32;
    k.vcpu = -1;
    k.type = req.type;
    k.dir = (req.flags & IOREQ_FLAG_DIR_READ) ? 1 : 0;
    k.size = req.size;
    k.addr = req.addr;
#if !EVENT_MODE
    /* Metrics: the address bucket (see the header comment). */
    if (req.type == IOREQ_TYPE_COPY)
        k.addr &= MMIO_BUCKET_MASK;
    else if (req.type == IOREQ_TYPE_PCI_CONFIG)
        k.addr &= PCI_BUCKET_MASK;
#endif

    int buffered = 0;
#if HAVE_BUF
    s64 delta = (s64)(ret - PT_REGS_IP(ctx));
    buffered = delta >= BUF_LO && delta < BUF_HI;
#endif
    if (!buffered) {
        s32 v = -1;
        if (bpf_probe_read_user(&v, sizeof(v), (void *)(PT_REGS_PARM1(ctx) + SEND_VCPU_OFF)) == 0)
            k.vcpu = v;
    }

#if TIMING
    /* Counted at return, with its service time: one map update per request instead of two. */
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct inflight *in = inflight.task_storage_get(task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!in) {
        count(CNT_NO_ENTRY);
        return 0;
    }
    in->k = k;
    in->data = req.data;
    in->count = req.count;
    in->data_is_ptr = (req.flags & IOREQ_FLAG_DATA_IS_PTR) ? 1 : 0;
    in->df = (req.flags & IOREQ_FLAG_DF) ? 1 : 0;
    in->active = 1;
    in->req = rq;
    in->ts_ns = bpf_ktime_get_ns();
#elif EVENT_MODE
    emit(bpf_ktime_get_ns(), pid_tgid, &k, req.data, req.count,
         (req.flags & IOREQ_FLAG_DATA_IS_PTR) ? 1 : 0, (req.flags & IOREQ_FLAG_DF) ? 1 : 0, -1);
#else
    struct ioreq_stats *s = stats_for(&k);
    if (!s)
        return 0;
    __sync_fetch_and_add(&s->count, 1);
    __sync_fetch_and_add(&s->bytes, (u64)req.size * req.count);
#endif
    return 0;
}

int on_return(struct pt_regs *ctx)
{
#if TIMING
    u64 now = bpf_ktime_get_ns();
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct inflight *in = inflight.task_storage_get(task, 0, 0);
    if (!in || !in->active) {
        count(CNT_NO_ENTRY); /* attached while a request was being served */
        return 0;
    }
    in->active = 0;
    u64 d = now - in->ts_ns;
#if EVENT_MODE
    /* A read's value is what the device model answered: handle_ioreq writes it into req->data
     * (@8), and req (the caller's stack copy, or handle_buffered_iopage's local) is still live. */
    u64 data = in->data;
    if (in->k.dir == 1 && !in->data_is_ptr)
        bpf_probe_read_user(&data, sizeof(data), (void *)(in->req + 8));
    emit(in->ts_ns, bpf_get_current_pid_tgid(), &in->k, data, in->count, in->data_is_ptr, in->df,
         (s64)d);
#else
    struct ioreq_stats *s = stats_for(&in->k);
    if (!s)
        return 0;
    /* With timing every counted request has its service time binned, so count and svc_n both
     * equal the histogram's sum: they are left 0 here and derived in user space
     * (ProbeSet.stats_items), two atomic adds fewer per request. */
    __sync_fetch_and_add(&s->bytes, (u64)in->k.size * in->count);
    __sync_fetch_and_add(&s->svc_sum_ns, d);
    /* The last slot takes anything longer; BOUNDED_INDEX (iotrace_bpf.h) is the clamp a verifier
     * can follow on every kernel (a plain `if` was refused by 6.1's: issue #16). */
    u64 slot = hist_slot(d);
    BOUNDED_INDEX(slot, HIST_SLOTS);
#ifdef IOTRACE_TEST_OOB
    /* Test-only (IOTRACE_BPF_EXTRA_CFLAGS=-DIOTRACE_TEST_OOB=1, probes/bpf/loader.py): one slot
     * past the histogram, which every verifier refuses; tests/probes/test_health.py uses it to
     * prove that a program the kernel refuses makes the source down. */
    slot += HIST_SLOTS;
#endif
    __sync_fetch_and_add(&s->hist[slot], 1);
#endif
#endif
    return 0;
}
