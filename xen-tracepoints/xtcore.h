/* xtcore.h - the compiled core of the xentrace decoder: shared types and constants.
 *
 * One pass over a capture, in fixed-size chunks:
 *
 *   xtwalk.c    record boundaries, window framing, validation; each record that matters becomes a
 *               row in its pCPU's queue (the TSC of records without one is their pCPU's last TSC)
 *   xtorder.c   the watermark (below it every pCPU's stream has been read) and the merge of the
 *               per-pCPU queues in TSC order up to it
 *   xtdecode.c  the default machine: owner of each pCPU, each vCPU's open exit, every I/O record
 *               with its guest RIP and service time
 *   xtcompat.c  the xenalyze-compatible machine (its counting rules, for parity checks)
 *   xtout.c     the outputs: event rows (EVENT_DTYPE) and cells aggregated by key
 *   xtcore.c    the API the Python side (iotrace.xentrace.native) calls through ctypes
 *
 * Facts about the format and the events are in catalogue.py (cited from Xen's
 * xen/include/public/trace.h, tools/xentrace/xentrace.c, xen/common/trace.c); the ids below
 * mirror it and a test compares them (xt_constants).
 */
#ifndef XTCORE_H
#define XTCORE_H

#include <stddef.h>
#include <stdint.h>

/* ---- ids (xen/include/public/trace.h); mirrored in catalogue.py, compared by a test ---- */
#define XT_CPU_CHANGE_HEADER 0x2001f003u /* TRC_TRACE_CPU_CHANGE | 2 << 28 */
#define XT_EVENT_MASK        0x0fffffffu
#define XT_LOST_RECORDS      0x0001f001u
#define XT_RUNSTATE_CHANGE   0x00021001u
#define XT_RUNSTATE_MASK     0x0ffff00fu
#define XT_CONTINUE_RUNNING  0x00021002u
#define XT_VMENTRY           0x00081001u
#define XT_VMX_EXIT          0x00081002u
#define XT_SVM_EXIT          0x00081003u
#define XT_64_FLAG           0x100u
#define XT_EXIT_ID_MASK      0x0ffffeffu /* exit ids without TRC_64_FLAG */
#define XT_IO_ID_MASK        0x0ffffcffu /* I/O ids without TRC_64_FLAG and the write bit */
#define XT_IOPORT_READ       0x00082016u
#define XT_IOMEM_READ        0x00082017u
#define XT_IO_WRITE_BIT      0x200u
#define XT_RUNNING           0
#define XT_RUNNABLE          1
#define XT_VGA_START         0xa0000u /* xenalyze.c MMIO_VGA_START / MMIO_VGA_END ('<') */
#define XT_VGA_END           0xbffffu
#define XT_MAX_PCPU_ID       65535 /* window headers naming a pCPU above this are corrupt */
/* Handlers that claim xenalyze's per-exit post-process slot before an I/O record can
 * (hvm_set_postprocess callers in xenalyze.c: pf_xen, cr_write, msr_read, msr_write, vmcall):
 * TRC_HVM_PF_XEN, _PF_XEN64, _CR_WRITE, _CR_WRITE64, _MSR_READ, _MSR_WRITE, _VMMCALL. */
#define XT_CLAIMING_IDS                                                                            \
    {                                                                                              \
        0x00082001u, 0x00082101u, 0x00082009u, 0x00082109u, 0x0008200cu, 0x0008200du, 0x00082012u  \
    }

/* ---- flags of xt_new ---- */
#define XT_F_EVENTS   1 /* keep event rows for xt_take_events */
#define XT_F_CELLS    2 /* aggregate into cells */
#define XT_F_CELL_RIP 4 /* cells keyed by guest RIP too */
#define XT_F_COMPAT   8 /* xenalyze's counting rules instead of the default ones */

