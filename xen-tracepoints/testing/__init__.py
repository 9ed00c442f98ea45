"""Not runtime code: the synthetic xentrace capture generator (synth) with its ground truth and
its model of xenalyze, for the tests and the benchmarks."""
