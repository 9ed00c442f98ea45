/*
 * iotrace-standin: a stand-in for Xen's device model (qemu-dm) that a uprobe cannot tell from the real
 * one. It replays a recorded stream of guest I/O requests (see probes/standin/stream.py for the stream file
 * format) through the same call chain QEMU uses to serve ioreqs, so iotrace's probes can be tested
 * and demonstrated on a machine without Xen.
 *
 *   iotrace-standin -xen-domid N [-name NAME] -replay FILE [-speed X] [-loop] [-hold] [-truth OUT.json]
 *                   [-trace-ioreq [-msg-timestamp]]
 *   iotrace-standin -print-layout
 *
 * What a probe sees, and where it comes from (QEMU 7.2 hw/i386/xen/xen-hvm.c; 8.1+
 * hw/xen/xen-hvm-common.c; Xen's public header xen/include/public/hvm/ioreq.h):
 *
 *  - ioreq_t / buf_ioreq_t / buffered_iopage_t come from Debian's <xen/hvm/ioreq.h> (libxen-dev);
 *    the ABI is checked at compile time and at start-up (32-byte ioreq_t, bitfield byte @30, type @31).
 *  - XenIOState mirrors QEMU's field order: send_vcpu at 0x50 with QEMU 7.2's layout (which still has
 *    shared_vmport_page), 0x48 with 8.1's (built as iotrace-standin-81, -DSTANDIN_QEMU81). The
 *    offset is also exported as data, the u32 symbol iotrace_send_vcpu_offset: unlike qemu-dm, the
 *    stand-in has no QEMU version banner to infer the layout from.
 *  - Synchronous path: "event channel" -> cpu_handle_ioreq -> cpu_get_ioreq (sets state->send_vcpu = i,
 *    marks the slot INPROCESS and returns &shared_page->vcpu_ioreq[i]) -> handle_buffered_iopage first
 *    -> `ioreq_t copy = *req; handle_ioreq(state, &copy)` -> response written back, IORESP_READY.
 *  - Buffered path: handle_buffered_iopage drains the buffered page, building a zeroed local ioreq_t
 *    per request (state READY, count 1, dir WRITE; a size-8 write takes two slots) and calling
 *    handle_ioreq. It runs first in every cpu_handle_ioreq, from handle_buffered_io (QEMU's
 *    buffered_io_timer / bufioreq event channel) before an idle gap, and when the ring is full.
 *  - handle_ioreq is a real out-of-line static function (noipa + used: no inlining, no clones, no
 *    changed signature), a local `t` symbol in .symtab, called from exactly two call sites:
 *    handle_buffered_iopage (buffered) and cpu_handle_ioreq (synchronous). `-print-layout` prints their
 *    return addresses (ELF virtual address and file offset) as one JSON line, found in the code
 *    (e8 rel32 calls) and confirmed by serving one request of each kind when no uretprobe hides them
 *    (a uretprobe replaces the return address on the stack with its trampoline once entry handlers
 *    have run: a BPF uprobe on entry still reads the real one).
 *  - Like a Debian build (QEMU's `log` trace backend), handle_ioreq holds the handle_ioreq trace
 *    event's format strings (printed with -trace-ioreq), so a stripped copy (objcopy --strip-all) is
 *    resolved the way a stripped qemu-dm is (probes/hook/auto.py); built with -DSTANDIN_USDT it has a
 *    USDT note qemu:handle_ioreq instead, like a `dtrace`-backend build (RHEL, Fedora).
 *
 * Replay: records are issued at t_ns / speed after the start (-speed 0: as fast as possible). With
 * -loop the stream restarts until SIGTERM/SIGINT; with -hold the process stays alive and idle after
 * the stream ends until SIGTERM/SIGINT. -truth writes, when the stream ends (each pass with -loop) and
 * on exit, the requests issued so far, in the `io` JSON schema of `iotrace report` (one row per
 * (domid, vcpu, type, dir, addr); buffered requests have vcpu -1).
 *
 * Bad arguments or an unreadable stream: one line on stderr, exit 2.
 *
 * One file of about 800 lines on purpose: like QEMU's xen-hvm code it is one translation unit, so
 * the call chain the probes see (static functions, their two call sites, the stack copy) is
 * decided by one compiler invocation; splitting it would put handle_ioreq's callers in other units
 * and change the code the probes are tested against.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <link.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xen/hvm/ioreq.h>

#define STANDIN_NOIPA __attribute__((noipa, used))

/* ---- ABI checks against Xen's xen/include/public/hvm/ioreq.h --------------------------------- */
_Static_assert(sizeof(ioreq_t) == 32, "ioreq_t is 32 bytes");
_Static_assert(offsetof(ioreq_t, addr) == 0, "ioreq_t.addr @0");
_Static_assert(offsetof(ioreq_t, data) == 8, "ioreq_t.data @8");
_Static_assert(offsetof(ioreq_t, count) == 16, "ioreq_t.count @16");
_Static_assert(offsetof(ioreq_t, size) == 20, "ioreq_t.size @20");
_Static_assert(offsetof(ioreq_t, vp_eport) == 24, "ioreq_t.vp_eport @24");
_Static_assert(offsetof(ioreq_t, type) == 31, "ioreq_t.type @31");
_Static_assert(sizeof(buf_ioreq_t) == 8, "buf_ioreq_t is 8 bytes");
_Static_assert(sizeof(buffered_iopage_t) <= 4096, "buffered page fits a page");

