"""sdrt.engine.backends.tensorrt.engines — what `sdrt build-engines` and the TensorRT backend share about engines:
profile.py (which sizes engines are built for, and each input's shapes), identity.py (what an engine is only valid
for: its cache key), store.py (where engines live in the bundle), compatibility.py (whether built engines fit this
bundle, GPU and request; what to run when not). Pure decisions, tested on any machine."""
