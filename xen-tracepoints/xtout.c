/* xtout.c - the outputs of the machines, and the tables they keep.
 *
 * - event rows (EVENT_DTYPE layout) for callers that want every request (xt_take_events);
 * - cells: count and service-time totals per (domid, vcpu, type, dir, addr[, rip]), with a
 *   histogram whose slots are iotrace.core.aggregate's (xtcore.h xt_slot: log-linear, 8 per power
 *   of two), so a report needs memory per distinct key, not per request;
 * - the vCPU table (key domid << 16 | vcpu) and the pool of I/O records waiting for their
 *   exit's end (xtdecode.c).
 * Hash tables use open addressing with linear probing, at most half full.
 */
#include <stdlib.h>
#include <string.h>

#include "xtcore.h"

void xt_oom(xt_state *s)
{
    s->st.status = 2;
}

/* Grow *p to hold at least 'need' elements (doubling); NULL on failure (*p unchanged). */
void *xt_grow(void *p, int64_t *cap, int64_t need, size_t elem)
{
    int64_t c = *cap ? *cap : 16;
    void *np;
    while (c < need)
        c *= 2;
    if (c == *cap)
        return p;
    np = realloc(p, (size_t)c * elem);
    if (!np)
        return NULL;
    *cap = c;
    return np;
}

void xt_note(xt_state *s, int64_t kind, int64_t offset, int64_t a, int64_t b)
{
    xt_note_rec *n;
    if (s->st.n_notes >= XT_MAX_NOTES)
        return;
    n = &s->notes[s->st.n_notes++];
    n->kind = kind;
    n->offset = offset;
    n->a = a;
    n->b = b;
}