/* VMWARE_PORT is QEMU's own request type (include/hw/xen/xen_common.h), not in Xen's header. */
#ifndef IOREQ_TYPE_VMWARE_PORT
#define IOREQ_TYPE_VMWARE_PORT 3
#endif

#define MAX_VCPUS 128 /* one 4 KiB shared page of 32-byte slots, as Xen allocates */

/* ---- QEMU's XenIOState, field order of QEMU 7.2 (8.1 dropped shared_vmport_page) -------------- */
typedef struct XenIOState {
    uint16_t ioservid; /* ioservid_t */
    shared_iopage_t *shared_page;
#ifndef STANDIN_QEMU81
    void *shared_vmport_page; /* shared_vmport_iopage_t *, gone in QEMU 8.1 */
#endif
    buffered_iopage_t *buffered_io_page;
    void *fres;                 /* xenforeignmemory_resource_handle * */
    void *buffered_io_timer;    /* QEMUTimer * */
    void **cpu_by_vcpu_id;      /* CPUState ** */
    uint32_t *ioreq_local_port; /* evtchn_port_t * */
    uint32_t bufioreq_remote_port;
    uint32_t bufioreq_local_port;
    void *xce_handle; /* xenevtchn_handle * */
    int send_vcpu;    /* which vcpu we are serving */
    void *xenstore;
    /* QEMU has more fields after this point (memory listeners, ...); the stand-in's own follow. */
    int max_vcpus;
    int pending_port; /* the "event channel": port Xen notified, -1 none */
    struct devices *dev;
} XenIOState;

#ifdef STANDIN_QEMU81
#define STANDIN_LAYOUT "8.1"
_Static_assert(offsetof(XenIOState, send_vcpu) == 0x48, "send_vcpu at 0x48 (QEMU 8.1)");
#else
#define STANDIN_LAYOUT "7.2"
_Static_assert(offsetof(XenIOState, send_vcpu) == 0x50, "send_vcpu at 0x50 (QEMU 7.2)");
#endif

/* Where send_vcpu lives in this build, as data a probe can read from the ELF file (probes/hook/resolve.py
 * looks for this symbol: 4 bytes, little endian), since unlike qemu-dm the stand-in has no QEMU
 * version banner to infer the layout from. */
__attribute__((used)) const uint32_t iotrace_send_vcpu_offset = offsetof(XenIOState, send_vcpu);

/* ---- fake devices: enough state that serving a request does some real work ------------------- */
struct devices {
    uint8_t pio[0x10000];       /* one byte-wide latch per port */
    uint8_t vga[0x20000];       /* 0xa0000-0xbffff */
    uint8_t mmio_misc[0x10000]; /* any other MMIO, folded */
    uint8_t pcicfg[256][256];   /* config space of bus 0, per devfn */
    uint8_t serial_fifo[16];
    unsigned serial_len;
    uint64_t mix;       /* device "work" accumulator */
    uint64_t served[4]; /* per type: pio, copy, pci_config, other */
};

/* ---- stream file: its layout is declared once, in stream_format.h (read by stream.py too) --- */
#include "stream_format.h"

static const char *prog = "iotrace-standin";
int main(int argc, char **argv);
static volatile sig_atomic_t stop_requested;
static int layout_probe; /* -print-layout: remember handle_ioreq's callers */
static void *layout_ret[2];
static int layout_ret_n;
static int trace_ioreq; /* -trace-ioreq: 1 plain, 2 with -msg-timestamp */

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

/* ---- the device model side: QEMU's call chain ------------------------------------------------ */

