/* xtorder.c - putting the per-pCPU streams in TSC order, in bounded memory.
 *
 * Only each pCPU's own stream is ordered in a xentrace file: xentrace reads the pCPU buffers in
 * passes, in increasing pCPU order (tools/xentrace/xentrace.c, monitor_tbufs:
 * "for ( i = 0; i < num; i++ )"), writing a window for each non-empty one. A vCPU that moves
 * between pCPUs has its records in several streams, so the machines take rows in TSC order
 * across pCPUs: each pCPU's rows wait in its queue until the watermark passes them.
 *
 * The watermark is the lowest of the lower bounds lb: no row of pCPU j still unread has a TSC
 * below lb_j. After a window of j, lb_j is its last TSC (a pCPU's TSCs do not go back). A pCPU
 * that xentrace read between the windows of pCPUs p and i (cyclically, in id order) was empty
 * when read, after p's buffer was: its next record is later than p's last one, so its lb
 * rises to p's. The same holds for pCPUs not seen yet (idle so far): each gap between two
 * known pCPU ids keeps such a bound for the unseen ids in it, and a pCPU seen for the first
 * time starts from its gap's bound. Until a gap has been passed over once, its bound is 0 and
 * holds everything back (the first pass). Rows that still arrive below the watermark (TSCs
 * that go back: damage, unsynchronised TSCs) are merged on arrival (late_rows).
 * Queues are bounded: beyond XT_QUEUE_MAX rows the oldest are merged anyway (forced_rows).
 */
#include <stdlib.h>
#include <string.h>

#include "xtcore.h"

static int row_before(const xt_row *a, const xt_row *b)
{
    return a->tsc < b->tsc || (a->tsc == b->tsc && a->seq < b->seq);
}

static void force(xt_state *s);

int xt_push_slow(xt_state *s, xt_pcpu *p, const xt_row *r)
{
    if (s->st.queued_rows >= XT_QUEUE_MAX)
        force(s);
    if (p->qhead + p->qlen == p->qcap) {
        if (p->qhead > 0 && p->qhead >= p->qlen) {
            memmove(p->q, p->q + p->qhead, (size_t)p->qlen * sizeof(xt_row));
            p->qhead = 0;
        } else {
            int64_t cap = p->qcap;
            xt_row *nq =
                xt_grow(p->q, &cap, p->qcap + 1 > 1024 ? p->qcap + 1 : 1024, sizeof(xt_row));
            if (!nq) {
                xt_oom(s);
                return -1;
            }
            p->q = nq;
            p->qcap = cap;
        }
    }
    p->q[p->qhead + p->qlen++] = *r;
    s->st.queued_rows++;
    return 0;
}

/* ids strictly between a and b, cyclically (a == b: every other id) */
static int between(int32_t a, int32_t b, int32_t x)
{
    return b > a ? (x > a && x < b) : (x > a || x < b);
}

void xt_window_start(xt_state *s, int32_t cpu)
{
    int32_t prev = s->prev_cpu, pid, cid, k;
    uint64_t lp;

    s->prev_cpu = cpu;
    if (prev < 0)
        return;
    pid = s->pc[prev].id;
    cid = s->pc[cpu].id;
    lp = s->pc[prev].last_tsc;
    if (s->pc[prev].gap_lb < lp)
        s->pc[prev].gap_lb = lp; /* the unseen ids right after p were read after it */
    for (k = 0; k < s->npc; k++) {
        xt_pcpu *j = &s->pc[s->sorted[k]];
        if (between(pid, cid, j->id)) {
            if (j->lb < lp)
                j->lb = lp;
            if (j->gap_lb < lp)
                j->gap_lb = lp;
        }
    }
}

