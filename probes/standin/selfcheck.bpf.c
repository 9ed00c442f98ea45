// Self-check of the stand-in device model (tests/test_standin_uprobe.py): a uprobe on its
// handle_ioreq reads what iotrace's real probe reads in qemu-dm, and sends it all to user space.
// - arg 1: XenIOState *state; state->send_vcpu at SEND_VCPU_OFFSET (0x50 QEMU 7.2, 0x48 QEMU 8.1)
// - arg 2: ioreq_t *req (xen/include/public/hvm/ioreq.h): addr @0, data @8, count @16, size @20,
//   bitfield byte @30 (state 0x0f, data_is_ptr 0x10, dir 0x20, df 0x40), type @31
// - the return address at the top of the stack on entry tells the caller (buffered/synchronous)
#include <uapi/linux/ptrace.h>

#ifndef SEND_VCPU_OFFSET
#define SEND_VCPU_OFFSET 0x50
#endif

struct standin_seen {
    u64 ret;
    u64 addr;
    u64 data;
    u32 count;
    u32 size;
    s32 send_vcpu;
    u32 pid;
    u8 bits;
    u8 type;
    u8 pad[6];
};

BPF_PERF_OUTPUT(seen);

int on_handle_ioreq(struct pt_regs *ctx)
{
    struct standin_seen e = {};
    void *state = (void *)PT_REGS_PARM1(ctx);
    void *req = (void *)PT_REGS_PARM2(ctx);

    e.pid = bpf_get_current_pid_tgid() >> 32;
    bpf_probe_read_user(&e.send_vcpu, sizeof(e.send_vcpu), state + SEND_VCPU_OFFSET);
    bpf_probe_read_user(&e.addr, 8, req);
    bpf_probe_read_user(&e.data, 8, req + 8);
    bpf_probe_read_user(&e.count, 4, req + 16);
    bpf_probe_read_user(&e.size, 4, req + 20);
    bpf_probe_read_user(&e.bits, 1, req + 30);
    bpf_probe_read_user(&e.type, 1, req + 31);
    bpf_probe_read_user(&e.ret, 8, (void *)PT_REGS_SP(ctx));
    seen.perf_submit(ctx, &e, sizeof(e));
    return 0;
}