static uint64_t device_work(struct devices *d, uint64_t v, unsigned rounds)
{
    /* A few rounds of mixing per request: a stand-in for decoding and device-state updates. */
    uint64_t x = d->mix ^ v ^ 0x9e3779b97f4a7c15ULL;
    for (unsigned i = 0; i < rounds; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    d->mix = x;
    return x;
}

static void cpu_ioreq_pio(struct devices *d, ioreq_t *req)
{
    uint16_t port = (uint16_t)req->addr;
    d->served[0]++;
    if (req->dir == IOREQ_READ) {
        uint64_t v = 0;
        for (uint32_t i = 0; i < req->size && i < 8; i++)
            v |= (uint64_t)d->pio[(uint16_t)(port + i)] << (8 * i);
        if (port == 0x3fd) /* 16550 LSR: THR empty, data ready if fifo has bytes */
            v = 0x60 | (d->serial_len ? 1 : 0);
        else if (port == 0x3f8 && d->serial_len)
            v = d->serial_fifo[--d->serial_len];
        if (!req->data_is_ptr)
            req->data = v;
    } else {
        for (uint32_t i = 0; i < req->size && i < 8; i++)
            d->pio[(uint16_t)(port + i)] = (uint8_t)(req->data >> (8 * i));
        if (port == 0x3f8 && d->serial_len < sizeof(d->serial_fifo))
            d->serial_fifo[d->serial_len++] = (uint8_t)req->data;
    }
    device_work(d, req->addr ^ req->data, 16 * (req->count ? req->count : 1));
}

static uint8_t *mmio_byte(struct devices *d, uint64_t addr)
{
    if (addr >= 0xa0000 && addr < 0xc0000)
        return &d->vga[addr - 0xa0000];
    return &d->mmio_misc[addr & 0xffff];
}

static void cpu_ioreq_move(struct devices *d, ioreq_t *req)
{
    d->served[1]++;
    uint32_t count = req->count ? req->count : 1;
    for (uint32_t c = 0; c < count; c++) {
        uint64_t a =
            req->df ? req->addr - (uint64_t)c * req->size : req->addr + (uint64_t)c * req->size;
        if (req->dir == IOREQ_READ) {
            uint64_t v = 0;
            for (uint32_t i = 0; i < req->size && i < 8; i++)
                v |= (uint64_t)*mmio_byte(d, a + i) << (8 * i);
            if (!req->data_is_ptr)
                req->data = v;
        } else {
            for (uint32_t i = 0; i < req->size && i < 8; i++)
                *mmio_byte(d, a + i) = (uint8_t)(req->data >> (8 * i));
        }
    }
    device_work(d, req->addr ^ req->data, 8 * count);
}

static void cpu_ioreq_config(struct devices *d, ioreq_t *req)
{
    /* addr = SEG[63:48] BUS[47:40] DEV[39:35] FN[34:32] REG[31:0] (xen/include/public/hvm/ioreq.h) */
    uint32_t bus = (uint32_t)(req->addr >> 40) & 0xff;
    uint32_t devfn = (uint32_t)(req->addr >> 32) & 0xff;
    uint32_t reg = (uint32_t)req->addr & 0xff;
    d->served[2]++;
    if (bus != 0) { /* nothing behind other buses: all ones */
        if (req->dir == IOREQ_READ)
            req->data = req->size >= 8 ? ~0ULL : ((1ULL << (8 * req->size)) - 1);
        return;
    }
    uint8_t *cfg = d->pcicfg[devfn];
    if (req->dir == IOREQ_READ) {
        uint64_t v = 0;
        for (uint32_t i = 0; i < req->size && i < 4; i++)
            v |= (uint64_t)cfg[(reg + i) & 0xff] << (8 * i);
        req->data = v;
    } else {
        for (uint32_t i = 0; i < req->size && i < 4; i++)
            cfg[(reg + i) & 0xff] = (uint8_t)(req->data >> (8 * i));
    }
    device_work(d, req->addr ^ req->data, 24);
}

#ifndef STANDIN_USDT
/* QEMU's trace_handle_ioreq() as its `log` trace backend generates it (scripts/tracetool/backend/log.py,
 * the handle_ioreq event of hw/xen/trace-events): inlined into handle_ioreq, with the event's format
 * string and its "%d@%zu.%06zu:"-prefixed twin (-msg timestamp=on) in .rodata. What probes/hook/auto.py
 * finds handle_ioreq by in a stripped build; printed to stderr with -trace-ioreq. */
#ifdef STANDIN_TRACE_COLD
/* -DSTANDIN_TRACE_COLD: a call to a cold function makes GCC move the whole tracing branch into
 * handle_ioreq.cold (a separate .eh_frame entry, reached by a jump), as it does for branches it
 * judges cold: the resolver must follow the jump back to handle_ioreq. */
static __attribute__((cold, noinline)) void trace_cold_path(void)
{
    __asm__ __volatile__("");
}
#define TRACE_COLD_PATH() trace_cold_path()
#else
#define TRACE_COLD_PATH() ((void)0)
#endif

static inline __attribute__((always_inline)) void trace_handle_ioreq(ioreq_t *req)
{
    if (__builtin_expect(trace_ioreq, 0)) {
        TRACE_COLD_PATH();
        if (trace_ioreq > 1) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            fprintf(stderr,
                    "%d@%zu.%06zu:handle_ioreq I/O=%p type=%d dir=%d df=%d ptr=%d "
                    "port=0x%lx data=0x%lx count=%d size=%d\n",
                    (int)getpid(), (size_t)ts.tv_sec, (size_t)(ts.tv_nsec / 1000), (void *)req,
                    req->type, req->dir, req->df, req->data_is_ptr, (unsigned long)req->addr,
                    (unsigned long)req->data, req->count, req->size);
        } else {
            fprintf(stderr,
                    "handle_ioreq I/O=%p type=%d dir=%d df=%d ptr=%d port=0x%lx data=0x%lx "
                    "count=%d size=%d\n",
                    (void *)req, req->type, req->dir, req->df, req->data_is_ptr,
                    (unsigned long)req->addr, (unsigned long)req->data, req->count, req->size);
        }
    }
}
#else
/* -DSTANDIN_USDT: QEMU's `dtrace` trace backend instead (RHEL/Fedora builds): no format string, a
 * SystemTap SDT note qemu:handle_ioreq whose probe point (a nop) lies inside handle_ioreq. Emitted
 * the way <sys/sdt.h> does (a .note.stapsdt entry: pc, base, semaphore, provider, name, arguments),
 * without needing that header. */
