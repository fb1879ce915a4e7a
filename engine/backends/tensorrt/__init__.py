"""sdrt.engine.backends.tensorrt — the NVIDIA path's runtime: backend.py (the TensorRT backend), and the thin GPU code
it and `sdrt build-engines` run, imported on first use so that sdrt runs without tensorrt or cuda-python installed:
library.py (tensorrt, its logger, this machine's build environment), cuda.py (the CUDA runtime calls), runner.py (one
engine on one stream, with per-shape buffers and CUDA graphs) and lru.py (its bounded per-shape cache).

What `sdrt build-engines` (sdrt.export.tensorrt_build) and the backend agree on about engines is in engines/: pure
decisions, tested on any machine.
"""
