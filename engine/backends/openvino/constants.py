"""Where static-shape graph rewrites keep the constants they make: IR files in a model's compiled-model directory,
which OpenVINO memory-maps, so that their pages are handed back once it has repacked them (held in the heap, they
would stay resident beside the repacked copy)."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.engine.atomic import atomic_directory
from sdrt.engine.backends.openvino.cache import IR_FILE

CONSTANTS_SUBDIR = "constants"  # in a model's compiled directory: constants that static-shape rewrites made, as IR

#: Makes constants of a model's arrays, named by `key` (unique in the model), of these shapes: returns OpenVINO
#: outputs holding them (float16 arrays as OpenVINO's fp32 decompression of them, the form in which its CPU plugin
#: keeps fp16 weights in fp16). It calls the function that computes the arrays only when it does not hold them already.
ConstantStore = Callable[[str, Sequence[tuple[int, ...]], Callable[[], Sequence[np.ndarray]]], Sequence[Any]]


def mapped_constants(core: Any, directory: Path, key: str, shapes: Sequence[tuple[int, ...]],
                     compute: Callable[[], Sequence[np.ndarray]]) -> list[Any]:
    """OpenVINO constants of these `shapes`, read (memory-mapped) from an IR under `directory` named after `key`;
    computed and written there first, atomically, unless it already holds arrays of these shapes (a model's rewrite
    makes the same constants on every compile: weights never change in a bundle's component). With `core` and
    `directory` bound, a ConstantStore."""
    import openvino
    from openvino import opset13 as ops

    target = directory / hashlib.sha256(key.encode()).hexdigest()[:16]
    shapes = [list(shape) for shape in shapes]

    def read() -> list[Any] | None:
        if not (target / IR_FILE).is_file():
            return None
        constants = [result.input_value(0) for result in core.read_model(str(target / IR_FILE)).get_results()]
        return constants if [list(c.get_shape()) for c in constants] == shapes else None

    constants = read()
    if constants is None:
        arrays = list(compute())
        # fp16 arrays are saved compressed (as fp32 constants compressed on saving, which is what marks their
        # conversion back as a decompression when read): all or none, as compression applies to the whole file
        compressed = all(array.dtype == np.float16 for array in arrays)
        if not compressed and any(array.dtype == np.float16 for array in arrays):
            raise ValueError(f"{key}: a stored set of constants is all float16 or none")
        try:
            with atomic_directory(target, replace=target.exists()) as staging:
                stored = openvino.Model([ops.result(ops.constant(array.astype(np.float32) if compressed else array)) for array in arrays], [])
                openvino.save_model(stored, str(staging / IR_FILE), compress_to_fp16=compressed)
        except OSError:  # FileExistsError included: another process published it first
            if read() is None:
                raise
        constants = read()
    return constants
