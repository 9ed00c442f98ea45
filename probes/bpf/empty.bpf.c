/* Baselines for bench/probe_overhead.py, attached at the same points as probes/bpf/ioreq.bpf.c
 * (entry of handle_ioreq, and its return), so the differences are the probe's own work:
 *   empty_entry / empty_return   do nothing: the price of the uprobe traps alone
 *   reads_entry                  only the three user-memory reads the real entry probe makes
 *                                (ioreq_t, the return address, state->send_vcpu) */
#include <uapi/linux/ptrace.h>
#include "iotrace_bpf.h"

int empty_entry(struct pt_regs *ctx)
{
    return 0;
}

int empty_return(struct pt_regs *ctx)
{
    return 0;
}

int reads_entry(struct pt_regs *ctx)
{
    struct xen_ioreq req;
    u64 ret = 0;
    s32 vcpu = -1;
    bpf_probe_read_user(&req, sizeof(req), (void *)PT_REGS_PARM2(ctx));
    bpf_probe_read_user(&ret, sizeof(ret), (void *)PT_REGS_SP(ctx));
    bpf_probe_read_user(&vcpu, sizeof(vcpu), (void *)(PT_REGS_PARM1(ctx) + 0x50));
    /* use the values so that the reads are not optimised away */
    return (req.type + ret + vcpu) == 0x7fffffff;
}