/* ---- row kinds: what the machines are fed, per pCPU in TSC order ---- */
enum {
    R_RUNSTATE = 1, /* w = domid << 16 | vcpu, f = old << 4 | new */
    R_CONTINUE,     /* w = domid << 16 | vcpu */
    R_LOST,         /* w = did | vid << 16 (trace.c packing); compat: at its first lost TSC */
    R_LOST_END,     /* compat only: the same record again at its own TSC */
    R_EXIT,         /* a = guest RIP */
    R_ENTRY,
    R_IO,   /* a = addr, b = data, f = IO_* bits */
    R_CLAIM /* compat only: a handler that claims xenalyze's post-process slot */
};
#define IO_MMIO 1
#define IO_READ 2
#define IO_REP  4 /* data words omitted: data_is_ptr */
#define IO_64   8

typedef struct {
    uint64_t tsc;
    uint64_t seq; /* the record's number in the file: ties of TSC across pCPUs in file order */
    uint64_t a, b;
    uint32_t w;
    uint8_t kind, f;
    uint16_t cpu; /* dense pCPU index */
} xt_row;

/* One I/O request, laid out exactly as iotrace.core.events.EVENT_DTYPE (packed, 60 bytes). */
#pragma pack(push, 1)
typedef struct {
    int64_t ts_ns;
    int32_t domid, vcpu;
    uint8_t type, dir, data_is_ptr, df;
    uint32_t size, count;
    uint64_t addr, data;
    int64_t service_ns;
    uint64_t rip;
} xt_event;
#pragma pack(pop)

/* A cell's key and totals, laid out as iotrace.xentrace.native's CELL_KEY / CELL_VAL dtypes. */
typedef struct {
    int32_t domid, vcpu;
    uint8_t type, dir, pad[6];
    uint64_t addr, rip;
} xt_cell_key;
typedef struct {
    uint64_t count, svc_n, svc_sum_ns;
    int64_t svc_min_ns, svc_max_ns;
} xt_cell_val;
/* Service-time histogram slots, as iotrace.core.aggregate's (and probes/bpf/iotrace_bpf.h's):
 * below 16 ns one slot per ns, then 8 slots per power of two [2^(e-1), 2^e) up to 2^34 ns; the
 * last slot also takes anything longer. */
#define XT_SUB_BITS  3
#define XT_MAX_EXP   34
#define XT_SLOTS     ((XT_MAX_EXP - XT_SUB_BITS + 1) << XT_SUB_BITS) /* 256 */
#define XT_MAX_CELLS 65536 /* distinct keys kept exactly (xtout.c: the rest fold into "other") */
#define XT_KEY_OTHER UINT64_MAX /* addr / rip of the cells that gather keys beyond the bound */

/* ---- per pCPU ---- */
typedef struct {
    int32_t id;        /* pCPU number in the file */
    int has_tsc;       /* a record with a TSC was seen */
    uint64_t last_tsc; /* its last TSC: records without one take it */
    uint64_t lb;       /* no row of this pCPU still unread has a TSC below this (xtorder.c) */
    uint64_t gap_lb;   /* the same for pCPUs not seen yet whose ids lie after this one's */
    xt_row *q;         /* rows not yet merged: ring buffer */
    int64_t qhead, qlen, qcap;
    int32_t owner;  /* default machine: vCPU table index of the current vCPU, -1 unknown */
    int32_t xa_cur; /* compat machine: vCPU table index, -1 none */
    int32_t pseudo; /* vCPU table index standing for "owner unknown" on this pCPU */
} xt_pcpu;

/* ---- per vCPU (domid << 16 | vcpu; pseudo vCPUs for unknown owners have key < 0) ---- */
typedef struct {
    int64_t key;
    int32_t domid, vcpu;
    /* default machine: the open exit and the I/O records waiting for its end */
    uint8_t exit_open, end_known;
    uint64_t exit_tsc, end_tsc, rip;
    int32_t pend_head, pend_tail;
    /* compat machine (xenalyze's hvm_data): see xtcompat.c */
    uint8_t xa_valid, xa_seen_rs, xa_claim, xa_post, xa_pio_dir, xa_mmio_dir, xa_data_valid;
    int8_t xa_rstate; /* runstate, -1 lost, -2 never seen */
    uint64_t xa_exit_tsc, xa_gpa;
    uint32_t xa_port;
    xt_event xa_io; /* the first I/O record of the exit */
} xt_vcpu;