/* Whether any pCPU id lies strictly between sorted position k's id and the next known one. */
static int gap_open(const xt_state *s, int32_t k)
{
    int32_t a = s->pc[s->sorted[k]].id;
    if (k + 1 < s->npc)
        return s->pc[s->sorted[k + 1]].id - a > 1;
    return a < XT_MAX_PCPU_ID || s->pc[s->sorted[0]].id > 0; /* the gap that wraps */
}

static uint64_t watermark(xt_state *s)
{
    uint64_t wm = UINT64_MAX;
    int32_t k;
    if (s->npc == 0)
        return s->wm;
    for (k = 0; k < s->npc; k++) {
        xt_pcpu *p = &s->pc[s->sorted[k]];
        if (p->lb < p->last_tsc)
            p->lb = p->last_tsc;
        if (p->lb < wm)
            wm = p->lb;
        if (p->gap_lb < wm && gap_open(s, k))
            wm = p->gap_lb;
    }
    return wm > s->wm ? wm : s->wm;
}

static void sift(xt_state *s, int32_t *h, int32_t n, int32_t i)
{
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, m = i, t;
        if (l < n &&
            row_before(&s->pc[h[l]].q[s->pc[h[l]].qhead], &s->pc[h[m]].q[s->pc[h[m]].qhead]))
            m = l;
        if (r < n &&
            row_before(&s->pc[h[r]].q[s->pc[h[r]].qhead], &s->pc[h[m]].q[s->pc[h[m]].qhead]))
            m = r;
        if (m == i)
            return;
        t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Merge rows in (TSC, file order) up to the watermark; all: everything; limit: at most that
 * many rows (forced merging when the queues are full). */
static void merge(xt_state *s, uint64_t wm, int all, int64_t limit)
{
    int32_t *h = s->heap, n = 0, i;
    int compat = (s->flags & XT_F_COMPAT) != 0;

    for (i = 0; i < s->npc; i++)
        if (s->pc[i].qlen)
            h[n++] = i;
    for (i = n / 2 - 1; i >= 0; i--)
        sift(s, h, n, i);
    while (n > 0 && limit != 0 && s->st.status == 0) {
        xt_pcpu *p = &s->pc[h[0]];
        /* take the top queue's rows while they come before every other queue's head (a run
         * of one pCPU's records, e.g. an exit, its I/O and its entry) */
        const xt_row *next = NULL;
        if (n > 1) {
            next = &s->pc[h[1]].q[s->pc[h[1]].qhead];
            if (n > 2 && row_before(&s->pc[h[2]].q[s->pc[h[2]].qhead], next))
                next = &s->pc[h[2]].q[s->pc[h[2]].qhead];
        }
        do {
            const xt_row *r = &p->q[p->qhead];
            if (!all && r->tsc >= wm)
                goto done;
            if (r->tsc < s->last_merged_tsc)
                s->st.late_rows++;
            else
                s->last_merged_tsc = r->tsc;
            if (compat)
                xt_compat_row(s, r);
            else
                xt_decode_row(s, r);
            p->qhead++;
            p->qlen--;
            s->st.queued_rows--;
            if (limit > 0)
                limit--;
        } while (p->qlen && limit != 0 && (!next || row_before(&p->q[p->qhead], next)));
        if (p->qlen == 0) {
            p->qhead = 0;
            h[0] = h[--n];
        }
        sift(s, h, n, 0);
    }
done:
    return;
}

static void force(xt_state *s)
{
    int64_t before = s->st.queued_rows;
    if (!s->st.forced_rows)
        xt_note(s, N_REORDER_FULL, s->st.consumed, XT_QUEUE_MAX, 0);
    merge(s, 0, 1, before - XT_QUEUE_MAX / 2);
    s->st.forced_rows += before - s->st.queued_rows;
}

void xt_drain(xt_state *s, int all)
{
    uint64_t wm = all ? UINT64_MAX : watermark(s);
    s->wm = wm;
    s->st.watermark = (int64_t)(wm > INT64_MAX ? INT64_MAX : wm);
    merge(s, wm, all, -1);
}