static inline __attribute__((always_inline)) void trace_handle_ioreq(ioreq_t *req)
{
    __asm__ __volatile__("990: nop\n"
                         ".pushsection .note.stapsdt,\"\",\"note\"\n"
                         ".balign 4\n"
                         ".4byte 992f-991f, 994f-993f, 3\n"
                         "991: .asciz \"stapsdt\"\n"
                         "992: .balign 4\n"
                         "993: .8byte 990b\n"
                         ".8byte _.stapsdt.base\n"
                         ".8byte 0\n"
                         ".asciz \"qemu\"\n"
                         ".asciz \"handle_ioreq\"\n"
                         ".asciz \"8@%0\"\n"
                         "994: .balign 4\n"
                         ".popsection\n"
                         ".ifndef _.stapsdt.base\n"
                         ".pushsection .stapsdt.base,\"aG\",\"progbits\",.stapsdt.base,comdat\n"
                         ".weak _.stapsdt.base\n"
                         ".hidden _.stapsdt.base\n"
                         "_.stapsdt.base: .space 1\n"
                         ".size _.stapsdt.base, 1\n"
                         ".popsection\n"
                         ".endif\n" ::"r"(req));
}
#endif

/* The function iotrace's uprobe attaches to: QEMU's `static void handle_ioreq(XenIOState *state,
 * ioreq_t *req)`. noipa keeps it out of line with its signature intact (no clones, no IPA-SRA). */
static STANDIN_NOIPA void handle_ioreq(XenIOState *state, ioreq_t *req)
{
    if (__builtin_expect(layout_probe, 0) && layout_ret_n < 2)
        layout_ret[layout_ret_n++] = __builtin_return_address(0);
    trace_handle_ioreq(req);

    if (!req->data_is_ptr && req->dir == IOREQ_WRITE && req->size < sizeof(uint32_t))
        req->data &= (1ULL << (8 * req->size)) - 1;

    switch (req->type) {
    case IOREQ_TYPE_PIO:
        cpu_ioreq_pio(state->dev, req);
        break;
    case IOREQ_TYPE_COPY:
        cpu_ioreq_move(state->dev, req);
        break;
    case IOREQ_TYPE_PCI_CONFIG:
        cpu_ioreq_config(state->dev, req);
        break;
    case IOREQ_TYPE_TIMEOFFSET:
    case IOREQ_TYPE_INVALIDATE:
    case IOREQ_TYPE_VMWARE_PORT:
        state->dev->served[3]++;
        break;
    default:
        die("handle_ioreq: unknown ioreq type %u", req->type);
    }
}

/* Drain the buffered page; a size-8 request takes two slots, the second carrying the high half. */
static STANDIN_NOIPA int handle_buffered_iopage(XenIOState *state)
{
    buffered_iopage_t *page = state->buffered_io_page;
    int handled = 0;
    if (!page)
        return 0;
    while (page->read_pointer != page->write_pointer) {
        uint32_t rd = page->read_pointer;
        const buf_ioreq_t *slot = &page->buf_ioreq[rd % IOREQ_BUFFER_SLOT_NUM];
        ioreq_t req;
        memset(&req, 0, sizeof(req));
        req.size = 1U << slot->size;
        req.count = 1;
        req.addr = slot->addr;
        req.data = slot->data;
        req.state = STATE_IOREQ_READY;
        req.dir = slot->dir;
        req.type = slot->type;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        int two = req.size == 8;
        if (two)
            req.data |= (uint64_t)page->buf_ioreq[(rd + 1) % IOREQ_BUFFER_SLOT_NUM].data << 32;
        handle_ioreq(state, &req);
        if (req.state != STATE_IOREQ_READY || req.count != 1 || req.dir != IOREQ_WRITE ||
            req.data_is_ptr)
            die("handle_buffered_iopage: malformed buffered request at slot %u", rd);
        __atomic_add_fetch(&page->read_pointer, two + 1, __ATOMIC_RELEASE);
        handled++;
    }
    return handled;
}

/* QEMU's buffered_io_timer / bufioreq event-channel handler. */
static STANDIN_NOIPA void handle_buffered_io(XenIOState *state)
{
    handle_buffered_iopage(state);
}

static STANDIN_NOIPA ioreq_t *cpu_get_ioreq(XenIOState *state)
{
    int port = state->pending_port;
    if (port < 0)
        return NULL;
    state->pending_port = -1;
    for (int i = 0; i < state->max_vcpus; i++) {
        if (state->ioreq_local_port[i] == (uint32_t)port) {
            ioreq_t *req = &state->shared_page->vcpu_ioreq[i];
            state->send_vcpu = i;
            if (req->state != STATE_IOREQ_READY)
                return NULL;
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            req->state = STATE_IOREQ_INPROCESS;
            return req;
        }
    }
    die("cpu_get_ioreq: fatal error, got event on port %d", port);
}

static STANDIN_NOIPA void cpu_handle_ioreq(XenIOState *state)
{
    ioreq_t *req = cpu_get_ioreq(state);

    handle_buffered_iopage(state);
    if (req) {
        ioreq_t copy = *req;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        handle_ioreq(state, &copy);
        req->data = copy.data;
        if (req->state != STATE_IOREQ_INPROCESS)
            die("cpu_handle_ioreq: bad slot state %u on vcpu %d", req->state, state->send_vcpu);
        __atomic_thread_fence(__ATOMIC_RELEASE);
        req->state = STATE_IORESP_READY;
    }
}

