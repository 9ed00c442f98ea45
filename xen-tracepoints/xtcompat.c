/* xtcompat.c - the xenalyze-compatible machine: count I/O as
 * "xenalyze --summary --with-pio-enumeration --with-mmio-enumeration" does
 * (tools/xentrace/xenalyze.c), for parity checks. Same rows, same order (TSC across pCPUs,
 * records without a TSC carrying their pCPU's last one) as the default machine; other rules:
 *
 * - an I/O record counts only while its vCPU's exit is open (hvm_handler_process:
 *   vmexit_valid); the exit opens at VMEXIT and closes at VMENTRY, or when the vCPU becomes
 *   runnable (sched_runstate_process, not on a vCPU's first runstate record), so a read that
 *   completes after the vCPU waited for qemu is dropped; at most one I/O per exit;
 * - the first I/O record of the exit claims its post-process slot (hvm_set_postprocess),
 *   unless a page-fault, CR write, MSR read/write or VMCALL handler claimed it first; later I/O
 *   records of the same exit still update the in-flight data: port I/O counts the first
 *   direction with the last port; MMIO the last gpa and direction, and only if one of its
 *   records had data (data_valid); 64-bit port I/O is an error and ignored;
 * - MMIO is keyed by a 32-bit address (io_address.pa is unsigned int); VGA
 *   0xa0000 <= gpa < 0xbffff (full gpa) is skipped, mmio_enumeration_skip_vga defaulting to 1;
 * - a lost-records record is handled at its first lost TSC (process_lost_records: the pCPU's
 *   vCPU and every vCPU not running lose their open exit) and again at its own TSC
 *   (process_lost_records_end: the vCPU it names becomes current);
 * - records of unknown owner (xenalyze's default domain, not in its summary) are dropped;
 * - service time is xenalyze's arc_cycles (hvm_close_vmexit: close TSC - exit TSC, 0 if
 *   negative): the same interval as the default machine's.
 * Not modelled: shadow-paging handlers (TRC_SHADOW) that also claim the slot, and xenalyze's
 * TSC-skew corrections. The tests check it against the real xenalyze (Xen 4.17).
 */
#include "xtcore.h"

enum { CLAIM_NONE = 0, CLAIM_OTHER, CLAIM_IO };
enum { POST_NONE = 0, POST_PIO, POST_MMIO };

static int32_t vcpu_of_word(xt_state *s, uint32_t key)
{
    return xt_vcpu_index(s, key, (int32_t)(key >> 16), (int32_t)(key & 0xffffu));
}

/* hvm_close_vmexit: run the exit's post-process (count its I/O), close the exit. */
static void close_exit(xt_state *s, xt_vcpu *v, uint64_t tsc)
{
    if (v->xa_claim == CLAIM_IO) {
        xt_event e = v->xa_io;
        uint64_t arc = v->xa_exit_tsc <= tsc ? tsc - v->xa_exit_tsc : 0;
        int keep = 1;
        if (v->xa_post == POST_PIO) { /* hvm_io_{read,write}_postprocess */
            e.type = 0;
            e.dir = v->xa_pio_dir;
            e.addr = v->xa_port;
        } else if (v->xa_data_valid && !(v->xa_gpa >= XT_VGA_START && v->xa_gpa < XT_VGA_END)) {
            /* enumerate_mmio: needs data; VGA test on the full gpa; pa is unsigned int */
            e.type = 1;
            e.dir = v->xa_mmio_dir;
            e.addr = v->xa_gpa & 0xffffffffu;
        } else {
            keep = 0;
        }
        if (keep) {
            e.service_ns = xt_cycles_to_ns(s, arc);
            e.data_is_ptr = 0;
            xt_emit(s, &e, -1);
        }
    }
    v->xa_valid = 0;
    v->xa_claim = CLAIM_NONE;
}

static void runstate(xt_state *s, xt_pcpu *p, const xt_row *r)
{
    int32_t i = vcpu_of_word(s, r->w);
    xt_vcpu *v;
    int change = r->kind == R_RUNSTATE;
    int old = r->f >> 4, new = change ? (r->f & 0xf) : XT_RUNNING;

    if (i < 0)
        return;
    v = &s->vc[i];
    if (change && new == XT_RUNNABLE && v->xa_seen_rs && v->xa_valid)
        close_exit(s, v, r->tsc); /* sched_runstate_process closes the exit */
    v->xa_seen_rs = 1;
    if (v->xa_rstate != -1 || new == XT_RUNNING)
        v->xa_rstate = (int8_t) new; /* a lost vCPU stays lost until it runs */
    if (new == XT_RUNNING)
        p->xa_cur = i;
    else if (change && old == XT_RUNNING && p->xa_cur == i)
        p->xa_cur = -1;
}

