"""sdrt.engine.backends.openvino — the OpenVINO CPU backends: backend.py (the backend classes), cache.py (converted
and compiled models in the bundle's cache: their names, pruning), compiled_models.py (compiled models per shapes,
keyed, loaded at `load()`), constants.py (the constants graph rewrites make,
stored as memory-mapped IR), int8_location.py (which models `sdrt quantize` makes int8, and where), and passes/ (the
graph rewrites, and the registry of which of them each precision applies)."""
