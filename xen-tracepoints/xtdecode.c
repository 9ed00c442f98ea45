/* xtdecode.c - the default machine: every I/O record, its owner, guest RIP and service time.
 *
 * Rows come in TSC order across pCPUs (xtorder.c). Facts (catalogue.py cites the sources):
 *
 * - owner: the vCPU current on the record's pCPU, named by the last row on that pCPU that took
 *   a vCPU to running (runstate change to running, continue_running) or by a lost-records
 *   record (the vCPU current when Xen inserted it). Before the first, the owner is unknown
 *   (-1, -1); its records are kept, timed within their pCPU's own stream.
 * - an I/O record belongs to its vCPU's open exit (after a VMEXIT/VMEXIT64 of that vCPU,
 *   before its next VMENTRY, on whichever pCPU it resumes): it takes the exit's guest RIP.
 * - service time (one definition, README "Service time"): from the VM exit to the moment the
 *   request was answered, i.e. the first of
 *     * the vCPU's next VMENTRY (the request was handled without descheduling the vCPU), and
 *     * the vCPU becoming runnable again (it had blocked waiting for the device model -
 *       running->offline in wait_on_xen_event_channel, xen/common/ioreq.c wait_for_io - and
 *       was woken by the answer, or it was preempted).
 *   The time it then waits for a pCPU is CPU contention, not service: xenalyze closes its
 *   exits at the same point (tools/xentrace/xenalyze.c sched_runstate_process: "Close vmexits
 *   when the putative reason for blocking / &c stops"), so the two agree per request.
 *   I/O records of an exit whose end is not known yet wait (pending) until it is; an exit that
 *   is never closed (a new VMEXIT first, lost records, end of input) leaves them unknown (-1).
 */
#include "xtcore.h"

static xt_vcpu *owner_of(xt_state *s, const xt_pcpu *p)
{
    return &s->vc[p->owner >= 0 ? p->owner : p->pseudo];
}

static int64_t span_ns(const xt_state *s, uint64_t from, uint64_t to)
{
    return to >= from ? xt_cycles_to_ns(s, to - from) : -1;
}

/* The exit's end is known (ns >= 0) or will never be (-1): give it to its waiting I/O. */
static void settle(xt_state *s, xt_vcpu *v, int64_t ns)
{
    int32_t i = v->pend_head;
    while (i >= 0) {
        xt_pend *q = &s->pend[i];
        int32_t nx = q->next;
        if (q->cell >= 0 && ns >= 0)
            xt_cell_service(s, q->cell, ns);
        if (s->flags & XT_F_EVENTS) {
            xt_event *e = xt_out_push(s);
            if (e) {
                *e = s->pend[i].ev;
                e->service_ns = ns;
            }
        }
        s->pend[i].next = s->pend_free;
        s->pend_free = i;
        s->npend--;
        i = nx;
    }
    v->pend_head = v->pend_tail = -1;
    s->st.pending_io = s->npend;
}

/* The exit is over without a known end (a VMEXIT without the VMENTRY before it, lost records). */
static void abandon(xt_state *s, xt_vcpu *v)
{
    if (v->exit_open && !v->end_known)
        settle(s, v, -1);
    v->exit_open = 0;
}

static xt_vcpu *named(xt_state *s, uint32_t word)
{
    int32_t i = xt_vcpu_index(s, word, (int32_t)(word >> 16), (int32_t)(word & 0xffffu));
    return i >= 0 ? &s->vc[i] : NULL;
}

static void io(xt_state *s, xt_pcpu *p, const xt_row *r)
{
    xt_vcpu *v = owner_of(s, p);
    xt_event e;
    int32_t cell = -1;

    e.ts_ns = (s->flags & XT_F_EVENTS) ? xt_cycles_to_ns(s, r->tsc) : 0;
    e.domid = v->domid;
    e.vcpu = v->vcpu;
    e.type = (r->f & IO_MMIO) ? 1 : 0;
    e.dir = (r->f & IO_READ) ? 1 : 0;
    e.data_is_ptr = (r->f & IO_REP) ? 1 : 0;
    e.df = 0;
    e.size = 0;
    e.count = 1;
    e.addr = r->a;
    e.data = r->b;
    e.rip = v->exit_open ? v->rip : 0;
    e.service_ns = -1;
    if (v->exit_open && !v->end_known) {
        int32_t k = xt_pend_alloc(s);
        if (k < 0)
            return;
        if (s->flags & XT_F_CELLS) {
            cell = xt_cell_index(s, &e);
            if (cell >= 0)
                xt_cell_count(s, cell);
        }
        s->pend[k].cell = cell;
        if (s->flags & XT_F_EVENTS)
            s->pend[k].ev = e;
        s->pend[k].next = -1;
        if (v->pend_tail >= 0)
            s->pend[v->pend_tail].next = k;
        else
            v->pend_head = k;
        v->pend_tail = k;
        s->st.pending_io = s->npend;
        return;
    }
    if (v->exit_open)
        e.service_ns = span_ns(s, v->exit_tsc, v->end_tsc);
    xt_emit(s, &e, -1);
}

void xt_decode_row(xt_state *s, const xt_row *r)
{
    xt_pcpu *p = &s->pc[r->cpu];
    xt_vcpu *v;

    switch (r->kind) {
    case R_IO:
        io(s, p, r);
        return;
    case R_EXIT:
        v = owner_of(s, p);
        abandon(s, v);
        v->exit_open = 1;
        v->end_known = 0;
        v->exit_tsc = r->tsc;
        v->rip = r->a;
        return;
    case R_ENTRY:
        v = owner_of(s, p);
        if (v->exit_open && !v->end_known) {
            v->end_known = 1;
            v->end_tsc = r->tsc;
            settle(s, v, span_ns(s, v->exit_tsc, r->tsc));
        }
        v->exit_open = 0;
        return;
    case R_RUNSTATE:
        v = named(s, r->w);
        if (!v)
            return;
        if ((r->f & 0xf) == XT_RUNNABLE && v->exit_open && !v->end_known) {
            v->end_known = 1;
            v->end_tsc = r->tsc;
            settle(s, v, span_ns(s, v->exit_tsc, r->tsc));
        }
        if ((r->f & 0xf) == XT_RUNNING)
            p->owner = (int32_t)(v - s->vc);
        return;
    case R_CONTINUE:
        v = named(s, r->w);
        if (v)
            p->owner = (int32_t)(v - s->vc);
        return;
    case R_LOST:
        /* Records of this pCPU were lost before this one: whatever exit its vCPUs had open
         * cannot be closed reliably. The record names the vCPU current at its insertion. */
        abandon(s, owner_of(s, p));
        v = named(s, ((r->w & 0xffffu) << 16) | (r->w >> 16));
        if (!v)
            return;
        abandon(s, v);
        p->owner = (int32_t)(v - s->vc);
        return;
    }
}

void xt_decode_finish(xt_state *s)
{
    int32_t i;
    for (i = 0; i < s->nvc; i++)
        abandon(s, &s->vc[i]);
}
