"""The advisor (a sink): the paper's feedback loop from observed I/O to the domain scheduler.

policy (the plan of an interval: targets, steps, holds and their reasons), xl (credit2 weights
through ``xl sched-credit2``), cgroup (the device models' CPU weight in Dom0's cgroups, v1 or
v2), audit (the append-only JSONL log of every change and ``--rollback``), advisor (one
interval: read the knobs, plan, apply or print, log).
"""
