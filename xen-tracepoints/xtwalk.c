/* xtwalk.c - the record walk: window framing, record boundaries, validation, rows.
 *
 * A xentrace file (tools/xentrace/xentrace.c, write_buffer) is a series of windows: a cpu_change
 * record (header 0x2001f003 = TRC_TRACE_CPU_CHANGE with 2 extra words, then s32 cpu, u32 window
 * bytes), then that many bytes of the pCPU's records. Each record (struct t_rec,
 * xen/include/public/trace.h) is a u32 header - event in bits 0-27, extra word count in bits
 * 28-30, TSC present in bit 31 - then 2 TSC words if bit 31 is set, then the extra words. A
 * record's length is only known from its header, so boundaries are walked one by one.
 *
 * Each record that one of the machines needs becomes a row in its pCPU's queue (xtorder.c);
 * the others are only counted. Damage is counted, never fatal once the first window header has
 * been seen: a record claiming more words than its window holds drops the rest of the window; a
 * corrupt window header resynchronises on the next plausible one.
 */
#include <stdlib.h>
#include <string.h>

#include "xtcore.h"

/* Trace classes of xen/include/public/trace.h (bits 16-27 of an id, TRC_GEN .. TRC_GUEST). */
static int class_known(uint32_t cls)
{
    switch (cls) {
    case 0x001:
    case 0x002:
    case 0x004:
    case 0x008:
    case 0x010:
    case 0x020:
    case 0x040:
    case 0x080:
    case 0x800:
        return 1;
    }
    return 0;
}

static int claims_postprocess(uint32_t ev)
{
    static const uint32_t ids[] = XT_CLAIMING_IDS;
    size_t i;
    for (i = 0; i < sizeof(ids) / sizeof(ids[0]); i++)
        if (ev == ids[i])
            return 1;
    return 0;
}

int32_t xt_pcpu_index(xt_state *s, int32_t id)
{
    int32_t i = s->idmap[id] - 1, k;
    xt_pcpu *p;

    if (i >= 0)
        return i;
    if (s->npc == s->cappc) {
        int64_t cap = s->cappc;
        xt_pcpu *np = xt_grow(s->pc, &cap, s->npc + 1, sizeof(*np));
        int32_t *ns = np ? realloc(s->sorted, cap * sizeof(int32_t)) : NULL;
        int32_t *nh = ns ? realloc(s->heap, cap * sizeof(int32_t)) : NULL;
        if (np)
            s->pc = np;
        if (ns)
            s->sorted = ns;
        if (!nh) {
            xt_oom(s);
            return -1;
        }
        s->heap = nh;
        s->cappc = (int32_t)cap;
    }
    i = s->npc++;
    p = &s->pc[i];
    memset(p, 0, sizeof(*p));
    p->id = id;
    p->owner = -1;
    p->xa_cur = -1;
    p->pseudo = xt_vcpu_index(s, -2 - (int64_t)id, -1, -1);
    s->idmap[id] = i + 1;
    /* keep s->sorted in increasing pCPU id (few pCPUs: insertion) */
    for (k = i; k > 0 && s->pc[s->sorted[k - 1]].id > id; k--)
        s->sorted[k] = s->sorted[k - 1];
    s->sorted[k] = i;
    /* until now it was one of the unseen pCPUs of its predecessor's gap (xtorder.c) */
    if (i > 0) {
        const xt_pcpu *m = &s->pc[s->sorted[k > 0 ? k - 1 : i]];
        p->lb = p->gap_lb = m->gap_lb;
    }
    s->st.pcpus = s->npc;
    return i;
}

static void bad(xt_state *s)
{
    s->st.decode_errors++;
}

