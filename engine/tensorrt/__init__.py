"""sdrt.engine.tensorrt — the host side of the NVIDIA path, shared by `sdrt build-engines` and the TensorRT backend.

Pure decisions, tested on any machine: profile.py (which sizes engines are built for, and each input's shapes),
identity.py (what an engine is only valid for: its cache key), store.py (where engines live in the bundle),
compatibility.py (whether built engines fit this bundle, GPU and request; what to run when not), lru.py (the bounded
per-shape cache). Thin GPU code, imported on first use so that sdrt runs without tensorrt or cuda-python installed:
library.py (tensorrt, its logger, this machine's build environment), cuda.py (the CUDA runtime calls), runner.py (one
engine on one stream, with per-shape buffers and CUDA graphs).
"""
