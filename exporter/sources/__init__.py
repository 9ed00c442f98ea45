"""Sources that are not a tracer of their own: the registry that builds and starts every source
(registry), a recording or capture replayed through the live pipeline (replay), another host's
``iotrace serve`` read back into totals (remote)."""
