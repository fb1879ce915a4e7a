"""The runtime's CLIP preprocessing must give exactly the pixel_values transformers' CLIP image processor gives the
diffusers pipeline's safety checker: `feature_extractor(pil_images, return_tensors="pt").pixel_values`."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdrt.engine.clip_image_processor import (
    CLIPImageConfigError,
    CLIPImageProcessorConfig,
    clip_pixel_values,
)
from sdrt.engine.errors import BundleError
from sdrt.export.random_checkpoint import SD_PREPROCESSOR_CONFIG

transformers = pytest.importorskip("transformers")

# feature_extractor/preprocessor_config.json of SD 1.5 checkpoints (old feature-extractor spelling)
SD15_CONFIG = SD_PREPROCESSOR_CONFIG
# the same settings as newer checkpoints (and transformers' save_pretrained) write them
NEW_STYLE_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}
CUSTOM_CONFIG = {
    "crop_size": {"height": 128, "width": 128},
    "size": {"shortest_edge": 160},
    "resample": 2,  # bilinear
    "image_mean": [0.5, 0.25, 0.75],
    "image_std": [0.2, 0.3, 0.4],
}

# (width, height, mode): squares, upscaling, landscape, odd portrait, extreme strips, exact and odd near-crop sizes
IMAGE_CASES = [
    (512, 512, "RGB"),
    (64, 64, "RGB"),
    (768, 512, "RGB"),
    (333, 517, "RGB"),
    (1, 300, "RGB"),
    (300, 1, "RGB"),
    (224, 224, "RGB"),
    (225, 223, "RGB"),
    (97, 161, "RGBA"),
    (300, 200, "L"),
    (250, 261, "P"),
    (131, 90, "LA"),
    (200, 201, "P-transparent"),
]


def random_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Uniform noise in `mode`; "P-transparent" is a palette image with one palette index marked transparent."""
    channels = {"L": 1, "LA": 2, "RGBA": 4}.get(mode, 3)
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)  # (H, W, C)
    if mode.startswith("P"):
        image = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE)
        if mode == "P-transparent":
            image.info["transparency"] = int(np.asarray(image)[0, 0])
        return image
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def reference_processor(config: Mapping[str, Any], tmp_path: Path) -> Any:
    """transformers' processor, loaded from a preprocessor_config.json as diffusers loads it."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    return transformers.CLIPImageProcessor.from_pretrained(tmp_path)


def reference_pixels(processor: Any, images: list[Image.Image]) -> np.ndarray:
    return processor(images, return_tensors="pt").pixel_values.numpy()  # (N, 3, crop_h, crop_w)


def assert_same_pixels(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert np.abs(actual.astype(np.float64) - expected).max() <= 1e-6
    np.testing.assert_array_equal(actual, expected)  # in practice the match is bit-exact


@pytest.fixture(scope="module")
def sd15_reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return reference_processor(SD15_CONFIG, tmp_path_factory.mktemp("sd15"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def test_reference_is_the_pil_backend(sd15_reference: Any) -> None:
    # Without torchvision transformers 5 falls back to the Pillow implementation this module mirrors; a torchvision
    # install would switch diffusers to another resizer, and these tests would then compare against that.
    assert type(sd15_reference).__name__ == "CLIPImageProcessorPil"


@pytest.mark.parametrize("config", [SD15_CONFIG, NEW_STYLE_CONFIG], ids=["old-style", "new-style"])
def test_both_config_spellings_mean_the_sd15_defaults(config: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert CLIPImageProcessorConfig.from_file(tmp_path) == CLIPImageProcessorConfig()
    assert CLIPImageProcessorConfig.from_file(tmp_path / "preprocessor_config.json") == CLIPImageProcessorConfig()
    assert CLIPImageProcessorConfig.from_dict({}) == CLIPImageProcessorConfig()


@pytest.mark.parametrize("width, height, mode", IMAGE_CASES)
def test_matches_transformers_per_image(
    width: int, height: int, mode: str, sd15_reference: Any, rng: np.random.Generator
) -> None:
    images = [random_image(rng, width, height, mode) for _ in range(2)]
    expected = reference_pixels(sd15_reference, images)
    assert_same_pixels(clip_pixel_values(images, CLIPImageProcessorConfig.from_dict(SD15_CONFIG)), expected)


@pytest.mark.parametrize("config", [SD15_CONFIG, NEW_STYLE_CONFIG, {}], ids=["old-style", "new-style", "empty"])
def test_matches_transformers_on_a_mixed_batch(
    config: dict[str, Any], tmp_path: Path, rng: np.random.Generator
) -> None:
    images = [random_image(rng, width, height, mode) for width, height, mode in IMAGE_CASES if width * height > 300]
    images += [random_image(rng, *rng.integers(20, 700, size=2)) for _ in range(12)]
    expected = reference_pixels(reference_processor(config, tmp_path), images)
    assert expected.shape == (len(images), 3, 224, 224)
    assert_same_pixels(clip_pixel_values(images, CLIPImageProcessorConfig.from_dict(config)), expected)


@pytest.mark.parametrize(
    "config",
    [
        CUSTOM_CONFIG,
        # crop larger than the resized short side: zero padding, odd differences on both axes
        {"size": {"shortest_edge": 200}, "crop_size": {"height": 215, "width": 230}},
        # no resizing: small images are padded, large ones cropped with odd margins
        {"do_resize": False, "crop_size": [57, 64]},
        {"size": {"height": 100, "width": 150}, "crop_size": 96, "resample": 0},
        {"size": 90, "default_to_square": True, "crop_size": 64},
        {"do_rescale": False, "image_mean": 127.5, "image_std": 64.0, "crop_size": 32, "size": 40},
        {"do_normalize": False, "resample": 1},
        {"do_rescale": False, "do_normalize": False, "resample": 4, "size": 48, "crop_size": 40},
        {"do_center_crop": False, "size": {"height": 33, "width": 47}, "resample": 5},
        {"rescale_factor": 0.5, "image_mean": [10, 20, 30], "image_std": [3, 5, 7], "size": 50, "crop_size": 50},
    ],
)
def test_matches_transformers_with_other_settings(
    config: dict[str, Any], tmp_path: Path, rng: np.random.Generator
) -> None:
    images = [random_image(rng, width, height, mode) for width, height, mode in IMAGE_CASES if width * height > 300]
    images += [random_image(rng, 61, 50), random_image(rng, 3, 90)]
    expected = reference_pixels(reference_processor(config, tmp_path), images)
    assert_same_pixels(clip_pixel_values(images, CLIPImageProcessorConfig.from_dict(config)), expected)


def test_matches_transformers_built_from_kwargs(rng: np.random.Generator) -> None:
    reference = transformers.CLIPImageProcessor(**CUSTOM_CONFIG)
    images = [random_image(rng, 333, 517), random_image(rng, 640, 360, "RGBA")]
    actual = clip_pixel_values(images, CLIPImageProcessorConfig.from_dict(CUSTOM_CONFIG))
    assert actual.shape == (2, 3, 128, 128)
    assert_same_pixels(actual, reference_pixels(reference, images))


def test_without_rgb_conversion_rgb_images_match_and_others_are_refused(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    config = {**CUSTOM_CONFIG, "do_convert_rgb": False}
    images = [random_image(rng, 200, 150), random_image(rng, 150, 201)]
    expected = reference_pixels(reference_processor(config, tmp_path), images)
    assert_same_pixels(clip_pixel_values(images, CLIPImageProcessorConfig.from_dict(config)), expected)
    with pytest.raises(ValueError, match="RGB"):
        clip_pixel_values([random_image(rng, 200, 150, "L")], CLIPImageProcessorConfig.from_dict(config))


@pytest.mark.parametrize(
    "key, config",
    [
        ("size", {"size": -1}),
        ("size", {"size": {"shortest_edge": 0}}),
        ("size", {"size": {"shortest_edge": 224, "longest_edge": 300}}),
        ("size", {"size": "224"}),
        ("crop_size", {"crop_size": {"shortest_edge": 224}}),
        ("crop_size", {"crop_size": [224, 224.5]}),
        ("image_mean", {"image_mean": [0.5, 0.5]}),
        ("image_mean", {"image_mean": [0.5, "0.5", 0.5]}),
        ("image_std", {"image_std": [0.5, 0.0, 0.5]}),
        ("image_std", {"image_std": float("nan")}),
        ("resample", {"resample": 7}),
        ("resample", {"resample": "bicubic"}),
        ("rescale_factor", {"rescale_factor": -1 / 255}),
        ("do_resize", {"do_resize": "yes"}),
        ("do_pad", {"do_pad": True}),
    ],
)
def test_bad_config_raises_naming_the_key(key: str, config: dict[str, Any]) -> None:
    with pytest.raises(CLIPImageConfigError, match=key) as raised:
        CLIPImageProcessorConfig.from_dict(config)
    assert raised.value.key == key
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, BundleError)


def test_from_file_reports_unreadable_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot read"):
        CLIPImageProcessorConfig.from_file(tmp_path)  # no preprocessor_config.json there
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read"):
        CLIPImageProcessorConfig.from_file(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": -1}))
    with pytest.raises(CLIPImageConfigError, match=r"'size'.*preprocessor_config\.json"):
        CLIPImageProcessorConfig.from_file(tmp_path)


def test_rejects_bad_image_arguments(rng: np.random.Generator) -> None:
    config = CLIPImageProcessorConfig()
    with pytest.raises(TypeError):
        clip_pixel_values(random_image(rng, 8, 8), config)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        clip_pixel_values([np.zeros((8, 8, 3), dtype=np.uint8)], config)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        clip_pixel_values([], config)
    uncropped = CLIPImageProcessorConfig(do_center_crop=False)
    with pytest.raises(ValueError, match="stacked"):
        clip_pixel_values([random_image(rng, 300, 224), random_image(rng, 224, 224)], uncropped)


def test_module_imports_no_build_time_library() -> None:
    script = (
        "import sys, sdrt.engine.clip_image_processor\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'torchvision', 'transformers'}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
