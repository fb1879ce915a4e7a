"""The NSFW safety checker: CLIP image embeddings (one batched backend call) scored against concept embeddings.

The scoring is diffusers' StableDiffusionSafetyChecker in numpy: cosine similarity to 17 concept and 3 special-care
embeddings, minus each concept's threshold, rounded to 3 decimals; a special-care hit raises every later score by
0.01; an image is flagged when any concept score is positive. The embeddings and thresholds are data in the bundle.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.engine.backends import Backend
from sdrt.engine.clip_image_processor import CLIPImageProcessorConfig, clip_pixel_values
from sdrt.engine.errors import BundleError, InvalidArgumentError
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)

# diffusers' fixed bump of every concept score once a special-care concept matched.
SPECIAL_CARE_ADJUSTMENT = np.float32(0.01)
SCORE_DECIMALS = 3
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default


class SafetyPolicy(str, enum.Enum):
    """What happens to an image the checker flags."""

    BLOCK = "block"  # replaced by a black image (diffusers' behaviour; the default)
    FLAG = "flag"  # returned unchanged, with its flag, for operators who review flagged output themselves
    OFF = "off"  # the checker does not run; nsfw_content_detected is None

    @classmethod
    def from_argument(cls, value: bool | str) -> SafetyPolicy:
        """`load(safety_checker=...)`: True -> BLOCK, False -> OFF, or a policy name."""
        if isinstance(value, bool):
            return cls.BLOCK if value else cls.OFF
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgumentError(
                "safety_checker", f"must be True, False or one of {[p.value for p in cls]}, got {value!r}"
            ) from None


@dataclasses.dataclass(frozen=True)
class SafetyScores:
    """One image's audit trail: every concept's score (> 0 means matched) and whether it was flagged."""

    concept_scores: np.ndarray  # (num_concepts,) cosine similarity - threshold (+ adjustment), 3 decimals
    special_care_scores: np.ndarray  # (num_special_care,)
    nsfw: bool


@dataclasses.dataclass(frozen=True)
class SafetyConcepts:
    concept_embeds: np.ndarray  # (num_concepts, P)
    concept_thresholds: np.ndarray  # (num_concepts,)
    special_care_embeds: np.ndarray  # (num_special_care, P)
    special_care_thresholds: np.ndarray  # (num_special_care,)

    @classmethod
    def from_npz(cls, path: Path) -> SafetyConcepts:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(**{field.name: data[field.name].astype(np.float32) for field in dataclasses.fields(cls)})
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"cannot read safety concepts from {path}: {exc}") from exc


def _normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (N, 1)
    return vectors / np.maximum(norms, np.float32(_NORM_EPS))  # (N, P)


def score_embeddings(image_embeds: np.ndarray, concepts: SafetyConcepts) -> list[SafetyScores]:
    """Score a batch of CLIP image embeddings (N, P) exactly as diffusers' checker does, in float32."""
    image_unit = _normalized(image_embeds.astype(np.float32))  # (N, P)
    special_cos = image_unit @ _normalized(concepts.special_care_embeds).T  # (N, S)
    concept_cos = image_unit @ _normalized(concepts.concept_embeds).T  # (N, K)

    adjustment = np.zeros(len(image_embeds), dtype=np.float32)  # (N,)
    special_scores = np.empty_like(special_cos)  # (N, S)
    # Sequential over special-care concepts: a hit raises the scores of the special concepts after it, as in diffusers.
    for k, threshold in enumerate(concepts.special_care_thresholds):
        special_scores[:, k] = np.round(special_cos[:, k] - threshold + adjustment, SCORE_DECIMALS)
        adjustment = np.where(special_scores[:, k] > 0, SPECIAL_CARE_ADJUSTMENT, adjustment)
    concept_scores = np.round(concept_cos - concepts.concept_thresholds + adjustment[:, None], SCORE_DECIMALS)  # (N, K)
    flagged = (concept_scores > 0).any(axis=1)  # (N,)
    return [
        SafetyScores(concept_scores=concept_scores[i], special_care_scores=special_scores[i], nsfw=bool(flagged[i]))
        for i in range(len(image_embeds))
    ]


class SafetyChecker:
    """Preprocesses images as the checkpoint's CLIP feature extractor does, embeds them in one call, scores them."""

    def __init__(self, backend: Backend, concepts: SafetyConcepts, preprocessor: CLIPImageProcessorConfig) -> None:
        self.backend = backend
        self.concepts = concepts
        self.preprocessor = preprocessor

    @classmethod
    def from_bundle(cls, backend: Backend, bundle_dir: Path, concepts_file: str, preprocessor_config_file: str) -> SafetyChecker:
        return cls(
            backend,
            SafetyConcepts.from_npz(bundle_dir / concepts_file),
            CLIPImageProcessorConfig.from_file(bundle_dir / preprocessor_config_file),
        )

    def check(self, images: Sequence[Image.Image]) -> list[SafetyScores]:
        """Scores for 8-bit RGB images, the same images diffusers hands its feature extractor."""
        clip_input = clip_pixel_values(images, self.preprocessor)  # (N, 3, 224, 224)
        image_embeds = self.backend.run(Component.SAFETY_CHECKER, {"clip_input": clip_input})[0]  # (N, P)
        return score_embeddings(image_embeds, self.concepts)
