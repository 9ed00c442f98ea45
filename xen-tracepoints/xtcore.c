/* xtcore.c - the API of the compiled xentrace core (see xtcore.h for the modules).
 *
 * Built by the Makefile into _xtcore.so; iotrace.xentrace.native loads it with ctypes and
 * checks the struct sizes below against its NumPy dtypes. One xt_state per input stream:
 *
 *   s = xt_new(cpu_hz, flags)
 *   xt_feed(s, buf, n)   -> bytes consumed (whole records and window headers; feed the rest
 *                           again, followed by more data); merges what the watermark allows
 *   xt_finish(s)         end of input: merges everything, settles waiting I/O records
 *   xt_stats_of(s)       the counters (xt_stats, int64 fields)
 *   xt_take_events(s, out, cap), xt_take_notes(s, out, cap), xt_export_cells(s, k, v, h, cap),
 *   xt_cells_hist(s)     the cells' histograms in place (no copy)
 *   xt_free(s)
 */
#include <stdlib.h>
#include <string.h>

#include "xtcore.h"

XT_API xt_state *xt_new(double cpu_hz, int flags)
{
    xt_state *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->idmap = calloc(XT_MAX_PCPU_ID + 1, sizeof(int32_t));
    if (!s->idmap) {
        free(s);
        return NULL;
    }
    s->flags = flags;
    s->cpu_hz = cpu_hz > 0 ? cpu_hz : 2.4e9;
    s->cur_cpu = -1;
    s->prev_cpu = -1;
    s->pend_free = -1;
    s->st.oldest_pending_ns = INT64_MAX;
    s->st.tsc_first = s->st.tsc_last = -1;
    return s;
}

XT_API void xt_free(xt_state *s)
{
    int32_t i;
    if (!s)
        return;
    for (i = 0; i < s->npc; i++)
        free(s->pc[i].q);
    free(s->pc);
    free(s->sorted);
    free(s->heap);
    free(s->idmap);
    free(s->vc);
    free(s->vmap);
    free(s->out);
    free(s->pend);
    free(s->ckey);
    free(s->cval);
    free(s->chist);
    free(s->cmap);
    free(s);
}

static void oldest_pending(xt_state *s)
{
    int64_t t = INT64_MAX;
    int32_t i;
    for (i = 0; i < s->nvc; i++)
        if (s->vc[i].pend_head >= 0 && s->pend[s->vc[i].pend_head].ev.ts_ns < t)
            t = s->pend[s->vc[i].pend_head].ev.ts_ns;
    s->st.oldest_pending_ns = t;
}

XT_API int64_t xt_feed(xt_state *s, const uint8_t *buf, int64_t nbytes)
{
    int64_t words;
    if (s->st.status)
        return 0;
    words = xt_walk(s, (const uint32_t *)(const void *)buf, nbytes / 4, 0);
    s->st.consumed += words * 4;
    if (s->st.status == 0)
        xt_drain(s, 0);
    if (s->flags & XT_F_EVENTS)
        oldest_pending(s);
    return words * 4;
}

XT_API void xt_finish(xt_state *s)
{
    if (s->st.status == 1)
        return;
    xt_drain(s, 1);
    if (!(s->flags & XT_F_COMPAT))
        xt_decode_finish(s);
    s->st.oldest_pending_ns = INT64_MAX;
}

XT_API xt_stats *xt_stats_of(xt_state *s)
{
    return &s->st;
}

XT_API int64_t xt_take_events(xt_state *s, xt_event *out, int64_t cap)
{
    int64_t n = s->nout < cap ? s->nout : cap;
    memcpy(out, s->out, (size_t)n * sizeof(xt_event));
    memmove(s->out, s->out + n, (size_t)(s->nout - n) * sizeof(xt_event));
    s->nout -= n;
    s->st.events_ready = s->nout;
    return n;
}

XT_API int64_t xt_take_notes(xt_state *s, xt_note_rec *out, int64_t cap)
{
    int64_t n = s->st.n_notes < cap ? s->st.n_notes : cap;
    memcpy(out, s->notes, (size_t)n * sizeof(xt_note_rec));
    memmove(s->notes, s->notes + n, (size_t)(s->st.n_notes - n) * sizeof(xt_note_rec));
    s->st.n_notes -= n;
    return n;
}

XT_API int64_t xt_export_cells(xt_state *s, xt_cell_key *k, xt_cell_val *v, uint64_t *h,
                               int64_t cap)
{
    int64_t n = s->ncell < cap ? s->ncell : cap;
    memcpy(k, s->ckey, (size_t)n * sizeof(xt_cell_key));
    memcpy(v, s->cval, (size_t)n * sizeof(xt_cell_val));
    if (h) /* NULL: the caller reads them in place (xt_cells_hist) */
        memcpy(h, s->chist, (size_t)n * XT_SLOTS * sizeof(uint64_t));
    return n;
}

/* The cells' histograms in place (ncell x XT_SLOTS), valid until the next feed/finish/free: a
 * report of many keys reads them without a second copy of the biggest table. */
XT_API const uint64_t *xt_cells_hist(xt_state *s)
{
    return s->chist;
}

/* Sizes of the shared structs, for the Python side's layout checks. */
XT_API int64_t xt_sizeof(int what)
{
    switch (what) {
    case 0:
        return sizeof(xt_stats);
    case 1:
        return sizeof(xt_event);
    case 2:
        return sizeof(xt_cell_key);
    case 3:
        return sizeof(xt_cell_val);
    case 4:
        return sizeof(xt_note_rec);
    case 5:
        return XT_SLOTS;
    case 6:
        return XT_MAX_CELLS;
    }
    return -1;
}

/* The ids the core was built with, for a test against catalogue.py. */
XT_API int64_t xt_constants(int64_t *out, int64_t cap)
{
    static const int64_t c[] = {
        XT_CPU_CHANGE_HEADER, XT_EVENT_MASK, XT_LOST_RECORDS, XT_RUNSTATE_CHANGE, XT_RUNSTATE_MASK,
        XT_CONTINUE_RUNNING,  XT_VMENTRY,    XT_VMX_EXIT,     XT_SVM_EXIT,        XT_64_FLAG,
        XT_EXIT_ID_MASK,      XT_IO_ID_MASK, XT_IOPORT_READ,  XT_IOMEM_READ,      XT_IO_WRITE_BIT,
        XT_VGA_START,         XT_VGA_END,    XT_MAX_PCPU_ID,
    };
    static const uint32_t claim[] = XT_CLAIMING_IDS;
    int64_t n = (int64_t)(sizeof(c) / sizeof(c[0])),
            m = (int64_t)(sizeof(claim) / sizeof(claim[0]));
    int64_t i;
    for (i = 0; i < n + m && i < cap; i++)
        out[i] = i < n ? c[i] : (int64_t)claim[i - n];
    return n + m;
}