static void io(xt_state *s, xt_vcpu *v, const xt_row *r)
{
    int mmio = (r->f & IO_MMIO) != 0;
    uint8_t dir = (r->f & IO_READ) ? 1 : 0;

    if (!mmio && (r->f & IO_64))
        return; /* "FATAL: Unexpected 64-bit PIO": ignored */
    if (v->xa_claim == CLAIM_NONE) {
        /* first I/O of the exit: sets the post-process; later ones only update the in-flight
         * data (hvm_io_assist_process / hvm_mmio_assist_process) */
        xt_event *e = &v->xa_io;
        v->xa_claim = CLAIM_IO;
        v->xa_post = POST_NONE;
        v->xa_data_valid = 0;
        e->ts_ns = xt_cycles_to_ns(s, r->tsc);
        e->domid = (int32_t)(v->key >> 16);
        e->vcpu = (int32_t)(v->key & 0xffff);
        e->type = (uint8_t)mmio;
        e->dir = dir;
        e->data_is_ptr = (r->f & IO_REP) ? 1 : 0;
        e->df = 0;
        e->size = 0;
        e->count = 1;
        e->addr = r->a;
        e->data = r->b;
        e->service_ns = -1;
        e->rip = v->rip;
    }
    if (v->xa_claim == CLAIM_OTHER)
        return;
    if (!mmio) {
        v->xa_port = (uint32_t)r->a; /* inflight.io.port */
        if (v->xa_post == POST_NONE) {
            v->xa_post = POST_PIO;
            v->xa_pio_dir = dir;
        }
    } else {
        v->xa_gpa = r->a; /* inflight.mmio.gpa / is_write */
        v->xa_mmio_dir = dir;
        if (!(r->f & IO_REP))
            v->xa_data_valid = 1;
        if (v->xa_post == POST_NONE)
            v->xa_post = POST_MMIO;
    }
}

void xt_compat_row(xt_state *s, const xt_row *r)
{
    xt_pcpu *p = &s->pc[r->cpu];
    xt_vcpu *v;
    int32_t i;

    switch (r->kind) {
    case R_RUNSTATE:
    case R_CONTINUE:
        runstate(s, p, r);
        return;
    case R_LOST:
        /* process_lost_records: the pCPU's current vCPU and every vCPU not running lose their
         * open exit (lose_vcpu); the pCPU has no current vCPU ... */
        if (p->xa_cur >= 0) {
            s->vc[p->xa_cur].xa_valid = 0;
            s->vc[p->xa_cur].xa_claim = CLAIM_NONE;
        }
        for (i = 0; i < s->nvc; i++) {
            v = &s->vc[i];
            if (v->xa_rstate != -2 && v->xa_rstate != XT_RUNNING) {
                v->xa_valid = 0;
                v->xa_claim = CLAIM_NONE;
                v->xa_rstate = -1;
            }
        }
        p->xa_cur = -1;
        return;
    case R_LOST_END:
        /* ... until process_lost_records_end makes the vCPU named in the record current */
        p->xa_cur = vcpu_of_word(s, ((r->w & 0xffffu) << 16) | (r->w >> 16));
        return;
    }
    if (p->xa_cur < 0)
        return; /* xenalyze's default domain: not in its summary */
    v = &s->vc[p->xa_cur];
    switch (r->kind) {
    case R_EXIT:
        v->xa_valid = 1;
        v->xa_claim = CLAIM_NONE;
        v->xa_exit_tsc = r->tsc;
        v->rip = r->a;
        return;
    case R_ENTRY:
        if (v->xa_valid)
            close_exit(s, v, r->tsc);
        return;
    }
    if (!v->xa_valid)
        return; /* needs_vmexit: dropped */
    if (r->kind == R_CLAIM) {
        if (v->xa_claim == CLAIM_NONE)
            v->xa_claim = CLAIM_OTHER; /* hvm_set_postprocess by another handler */
        return;
    }
    if (r->kind == R_IO)
        io(s, v, r);
}