static uint64_t mix(uint64_t x)
{
    /* splitmix64 finaliser */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* A table of int32 (index + 1) slots, rebuilt twice as large when half full. */
static int rehash(int32_t **map, int64_t *cap, int64_t n, uint64_t (*hash_of)(xt_state *, int32_t),
                  xt_state *s)
{
    int64_t nc = *cap ? *cap * 2 : 64, i;
    int32_t *nm;
    while (nc < 2 * (n + 1))
        nc *= 2;
    nm = calloc((size_t)nc, sizeof(int32_t));
    if (!nm)
        return -1;
    for (i = 0; i < n; i++) {
        uint64_t h = hash_of(s, (int32_t)i) & (uint64_t)(nc - 1);
        while (nm[h])
            h = (h + 1) & (uint64_t)(nc - 1);
        nm[h] = (int32_t)i + 1;
    }
    free(*map);
    *map = nm;
    *cap = nc;
    return 0;
}

static uint64_t vcpu_hash(xt_state *s, int32_t i)
{
    return mix((uint64_t)s->vc[i].key);
}

int32_t xt_vcpu_index(xt_state *s, int64_t key, int32_t domid, int32_t vcpu)
{
    uint64_t h, m;
    int32_t i;
    xt_vcpu *v;

    if (2 * (s->nvc + 1) > s->vmap_cap &&
        rehash(&s->vmap, &s->vmap_cap, s->nvc, vcpu_hash, s) < 0) {
        xt_oom(s);
        return -1;
    }
    m = (uint64_t)s->vmap_cap - 1;
    for (h = mix((uint64_t)key) & m; s->vmap[h]; h = (h + 1) & m)
        if (s->vc[s->vmap[h] - 1].key == key)
            return s->vmap[h] - 1;
    if (s->nvc == s->capvc) {
        int64_t cap = s->capvc;
        xt_vcpu *nv = xt_grow(s->vc, &cap, s->nvc + 1, sizeof(*nv));
        if (!nv) {
            xt_oom(s);
            return -1;
        }
        s->vc = nv;
        s->capvc = (int32_t)cap;
    }
    i = s->nvc++;
    v = &s->vc[i];
    memset(v, 0, sizeof(*v));
    v->key = key;
    v->domid = domid;
    v->vcpu = vcpu;
    v->pend_head = v->pend_tail = -1;
    v->xa_rstate = -2;
    s->vmap[h] = i + 1;
    s->st.vcpus = s->nvc;
    return i;
}

static uint64_t key_hash(const xt_cell_key *k)
{
    uint64_t who = (uint64_t)(uint32_t)k->domid << 32 | (uint32_t)k->vcpu;
    return mix(k->addr ^ (who * 0x9e3779b97f4a7c15ull) ^ (k->rip * 0xc2b2ae3d27d4eb4full) ^
               ((uint64_t)k->type << 1 | k->dir));
}

static uint64_t cell_hash(xt_state *s, int32_t i)
{
    return key_hash(&s->ckey[i]);
}

/* The cell of key k: found, or added while the table has room for it (-2: no room). */
static int32_t cell_of(xt_state *s, const xt_cell_key *k, int32_t room)
{
    uint64_t h, m;
    int32_t i;

    if (2 * (s->ncell + 1) > s->cmap_cap &&
        rehash(&s->cmap, &s->cmap_cap, s->ncell, cell_hash, s) < 0) {
        xt_oom(s);
        return -1;
    }
    m = (uint64_t)s->cmap_cap - 1;
    for (h = key_hash(k) & m; s->cmap[h]; h = (h + 1) & m) {
        const xt_cell_key *c = &s->ckey[s->cmap[h] - 1];
        if (c->addr == k->addr && c->domid == k->domid && c->vcpu == k->vcpu &&
            c->type == k->type && c->dir == k->dir && c->rip == k->rip)
            return s->cmap[h] - 1;
    }
    if (s->ncell >= room)
        return -2;
    if (s->ncell == s->capcell) {
        int64_t cap = s->capcell, c2, c3;
        xt_cell_key *nk = xt_grow(s->ckey, &cap, s->ncell + 1, sizeof(*nk));
        xt_cell_val *nv;
        uint64_t *nh;
        if (!nk) {
            xt_oom(s);
            return -1;
        }
        s->ckey = nk;
        c2 = s->capcell;
        nv = xt_grow(s->cval, &c2, s->ncell + 1, sizeof(*nv));
        if (!nv) {
            xt_oom(s);
            return -1;
        }
        s->cval = nv;
        c3 = s->capcell;
        nh = xt_grow(s->chist, &c3, s->ncell + 1, XT_SLOTS * sizeof(uint64_t));
        if (!nh) {
            xt_oom(s);
            return -1;
        }
        s->chist = nh;
        s->capcell = (int32_t)cap;
    }
    i = s->ncell++;
    s->ckey[i] = *k;
    memset(&s->cval[i], 0, sizeof(s->cval[i]));
    s->cval[i].svc_min_ns = INT64_MAX;
    s->cval[i].svc_max_ns = -1;
    memset(&s->chist[(size_t)i * XT_SLOTS], 0, XT_SLOTS * sizeof(uint64_t));
    s->cmap[h] = i + 1;
    s->st.cells = s->ncell;
    return i;
}

/* The cell a request counts in. Keys are bounded: past XT_MAX_CELLS distinct ones, a new key
 * counts in its vCPU's "other" cell (addr, rip = XT_KEY_OTHER), and past a quarter more, in
 * one "other" cell per type and direction (domid, vcpu = -2): requests are never dropped, the
 * detail beyond the bound is (counted in overflow_requests, warned). */
int32_t xt_cell_index(xt_state *s, const xt_event *e)
{
    xt_cell_key k;
    int32_t i;

    k.domid = e->domid;
    k.vcpu = e->vcpu;
    k.type = e->type;
    k.dir = e->dir;
    k.addr = e->addr;
    k.rip = (s->flags & XT_F_CELL_RIP) ? e->rip : 0;
    memset(k.pad, 0, sizeof(k.pad));
    i = cell_of(s, &k, XT_MAX_CELLS);
    if (i != -2)
        return i;
    if (!s->st.overflow_requests)
        xt_note(s, N_CELLS_FULL, s->st.consumed, XT_MAX_CELLS, 0);
    s->st.overflow_requests++;
    k.addr = XT_KEY_OTHER;
    k.rip = (s->flags & XT_F_CELL_RIP) ? XT_KEY_OTHER : 0;
    i = cell_of(s, &k, XT_MAX_CELLS + XT_MAX_CELLS / 4);
    if (i != -2)
        return i;
    k.domid = k.vcpu = -2;
    return cell_of(s, &k, INT32_MAX);
}

xt_event *xt_out_push(xt_state *s)
{
    if (s->nout == s->capout) {
        xt_event *no = xt_grow(s->out, &s->capout, s->nout + 1, sizeof(xt_event));
        if (!no) {
            xt_oom(s);
            return NULL;
        }
        s->out = no;
    }
    s->st.events_ready = s->nout + 1;
    return &s->out[s->nout++];
}

/* A resolved request: into its cell (counted now unless already counted) and/or the events. */
void xt_emit(xt_state *s, const xt_event *e, int32_t cell)
{
    if (s->flags & XT_F_CELLS) {
        if (cell < 0) {
            cell = xt_cell_index(s, e);
            if (cell < 0)
                return;
            xt_cell_count(s, cell);
        }
        if (e->service_ns >= 0)
            xt_cell_service(s, cell, e->service_ns);
    }
    if (s->flags & XT_F_EVENTS) {
        xt_event *o = xt_out_push(s);
        if (o)
            *o = *e;
    }
}

int32_t xt_pend_alloc(xt_state *s)
{
    int32_t i = s->pend_free;
    if (i >= 0) {
        s->pend_free = s->pend[i].next;
    } else {
        if (s->cappend == 0 || s->npend >= s->cappend) {
            int64_t cap = s->cappend, k;
            xt_pend *np = xt_grow(s->pend, &cap, s->cappend + 1, sizeof(*np));
            if (!np) {
                xt_oom(s);
                return -1;
            }
            s->pend = np;
            /* new slots onto the free list */
            for (k = cap - 1; k >= s->cappend; k--) {
                s->pend[k].next = s->pend_free;
                s->pend_free = (int32_t)k;
            }
            s->cappend = (int32_t)cap;
        }
        i = s->pend_free;
        s->pend_free = s->pend[i].next;
    }
    s->npend++;
    return i;
}