/* A pending I/O record of the default machine: counted, waiting for its exit's end. */
typedef struct {
    int32_t next;
    int32_t cell; /* cell index, -1 without cells */
    xt_event ev;
} xt_pend;

/* Notes for the Python side's warnings (offsets are absolute byte offsets in the input). */
enum { N_OVERRUN = 1, N_RESYNC, N_NO_RESYNC, N_NOT_CAPTURE, N_REORDER_FULL, N_CELLS_FULL };
typedef struct {
    int64_t kind, offset, a, b;
} xt_note_rec;
#define XT_MAX_NOTES 128

/* Counters shared with Python as one int64 array (native.STATS names them, in this order). */
typedef struct {
    int64_t records;           /* complete records walked (window headers not counted) */
    int64_t windows;           /* window headers */
    int64_t decode_errors;     /* junk ids, bad layouts, overruns, corrupt window headers */
    int64_t lost_records;      /* sum of TRC_LOST_RECORDS counts */
    int64_t io_records;        /* I/O records decoded (events produced in the default mode) */
    int64_t started;           /* a valid window header was seen */
    int64_t remain_words;      /* words the current window still announces */
    int64_t skipping;          /* skipping the rest of a window after an overrun */
    int64_t status;            /* 0 ok, 1 not a capture, 2 out of memory */
    int64_t consumed;          /* absolute offset of the first byte not consumed */
    int64_t forced_rows;       /* rows merged before the watermark passed them (queues full) */
    int64_t late_rows;         /* rows that arrived below the watermark already passed */
    int64_t queued_rows;       /* rows waiting in the queues now */
    int64_t pending_io;        /* I/O records waiting for their exit's end now */
    int64_t cells;             /* cells now */
    int64_t overflow_requests; /* requests counted in an "other" cell (keys beyond the bound) */
    int64_t events_ready;      /* event rows ready for xt_take_events */
    int64_t pcpus;             /* distinct pCPUs seen */
    int64_t vcpus;             /* distinct vCPUs seen */
    int64_t watermark;         /* TSC below which rows have been merged */
    int64_t oldest_pending_ns; /* ts_ns of the oldest I/O record still waiting (events mode;
                                  INT64_MAX: none): every event before it has been emitted */
    int64_t n_notes;
    int64_t tsc_first; /* lowest TSC of any record with one (-1: none yet) */
    int64_t tsc_last;  /* highest: the capture's time span is tsc_last - tsc_first */
} xt_stats;

typedef struct xt_state xt_state;

/* The functions Python calls (xtcore.c); everything else stays inside the library. */
#define XT_API __attribute__((visibility("default")))

struct xt_state {
    int flags;
    double cpu_hz;
    xt_stats st;
    /* walk */
    int32_t cur_cpu;  /* dense index of the current window's pCPU, -1 before the first */
    int32_t prev_cpu; /* dense index of the previous window's pCPU, -1 none */
    int resyncing;
    /* pCPUs */
    xt_pcpu *pc;
    int32_t npc, cappc;
    int32_t *sorted; /* dense indices in increasing pCPU id */
    int32_t idmap_cap;
    int32_t *idmap; /* pCPU id -> dense index + 1 (0: unknown), grown on demand */
    /* order */
    uint64_t wm;
    uint64_t last_merged_tsc;
    int32_t *heap;
    /* vCPUs */
    xt_vcpu *vc;
    int32_t nvc, capvc;
    int32_t *vmap; /* open addressing: index + 1 */
    int64_t vmap_cap;
    /* outputs */
    xt_event *out;
    int64_t nout, capout;
    xt_pend *pend;
    int32_t npend, cappend, pend_free;
    xt_cell_key *ckey;
    xt_cell_val *cval;
    uint64_t *chist;
    int32_t ncell, capcell;
    int32_t *cmap;
    int64_t cmap_cap;
    xt_note_rec notes[XT_MAX_NOTES];
};