/* One complete record at r (len words) of pCPU p: update the pCPU's TSC, push a row if needed. */
static void record(xt_state *s, xt_pcpu *p, int32_t cpu, const uint32_t *r)
{
    uint32_t h = r[0], ev = h & XT_EVENT_MASK, n = (h >> 28) & 7u, cls = ev >> 16;
    int tscf = (int)(h >> 31);
    const uint32_t *d = r + 1 + 2 * tscf;
    xt_row row;

    if (tscf) {
        int64_t t;
        p->last_tsc = (uint64_t)r[1] | ((uint64_t)r[2] << 32);
        p->has_tsc = 1;
        t = p->last_tsc > INT64_MAX ? INT64_MAX : (int64_t)p->last_tsc;
        if (s->st.tsc_first < 0 || t < s->st.tsc_first)
            s->st.tsc_first = t;
        if (t > s->st.tsc_last)
            s->st.tsc_last = t;
    }
    s->st.records++;
    row.tsc = p->last_tsc;
    row.seq = (uint64_t)s->st.records;
    row.cpu = (uint16_t)cpu;
    row.w = 0;
    row.a = row.b = 0;
    row.f = 0;

    if (cls == 0x008) { /* TRC_HVM */
        uint32_t sub = ev & 0xf000u;
        if (sub == 0x2000u) { /* TRC_HVM_HANDLER */
            uint32_t x = ev & XT_IO_ID_MASK;
            if (x == XT_IOPORT_READ || x == XT_IOMEM_READ) {
                /* hvmtrace_io_assist (xen/arch/x86/hvm/emulate.c): [addr, data], 64-bit
                 * variants [addr lo, hi, data lo, hi]; no data words when data_is_ptr. */
                int is64 = (ev & XT_64_FLAG) != 0;
                uint32_t aw = is64 ? 2 : 1;
                if (n != aw && n != 2 * aw) {
                    bad(s);
                    return;
                }
                row.kind = R_IO;
                row.f = (uint8_t)((ev & 1u ? IO_MMIO : 0) | (ev & XT_IO_WRITE_BIT ? 0 : IO_READ) |
                                  (n == aw ? IO_REP : 0) | (is64 ? IO_64 : 0));
                row.a = d[0] | (is64 ? (uint64_t)d[1] << 32 : 0);
                if (n == 2 * aw)
                    row.b = d[aw] | (is64 ? (uint64_t)d[aw + 1] << 32 : 0);
                s->st.io_records++;
                xt_push(s, p, &row);
            } else if ((s->flags & XT_F_COMPAT) && claims_postprocess(ev)) {
                row.kind = R_CLAIM;
                xt_push(s, p, &row);
            }
            return;
        }
        if (sub == 0x1000u) { /* TRC_HVM_ENTRYEXIT */
            uint32_t xe = ev & XT_EXIT_ID_MASK;
            if (ev == XT_VMENTRY) {
                if (!tscf) {
                    bad(s);
                    return;
                }
                row.kind = R_ENTRY;
                xt_push(s, p, &row);
            } else if (xe == XT_VMX_EXIT || xe == XT_SVM_EXIT) {
                /* [reason, eip] or, 64-bit, [reason, rip lo, rip hi] (vmx.c/svm.c TRACE_TIME) */
                int is64 = (ev & XT_64_FLAG) != 0;
                if (!tscf || n != (is64 ? 3u : 2u)) {
                    bad(s);
                    return;
                }
                row.kind = R_EXIT;
                row.a = d[1] | (is64 ? (uint64_t)d[2] << 32 : 0);
                xt_push(s, p, &row);
            }
        }
        return;
    }
    if (cls == 0x002) { /* TRC_SCHED */
        int change = (ev & XT_RUNSTATE_MASK) == XT_RUNSTATE_CHANGE;
        if (!change && ev != XT_CONTINUE_RUNNING)
            return;
        if (n < 1) {
            bad(s);
            return;
        }
        row.kind = change ? R_RUNSTATE : R_CONTINUE;
        row.w = d[0];
        row.f = (uint8_t)(((ev >> 8) & 0xfu) << 4 | ((ev >> 4) & 0xfu));
        xt_push(s, p, &row);
        return;
    }
    if (cls == 0x001) { /* TRC_GEN: lost records; wrap records are padding */
        if (ev != XT_LOST_RECORDS)
            return;
        if (n != 4) {
            bad(s);
            return;
        }
        /* insert_lost_records (xen/common/trace.c): [lost, did | vid << 16, first tsc lo, hi] */
        s->st.lost_records += d[0];
        row.kind = R_LOST;
        row.w = d[1];
        if (s->flags & XT_F_COMPAT) {
            /* xenalyze handles it at its first lost TSC (process_lost_records), then again at
             * its own TSC (process_lost_records_end) */
            uint64_t own = row.tsc;
            row.tsc = d[2] | ((uint64_t)d[3] << 32);
            xt_push(s, p, &row);
            row.tsc = own;
            row.kind = R_LOST_END;
        }
        xt_push(s, p, &row);
        return;
    }
    if (!class_known(cls))
        bad(s);
}