/* ---- the "Xen" side: issue requests into the shared pages ------------------------------------ */

static void xen_send_sync(XenIOState *s, const struct stream_key *k, const struct stream_rec *r)
{
    ioreq_t *slot = &s->shared_page->vcpu_ioreq[k->vcpu];
    slot->addr = k->addr;
    slot->data = k->dir == IOREQ_READ ? 0 : r->data;
    slot->count = r->count ? r->count : 1;
    slot->size = r->size;
    slot->vp_eport = s->ioreq_local_port[k->vcpu];
    slot->data_is_ptr = 0;
    slot->dir = k->dir;
    slot->df = 0;
    slot->type = k->type;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    slot->state = STATE_IOREQ_READY;
    s->pending_port = (int)slot->vp_eport; /* notify the event channel */
    cpu_handle_ioreq(s);
    if (slot->state != STATE_IORESP_READY)
        die("vcpu %d: device model did not answer", k->vcpu);
    slot->state = STATE_IOREQ_NONE;
}

static void xen_send_buffered(XenIOState *s, const struct stream_key *k, const struct stream_rec *r)
{
    buffered_iopage_t *page = s->buffered_io_page;
    int two = r->size == 8;
    if (page->write_pointer - page->read_pointer + (uint32_t)two + 1 > IOREQ_BUFFER_SLOT_NUM)
        handle_buffered_io(s); /* ring full: qemu drains it (Xen would wait) */
    buf_ioreq_t *slot = &page->buf_ioreq[page->write_pointer % IOREQ_BUFFER_SLOT_NUM];
    memset(slot, 0, sizeof(*slot));
    slot->type = k->type;
    slot->dir = IOREQ_WRITE;
    slot->size = r->size == 1 ? 0 : r->size == 2 ? 1 : r->size == 4 ? 2 : 3;
    slot->addr = (uint32_t)(k->addr & 0xfffff);
    slot->data = (uint32_t)r->data;
    if (two) {
        buf_ioreq_t *hi = &page->buf_ioreq[(page->write_pointer + 1) % IOREQ_BUFFER_SLOT_NUM];
        memset(hi, 0, sizeof(*hi));
        hi->data = (uint32_t)(r->data >> 32);
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    page->write_pointer += (uint32_t)two + 1;
}

/* ---- stream loading ---------------------------------------------------------------------------- */

struct stream {
    struct stream_header h;
    struct stream_key *keys;
    struct stream_rec *recs;
    uint64_t *issued; /* per key */
};

static void load_stream(const char *path, struct stream *st)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die("%s: cannot open stream: %s", path, strerror(errno));
    if (fread(&st->h, sizeof(st->h), 1, f) != 1 || memcmp(st->h.magic, STREAM_MAGIC, 8) != 0)
        die("%s: not an iotrace stream file (bad magic at offset 0); give a .stream or a CSV via "
            "`iotrace standin`",
            path);
    if (st->h.version != STREAM_VERSION)
        die("%s: stream version %u, this stand-in reads version %d", path, st->h.version,
            STREAM_VERSION);
    if (st->h.header_size != sizeof(st->h) || st->h.key_size != sizeof(struct stream_key) ||
        st->h.rec_size != sizeof(struct stream_rec))
        die("%s: unexpected header/key/record sizes %u/%u/%u at offset 8", path, st->h.header_size,
            st->h.key_size, st->h.rec_size);
    if (st->h.n_keys > (1u << 24) || st->h.n_recs > (1ull << 32))
        die("%s: implausible counts (%u keys, %llu records) at offset 24", path, st->h.n_keys,
            (unsigned long long)st->h.n_recs);
    struct stat sb;
    uint64_t need = sizeof(st->h) + (uint64_t)st->h.n_keys * sizeof(struct stream_key) +
                    st->h.n_recs * sizeof(struct stream_rec);
    if (fstat(fileno(f), &sb) == 0 && (uint64_t)sb.st_size < need)
        die("%s: truncated at offset %lld (header announces %llu bytes)", path,
            (long long)sb.st_size, (unsigned long long)need);
    st->keys = calloc(st->h.n_keys ? st->h.n_keys : 1, sizeof(*st->keys));
    st->issued = calloc(st->h.n_keys ? st->h.n_keys : 1, sizeof(*st->issued));
    st->recs = calloc(st->h.n_recs ? st->h.n_recs : 1, sizeof(*st->recs));
    if (!st->keys || !st->recs || !st->issued)
        die("%s: out of memory", path);
    if (fread(st->keys, sizeof(*st->keys), st->h.n_keys, f) != st->h.n_keys)
        die("%s: truncated key table at offset %zu", path, sizeof(st->h));
    if (fread(st->recs, sizeof(*st->recs), st->h.n_recs, f) != st->h.n_recs)
        die("%s: truncated records at offset %zu", path,
            sizeof(st->h) + st->h.n_keys * sizeof(struct stream_key));
    fclose(f);
    for (uint32_t i = 0; i < st->h.n_keys; i++) {
        const struct stream_key *k = &st->keys[i];
        if (k->vcpu < -1 || k->vcpu >= MAX_VCPUS || k->dir > 1 || k->type > 8)
            die("%s: bad key %u (vcpu %d, type %u, dir %u)", path, i, k->vcpu, k->type, k->dir);
        if (k->vcpu == -1 && (k->dir != IOREQ_WRITE || k->addr > 0xfffff))
            die("%s: key %u: buffered requests are writes below 1 MiB", path, i);
    }
    for (uint64_t i = 0; i < st->h.n_recs; i++) {
        const struct stream_rec *r = &st->recs[i];
        if (r->key >= st->h.n_keys ||
            (r->size != 1 && r->size != 2 && r->size != 4 && r->size != 8))
            die("%s: bad record %llu (key %u, size %u)", path, (unsigned long long)i, r->key,
                r->size);
        if (((r->flags & STREAM_REC_BUFFERED) != 0) != (st->keys[r->key].vcpu == -1))
            die("%s: record %llu: buffered flag and key disagree", path, (unsigned long long)i);
        if (i && r->t_ns < st->recs[i - 1].t_ns)
            die("%s: record %llu goes back in time", path, (unsigned long long)i);
    }
}