/* xtwalk.c */
int64_t xt_walk(xt_state *s, const uint32_t *w, int64_t nw, int final);
int32_t xt_pcpu_index(xt_state *s, int32_t id);

/* xtorder.c */
int xt_push_slow(xt_state *s, xt_pcpu *p, const xt_row *r);
void xt_window_start(xt_state *s, int32_t cpu);
void xt_drain(xt_state *s, int all);

/* xtdecode.c / xtcompat.c */
void xt_decode_row(xt_state *s, const xt_row *r);
void xt_decode_finish(xt_state *s);
void xt_compat_row(xt_state *s, const xt_row *r);

/* xtout.c */
int32_t xt_vcpu_index(xt_state *s, int64_t key, int32_t domid, int32_t vcpu);
int32_t xt_cell_index(xt_state *s, const xt_event *e);
xt_event *xt_out_push(xt_state *s);
void xt_emit(xt_state *s, const xt_event *e, int32_t cell);
int32_t xt_pend_alloc(xt_state *s);
void xt_note(xt_state *s, int64_t kind, int64_t offset, int64_t a, int64_t b);
void xt_oom(xt_state *s);
void *xt_grow(void *p, int64_t *cap, int64_t need, size_t elem);

/* ---- small hot helpers, inline ---- */
#define XT_QUEUE_MAX (1 << 20) /* rows waiting to be merged, 40 bytes each (xtorder.c) */

/* Append a row to its pCPU's queue (xtorder.c grows it, or merges early when all are full). */
static inline int xt_push(xt_state *s, xt_pcpu *p, const xt_row *r)
{
    if (p->qhead + p->qlen < p->qcap && s->st.queued_rows < XT_QUEUE_MAX) {
        p->q[p->qhead + p->qlen++] = *r;
        s->st.queued_rows++;
        return 0;
    }
    return xt_push_slow(s, p, r);
}

/* TSC cycles to ns at the state's rate: cycles * 1e9 / cpu_hz, truncated (the reference model
 * computes it the same way, in the same order). */
static inline int64_t xt_cycles_to_ns(const xt_state *s, uint64_t cycles)
{
    double ns = (double)cycles * 1e9 / s->cpu_hz;
    return ns >= 9.2e18 ? INT64_MAX : (int64_t)ns;
}

static inline void xt_cell_count(xt_state *s, int32_t cell)
{
    s->cval[cell].count++;
}

/* The histogram slot of a duration (iotrace.core.aggregate.hist_slots). */
static inline int xt_slot(int64_t ns)
{
    uint64_t v = ns > 0 ? (uint64_t)ns : 0;
    int e = v ? 64 - __builtin_clzll(v) : 0; /* bit length */
    if (e <= XT_SUB_BITS)
        return (int)v;
    if (e > XT_MAX_EXP)
        return XT_SLOTS - 1;
    return ((e - XT_SUB_BITS) << XT_SUB_BITS) |
           (int)((v >> (e - 1 - XT_SUB_BITS)) & ((1u << XT_SUB_BITS) - 1));
}

static inline void xt_cell_service(xt_state *s, int32_t cell, int64_t ns)
{
    xt_cell_val *v = &s->cval[cell];
    int slot = xt_slot(ns);
    v->svc_n++;
    v->svc_sum_ns += (uint64_t)ns;
    if (ns < v->svc_min_ns)
        v->svc_min_ns = ns;
    if (ns > v->svc_max_ns)
        v->svc_max_ns = ns;
    s->chist[(size_t)cell * XT_SLOTS + slot]++;
}

#endif
