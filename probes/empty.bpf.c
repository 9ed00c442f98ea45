/* The baseline for bench/probe_overhead.py: programs that do nothing, attached at the same points as
 * probes/ioreq.bpf.c (entry of handle_ioreq, and its return), so the difference is the probe's work. */
#include <uapi/linux/ptrace.h>

int empty_entry(struct pt_regs *ctx)
{
    return 0;
}

int empty_return(struct pt_regs *ctx)
{
    return 0;
}