static const char *type_name(uint8_t t)
{
    switch (t) {
    case IOREQ_TYPE_PIO:
        return "pio";
    case IOREQ_TYPE_COPY:
        return "mmio";
    case IOREQ_TYPE_PCI_CONFIG:
        return "pci_config";
    case IOREQ_TYPE_VMWARE_PORT:
        return "vmware_port";
    case IOREQ_TYPE_TIMEOFFSET:
        return "timeoffset";
    case IOREQ_TYPE_INVALIDATE:
        return "invalidate";
    default:
        return "unknown";
    }
}

static void write_truth(const char *path, const struct stream *st, int domid)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof(tmp))
        die("%s: path too long", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        die("%s: cannot write truth file: %s", path, strerror(errno));
    fprintf(f, "{\"source\": \"standin\", \"io\": [");
    int first = 1;
    for (uint32_t i = 0; i < st->h.n_keys; i++) {
        const struct stream_key *k = &st->keys[i];
        if (!st->issued[i])
            continue;
        fprintf(f,
                "%s\n  {\"domid\": %d, \"vcpu\": %d, \"type\": \"%s\", \"dir\": \"%s\", "
                "\"addr\": %llu, \"count\": %llu}",
                first ? "" : ",", domid, k->vcpu, type_name(k->type),
                k->dir == IOREQ_READ ? "read" : "write", (unsigned long long)k->addr,
                (unsigned long long)st->issued[i]);
        first = 0;
    }
    fprintf(f, "\n]}\n");
    if (fclose(f) != 0 || rename(tmp, path) != 0)
        die("%s: cannot write truth file: %s", path, strerror(errno));
}

/* ---- setup ------------------------------------------------------------------------------------ */

static void state_init(XenIOState *s, int max_vcpus)
{
    static shared_iopage_t *shared;
    memset(s, 0, sizeof(*s));
    /* 4 KiB pages, as Xen maps them into the device model. */
    if (posix_memalign((void **)&shared, 4096, 4096) ||
        posix_memalign((void **)&s->buffered_io_page, 4096, 4096))
        die("out of memory");
    memset(shared, 0, 4096);
    memset(s->buffered_io_page, 0, 4096);
    s->shared_page = shared;
    s->max_vcpus = max_vcpus;
    s->ioreq_local_port = calloc((size_t)max_vcpus, sizeof(uint32_t));
    s->dev = calloc(1, sizeof(struct devices));
    if (!s->ioreq_local_port || !s->dev)
        die("out of memory");
    for (int i = 0; i < max_vcpus; i++)
        s->ioreq_local_port[i] = 16 + (uint32_t)i;
    s->bufioreq_local_port = 15;
    s->send_vcpu = -1;
    s->pending_port = -1;
    /* A few PCI functions answer like an i440fx/piix board (vendor 8086): bus 0, 00.0 and 01.x. */
    static const uint8_t devfns[] = {0x00, 0x08, 0x09, 0x0b, 0x10};
    for (unsigned i = 0; i < sizeof(devfns); i++) {
        s->dev->pcicfg[devfns[i]][0] = 0x86;
        s->dev->pcicfg[devfns[i]][1] = 0x80;
    }
}

/* ABI bits a compile-time check cannot see: bitfield placement in byte 30 and in buf_ioreq_t. */
static void check_bitfields(void)
{
    ioreq_t r;
    memset(&r, 0, sizeof(r));
    r.state = 0xf;
    r.data_is_ptr = 1;
    r.dir = 1;
    r.df = 1;
    const uint8_t *b = (const uint8_t *)&r;
    buf_ioreq_t q;
    memset(&q, 0, sizeof(q));
    q.type = 0xff;
    q.dir = 1;
    q.size = 3;
    q.addr = 0xfffff;
    uint32_t w0;
    memcpy(&w0, &q, 4);
    if (b[30] != 0x7f || w0 != 0xfffffeffu)
        die("<xen/hvm/ioreq.h> bitfield layout differs from Xen's ABI (byte30=%#x, buf w0=%#x)",
            b[30], w0);
}

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Sleep until the absolute monotonic time `until`; false if a stop was requested. */
static int sleep_until(int64_t until)
{
    struct timespec ts = {until / 1000000000LL, until % 1000000000LL};
    while (!stop_requested) {
        int rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        if (rc == 0)
            return 1;
        if (rc != EINTR)
            return 1;
    }
    return 0;
}

