"""sdrt.benchmarks — `sdrt bench`: sdrt and its peers on one checkpoint, each run in a fresh process, interleaved."""
