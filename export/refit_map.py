"""Build a component's refit map at export: match each weight of the torch module to the ONNX initializer that
holds it, by value, since torch's exporter renames weights and stores a Linear's weight transposed."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from sdrt.engine.refit_map import RefitEntry
from sdrt.export.graph_cleanup import iter_initializer_arrays

logger = logging.getLogger(__name__)

#: weights LoRA patches: Linear (out, in) and Conv2d (out, in, kh, kw); norms and biases are never patched
_REFIT_NDIMS = (2, 4)


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Hashes of a weight as stored, and transposed (2-D only: how a MatMul initializer holds a Linear's weight)."""

    plain: str
    transposed: str | None


def _digest(array: np.ndarray) -> str:
    # the shape is hashed too: a (4, 6) weight and its (6, 4) reshape have the same bytes
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()


def parameter_fingerprints(module: torch.nn.Module) -> dict[str, Fingerprint]:
    """Fingerprints of `module`'s Linear and Conv weights, by parameter name (as LoRA files name them): taken before
    the module is freed, so the matching needs only the exported graph in memory."""
    fingerprints = {}
    for name, parameter in module.named_parameters():
        if not name.endswith(".weight") or parameter.ndim not in _REFIT_NDIMS:
            continue
        array = parameter.detach().float().numpy()  # (out, in) or (out, in, kh, kw)
        fingerprints[name] = Fingerprint(_digest(array), _digest(array.T) if array.ndim == 2 else None)
    return fingerprints


def match_refit_map(fingerprints: dict[str, Fingerprint], onnx_path: Path) -> dict[str, RefitEntry]:
    """Each fingerprinted parameter's initializer in the graph at `onnx_path`. Parameters found nowhere (folded into
    other constants) or ambiguously (several initializers hold its values, or several parameters share one
    initializer's values: identical tensors) are left out with a warning, as patching them could patch the wrong one."""
    by_digest: dict[str, list[str]] = collections.defaultdict(list)
    for initializer, values in iter_initializer_arrays(onnx_path):
        if initializer.data_type == onnx.TensorProto.FLOAT:
            by_digest[_digest(values)].append(initializer.name)
    candidates: dict[str, set[RefitEntry]] = {}
    for name, fingerprint in fingerprints.items():
        found = {RefitEntry(init, False) for init in by_digest.get(fingerprint.plain, ())}
        plain_names = {entry.initializer for entry in found}
        if fingerprint.transposed is not None:
            # a symmetric weight matches both ways under one name: it is stored as is
            found |= {RefitEntry(init, True) for init in by_digest.get(fingerprint.transposed, ()) if init not in plain_names}
        candidates[name] = found
    claims = collections.Counter(entry.initializer for found in candidates.values() for entry in found)
    refit_map, missing, ambiguous = {}, [], []
    for name, found in sorted(candidates.items()):
        if not found:
            missing.append(name)
        elif len(found) > 1 or claims[next(iter(found)).initializer] > 1:
            ambiguous.append(name)
        else:
            refit_map[name] = next(iter(found))
    if ambiguous:
        logger.warning("%s: %d weights match several initializers or share one (identical values), left out of the "
                       "refit map, so LoRA cannot patch them: %s", onnx_path, len(ambiguous), ", ".join(ambiguous[:10]))
    if missing:
        logger.warning("%s: %d weights have no initializer of their own (folded into other constants), left out of "
                       "the refit map: %s", onnx_path, len(missing), ", ".join(missing[:10]))
    logger.info("%s: refit map of %d weights", onnx_path, len(refit_map))
    return refit_map