struct phdr_query {
    uintptr_t vaddr;
    long long offset;
};

static int phdr_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size;
    struct phdr_query *q = arg; /* the first object is the executable itself */
    uintptr_t v = q->vaddr - info->dlpi_addr;
    q->vaddr = v;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *p = &info->dlpi_phdr[i];
        if (p->p_type == PT_LOAD && v >= p->p_vaddr && v < p->p_vaddr + p->p_memsz) {
            q->offset = (long long)(v - p->p_vaddr + p->p_offset);
            break;
        }
    }
    return 1;
}

static struct phdr_query elf_location(void *runtime)
{
    struct phdr_query q = {(uintptr_t)runtime, -1};
    dl_iterate_phdr(phdr_cb, &q);
    return q;
}

/* The return address of the one `call handle_ioreq` (x86-64 e8 rel32) in [fn, end), or NULL.
 * Read from the code itself, so a uretprobe (which swaps return addresses on the stack for its
 * trampoline) cannot disturb it. */
static void *call_site_return(const void *fn, const void *end)
{
    const uint8_t *p = fn, *stop = end;
    void *found = NULL;
    int n = 0;
    for (; p + 5 <= stop; p++) {
        int32_t rel;
        if (p[0] != 0xe8)
            continue;
        memcpy(&rel, p + 1, sizeof(rel));
        if ((uintptr_t)(p + 5) + (intptr_t)rel == (uintptr_t)handle_ioreq) {
            found = (void *)(p + 5);
            n++;
        }
    }
    return n == 1 ? found : NULL;
}

/* Where a function's code ends, at the latest: the next of this file's functions in memory. */
static const void *function_end(const void *fn)
{
    const void *fns[] = {(void *)handle_ioreq,       (void *)handle_buffered_iopage,
                         (void *)handle_buffered_io, (void *)cpu_get_ioreq,
                         (void *)cpu_handle_ioreq,   (void *)main};
    const uint8_t *end = (const uint8_t *)fn + 4096;
    for (unsigned i = 0; i < sizeof(fns) / sizeof(fns[0]); i++)
        if ((const uint8_t *)fns[i] > (const uint8_t *)fn && (const uint8_t *)fns[i] < end)
            end = fns[i];
    return end;
}

/* Where a probe must look: send_vcpu's offset, handle_ioreq, and the return addresses of its two
 * call sites (found in the code, then checked by serving one buffered and one synchronous request
 * through the real paths, when no uretprobe hides the real return addresses). */
static int print_layout(void)
{
    void *ret_buf = call_site_return((void *)handle_buffered_iopage,
                                     function_end((void *)handle_buffered_iopage));
    void *ret_sync =
        call_site_return((void *)cpu_handle_ioreq, function_end((void *)cpu_handle_ioreq));
    if (!ret_buf || !ret_sync)
        die("print-layout: cannot find the call of handle_ioreq in %s",
            ret_buf ? "cpu_handle_ioreq" : "handle_buffered_iopage");

    XenIOState s;
    state_init(&s, 1);
    layout_probe = 1;
    struct stream_key kb = {0xa0000, -1, IOREQ_TYPE_COPY, IOREQ_WRITE, 0};
    struct stream_rec rb = {0, 0x55, 0, 1, 1, STREAM_REC_BUFFERED};
    struct stream_key ks = {0x3f8, 0, IOREQ_TYPE_PIO, IOREQ_WRITE, 0};
    struct stream_rec rs = {0, 0x41, 0, 1, 1, 0};
    xen_send_buffered(&s, &kb, &rb);
    xen_send_sync(&s, &ks, &rs); /* handle_buffered_iopage runs first, then the copy */
    layout_probe = 0;
    if (layout_ret_n != 2)
        die("print-layout: expected 2 calls of handle_ioreq, saw %d", layout_ret_n);
    int seen_ok =
        elf_location(layout_ret[0]).offset >= 0 && elf_location(layout_ret[1]).offset >= 0;
    if (seen_ok && (layout_ret[0] != ret_buf || layout_ret[1] != ret_sync))
        die("print-layout: return addresses seen (%p, %p) differ from the call sites (%p, %p)",
            layout_ret[0], layout_ret[1], ret_buf, ret_sync);

    struct phdr_query h = elf_location((void *)handle_ioreq);
    struct phdr_query rbq = elf_location(ret_buf);
    struct phdr_query rsq = elf_location(ret_sync);
    printf("{\"layout\": \"%s\", \"send_vcpu_offset\": %zu, "
           "\"handle_ioreq\": {\"vaddr\": %lu, \"file_offset\": %lld}, "
           "\"ret_buffered\": {\"vaddr\": %lu, \"file_offset\": %lld}, "
           "\"ret_sync\": {\"vaddr\": %lu, \"file_offset\": %lld}, "
           "\"checked_at_run_time\": %s}\n",
           STANDIN_LAYOUT, offsetof(XenIOState, send_vcpu), (unsigned long)h.vaddr, h.offset,
           (unsigned long)rbq.vaddr, rbq.offset, (unsigned long)rsq.vaddr, rsq.offset,
           seen_ok ? "true" : "false");
    return 0;
}

