"""sdrt.engine.backends.openvino.passes — rewrites of OpenVINO models before they compile: same outputs, less time.

winograd.py (3x3 convolutions as Winograd F(4x4, 3x3), fp32), upsample_phases.py (a nearest-2x upsampling's
convolution as four 2x2 phase convolutions), guidance_prefix.py (what does not read the text, once for both halves of
a classifier-free guidance batch), geglu_halves.py (a GEGLU projection as two products), graph_patterns.py (the
patterns they share); registry.py names them and says which each precision applies.
"""