static int plausible_header(const uint32_t *w)
{
    return w[0] == XT_CPU_CHANGE_HEADER && (w[2] & 3u) == 0 && (int32_t)w[1] >= 0 &&
           (int32_t)w[1] <= XT_MAX_PCPU_ID;
}

/* The next plausible window header at or after 'from' with its 3 words inside w[0..nw). */
static int64_t resync(const uint32_t *w, int64_t from, int64_t nw)
{
    int64_t p;
    for (p = from; p + 2 < nw; p++)
        if (w[p] == XT_CPU_CHANGE_HEADER && plausible_header(w + p))
            return p;
    return -1;
}

/* Walk w[0..nw) from a record/window boundary; returns the words consumed (the rest, an
 * incomplete record or header, is fed again with more data). */
int64_t xt_walk(xt_state *s, const uint32_t *w, int64_t nw, int final)
{
    int64_t pos = 0, remain = s->st.remain_words;
    int64_t base = s->st.consumed;
    int32_t cpu = s->cur_cpu;
    xt_pcpu *p = cpu >= 0 ? &s->pc[cpu] : NULL;

    (void) final;
    while (pos < nw && s->st.status == 0) {
        if (s->st.skipping) {
            int64_t take = remain < nw - pos ? remain : nw - pos;
            pos += take;
            remain -= take;
            if (remain == 0)
                s->st.skipping = 0;
            continue;
        }
        if (remain == 0) {
            int64_t nxt;
            if (pos + 3 > nw)
                break;
            if (plausible_header(w + pos)) {
                cpu = xt_pcpu_index(s, (int32_t)w[pos + 1]);
                if (cpu < 0)
                    break;
                p = &s->pc[cpu];
                remain = w[pos + 2] >> 2;
                pos += 3;
                s->st.windows++;
                s->st.started = 1;
                s->resyncing = 0;
                s->cur_cpu = cpu;
                xt_window_start(s, cpu);
                continue;
            }
            if (!s->st.started) {
                xt_note(s, N_NOT_CAPTURE, base + pos * 4, w[pos], 0);
                s->st.status = 1;
                break;
            }
            nxt = resync(w, pos + 1, nw);
            if (!s->resyncing) {
                bad(s);
                xt_note(s, nxt < 0 ? N_NO_RESYNC : N_RESYNC, base + pos * 4,
                        nxt < 0 ? 0 : (nxt - pos) * 4, 0);
            }
            if (nxt < 0) {
                /* keep the last 2 words: a header may straddle the end of the data so far */
                s->resyncing = 1;
                pos = pos + 1 > nw - 2 ? pos + 1 : nw - 2;
                break;
            }
            pos = nxt;
            continue;
        }
        {
            uint32_t h = w[pos];
            int64_t len = 1 + ((h >> 28) & 7u) + ((h >> 31) << 1);
            if (len > remain) {
                /* more words than its window holds: count it, drop the rest of the window,
                 * resynchronise on the next window header */
                bad(s);
                xt_note(s, N_OVERRUN, base + pos * 4, remain * 4, 0);
                s->st.skipping = 1;
                continue;
            }
            if (pos + len > nw)
                break;
            record(s, p, cpu, w + pos);
            pos += len;
            remain -= len;
        }
    }
    s->st.remain_words = remain;
    return pos;
}