static void usage_error(const char *what)
{
    die("%s (usage: %s -xen-domid N [-name NAME] -replay FILE [-speed X] [-loop] [-hold] "
        "[-truth OUT.json] [-trace-ioreq [-msg-timestamp]] | -print-layout)",
        what, prog);
}

static long parse_long(const char *opt, const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 0);
    if (errno || end == s || *end || v < lo || v > hi) {
        char msg[256];
        snprintf(msg, sizeof(msg), "%s: expected an integer in %ld..%ld, got '%s'", opt, lo, hi, s);
        usage_error(msg);
    }
    return v;
}

int main(int argc, char **argv)
{
    int domid = -1, loop = 0, hold = 0, layout = 0;
    double speed = 0.0;
    const char *replay = NULL, *truth = NULL, *name = NULL;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] == '-' && a[1] == '-')
            a++; /* accept --opt as well as QEMU's -opt */
        int has_val = i + 1 < argc;
        if (!strcmp(a, "-xen-domid") || !strcmp(a, "-name") || !strcmp(a, "-replay") ||
            !strcmp(a, "-speed") || !strcmp(a, "-truth") || !strcmp(a, "-machine")) {
            if (!has_val) {
                char msg[128];
                snprintf(msg, sizeof(msg), "%s needs a value", argv[i]);
                usage_error(msg);
            }
            const char *v = argv[++i];
            if (!strcmp(a, "-xen-domid"))
                domid = (int)parse_long("-xen-domid", v, 0, 0x7fef); /* DOMID_FIRST_RESERVED */
            else if (!strcmp(a, "-name"))
                name = v;
            else if (!strcmp(a, "-replay"))
                replay = v;
            else if (!strcmp(a, "-truth"))
                truth = v;
            else if (!strcmp(a, "-speed")) {
                char *end;
                errno = 0;
                speed = strtod(v, &end);
                if (errno || end == v || *end || !(speed >= 0.0) || speed > 1e6)
                    usage_error("-speed: expected a number >= 0 (0: as fast as possible)");
            }
            /* -machine is accepted and ignored, like the xenfv machine options libxl passes. */
        } else if (!strcmp(a, "-loop")) {
            loop = 1;
        } else if (!strcmp(a, "-hold")) {
            hold = 1;
        } else if (!strcmp(a, "-no-shutdown")) {
            /* libxl passes it; nothing to do */
        } else if (!strcmp(a, "-print-layout")) {
            layout = 1;
        } else if (!strcmp(a, "-trace-ioreq")) {
            trace_ioreq = trace_ioreq > 1 ? 2 : 1;
        } else if (!strcmp(a, "-msg-timestamp")) {
            trace_ioreq = 2;
        } else {
            char msg[256];
            snprintf(msg, sizeof(msg), "unknown argument '%.200s'", argv[i]);
            usage_error(msg);
        }
    }
    check_bitfields();
    if (layout)
        return print_layout();
    if (domid < 0)
        usage_error("-xen-domid N is required");
    if (!replay)
        usage_error("-replay FILE is required");
    (void)name; /* visible in argv, as with QEMU's -name */

    struct stream st;
    load_stream(replay, &st);
    int max_vcpu = 0;
    for (uint32_t i = 0; i < st.h.n_keys; i++)
        if (st.keys[i].vcpu + 1 > max_vcpu)
            max_vcpu = st.keys[i].vcpu + 1;

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    XenIOState state;
    state_init(&state, max_vcpu > 0 ? max_vcpu : 1);

    const int64_t idle_flush_ns = 10 * 1000000LL; /* QEMU's buffered_io_timer runs every 100 ms */
    do {
        int64_t start = now_ns();
        for (uint64_t i = 0; i < st.h.n_recs && !stop_requested; i++) {
            const struct stream_rec *r = &st.recs[i];
            const struct stream_key *k = &st.keys[r->key];
            if (speed > 0.0) {
                int64_t due = start + (int64_t)((double)r->t_ns / speed);
                if (due - now_ns() > idle_flush_ns)
                    handle_buffered_io(&state); /* an idle gap: the timer drains the ring */
                if (!sleep_until(due))
                    break;
            }
            if (r->flags & STREAM_REC_BUFFERED)
                xen_send_buffered(&state, k, r);
            else
                xen_send_sync(&state, k, r);
            st.issued[r->key]++;
        }
        if (speed > 0.0 && !stop_requested) /* the stream lasts until its last t_ns */
            sleep_until(start + (int64_t)((double)st.h.duration_ns / speed));
        handle_buffered_io(&state);
        if (truth)
            write_truth(truth, &st, domid);
    } while (loop && !stop_requested);

    while (hold && !stop_requested)
        pause();
    if (truth)
        write_truth(truth, &st, domid);
    return 0;
}
