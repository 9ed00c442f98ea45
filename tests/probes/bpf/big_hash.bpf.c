/* A hash map of 2 KiB values, as large as the stats map (tests/probes/test_lookup_batches.py). */
struct big {
    u64 a;
    u64 pad[255];
};
BPF_HASH(h, u32, struct big, 65536);
