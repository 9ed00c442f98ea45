"""Per-domain analysis: a floor between the sources and the sinks that both ``serve`` (metrics) and
``advise`` (the scheduler feedback) read, so neither sink imports the other.

settings (the ``advise:`` section of the ``--config`` YAML), host (what the host itself says:
Dom0's CPU from /proc, the device models' CPU, ``xl list -v`` where Xen is), signals (per-domain
figures of one interval, from successive totals), classify (idle, CPU-bound, I/O-bound,
storming, Dom0-starved, with reasons), analyzer (history per domain identity, baselines, the
hysteresis that settles a class before anything may act on it).
"""
