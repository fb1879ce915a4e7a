"""The NSFW safety checker: flags equal to diffusers' and images within 5e-3, policies, audit scores, CLI."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

import sdrt.engine
from sdrt.cli.main import main
from sdrt.engine.image_io import read_png_parameters
from sdrt.engine.specs import Component
from sdrt.export import export_bundle
from sdrt.export.onnx_export import _SafetyChecker

PROMPT = "a photo of a lighthouse"
STEPS, SIZE = 3, 64
MAX_PIXEL_DIFF = 5e-3
# Rounding to 3 decimals puts the decision boundary 0.0005 from the threshold; keep every image well away from it.
MIN_MARGIN = 2e-3


def _pick_threshold(similarities: np.ndarray) -> tuple[float, float]:
    """A threshold flagging a quarter to three quarters of the images, as far as possible from every decision
    boundary, with and without the special-care adjustment of 0.01. Returns (threshold, margin)."""
    best = (float("nan"), -1.0)
    for threshold in np.linspace(similarities.min(), similarities.max(), 801):
        if not 0.25 <= (similarities > threshold).mean() <= 0.75:
            continue
        margin = min(np.abs(similarities + shift - threshold).min() for shift in (0.0, 0.01))
        best = max(best, (float(threshold), float(margin)), key=lambda pair: pair[1])
    return best


def _similarities(checker: StableDiffusionSafetyChecker, pixel_values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        embeds = torch.nn.functional.normalize(checker.visual_projection(checker.vision_model(pixel_values)[1]))
        special = embeds @ torch.nn.functional.normalize(checker.special_care_embeds).T
        concepts = embeds @ torch.nn.functional.normalize(checker.concept_embeds).T
    return special.numpy(), concepts.numpy()


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A checkpoint whose thresholds flag some of the test's images and let special care fire for some, its bundle,
    the diffusers reference pipeline with the same thresholds, and the test's latents."""
    root = tmp_path_factory.mktemp("safety")
    checkpoint = Path(shutil.copytree(tiny_checkpoint, root / "checkpoint"))
    reference = StableDiffusionPipeline.from_pretrained(checkpoint)
    reference.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(11).standard_normal((8, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    images = reference(PROMPT, num_images_per_prompt=8, latents=torch.from_numpy(latents), num_inference_steps=STEPS,
                       height=SIZE, width=SIZE, output_type="pil").images
    checker = reference.safety_checker
    special, concepts = _similarities(checker, reference.feature_extractor(images, return_tensors="pt").pixel_values)

    special_index, concept_index = int(special.std(0).argmax()), int(concepts.std(0).argmax())
    special_threshold, special_margin = _pick_threshold(special[:, special_index])
    concept_threshold, concept_margin = _pick_threshold(concepts[:, concept_index])
    assert min(special_margin, concept_margin) > MIN_MARGIN, "random checker too uniform to calibrate"
    with torch.no_grad():
        checker.special_care_embeds_weights[special_index] = special_threshold
        checker.concept_embeds_weights[concept_index] = concept_threshold
    checker.save_pretrained(checkpoint / "safety_checker")
    bundle = export_bundle(checkpoint, root / "bundle")
    return reference, bundle, latents


def _ours(bundle: Path, policy="block"):
    pipe = sdrt.engine.load(bundle, backend="exact", safety_checker=policy)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, latents: np.ndarray, **kwargs):
    n = len(latents)
    return pipe(PROMPT, num_images_per_prompt=n, latents=latents, num_inference_steps=STEPS, height=SIZE, width=SIZE, **kwargs)


@pytest.mark.parametrize("batch", range(1, 9))
def test_flags_and_images_match_diffusers(calibrated, batch: int) -> None:
    reference, bundle, latents = calibrated
    expected = reference(PROMPT, num_images_per_prompt=batch, latents=torch.from_numpy(latents[:batch].copy()),
                         num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np")
    actual = _generate(_ours(bundle), latents[:batch], output_type="np")
    assert actual.nsfw_content_detected == list(expected.nsfw_content_detected)
    assert np.abs(actual.images - expected.images).max() <= MAX_PIXEL_DIFF


def test_calibration_exercises_every_path(calibrated) -> None:
    _, bundle, latents = calibrated
    scores = _generate(_ours(bundle), latents, output_type="np", return_safety_scores=True).safety_scores
    flags = [s.nsfw for s in scores]
    assert any(flags) and not all(flags)
    special_fired = [bool((s.special_care_scores > 0).any()) for s in scores]
    assert any(special_fired) and not all(special_fired)
    for s in scores:
        assert s.concept_scores.shape == (17,) and s.special_care_scores.shape == (3,)
        assert s.nsfw == bool((s.concept_scores > 0).any())


def test_block_blackens_flagged_and_flag_policy_keeps_them(calibrated) -> None:
    _, bundle, latents = calibrated
    blocked = _generate(_ours(bundle, "block"), latents, output_type="np")
    flagged = _generate(_ours(bundle, "flag"), latents, output_type="np")
    unchecked = _generate(_ours(bundle, False), latents, output_type="np")
    assert blocked.nsfw_content_detected == flagged.nsfw_content_detected
    assert unchecked.nsfw_content_detected is None
    np.testing.assert_array_equal(flagged.images, unchecked.images)
    for i, nsfw in enumerate(blocked.nsfw_content_detected):
        if nsfw:
            assert not blocked.images[i].any()
        else:
            np.testing.assert_array_equal(blocked.images[i], unchecked.images[i])
    pil = _generate(_ours(bundle, "block"), latents).images
    assert [not np.asarray(image).any() for image in pil] == blocked.nsfw_content_detected


def test_one_checker_call_per_request_and_none_when_off(calibrated, monkeypatch) -> None:
    _, bundle, latents = calibrated
    for policy, expected_calls in (("block", 1), ("off", 0)):
        pipe = _ours(bundle, policy)
        calls = []
        original = pipe.backend.run
        monkeypatch.setattr(pipe.backend, "run", lambda c, feeds: calls.append((c, len(next(iter(feeds.values()))))) or original(c, feeds))
        out = _generate(pipe, latents[:5], return_safety_scores=True)
        checker_calls = [size for component, size in calls if component is Component.SAFETY_CHECKER]
        assert checker_calls == [5] * expected_calls
        assert (out.safety_scores is None) == (policy == "off")
        assert "safety_check" in out.timings if policy == "block" else "safety_check" not in out.timings


def test_scores_only_on_request(calibrated) -> None:
    _, bundle, latents = calibrated
    assert _generate(_ours(bundle), latents[:2]).safety_scores is None


def test_exported_checker_has_dynamic_batch(calibrated) -> None:
    reference, bundle, _ = calibrated
    session = ort.InferenceSession(str(bundle / "safety_checker/model.onnx"), providers=["CPUExecutionProvider"])
    wrapped = _SafetyChecker(reference.safety_checker).eval()
    for batch in (1, 3, 8):
        clip_input = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        with torch.no_grad():
            expected = wrapped(torch.from_numpy(clip_input)).numpy()
        np.testing.assert_allclose(session.run(None, {"clip_input": clip_input})[0], expected, atol=1e-4)


@pytest.mark.slow
def test_checkpoint_without_checker(checkpoints: dict[str, Path], tmp_path: Path, caplog) -> None:
    from sdrt.export.random_checkpoint import make_random_checkpoint

    checkpoint = make_random_checkpoint(tmp_path / "ckpt", "tiny", with_safety_checker=False)
    bundle = export_bundle(checkpoint, tmp_path / "bundle")
    assert not (bundle / "safety_checker").exists()
    with caplog.at_level(logging.WARNING, logger="sdrt"):
        pipe = _ours(bundle)
    assert [r.message for r in caplog.records if "no safety checker" in r.message]
    out = pipe("a cat", num_inference_steps=1, height=SIZE, width=SIZE, seed=0, return_safety_scores=True)
    assert out.nsfw_content_detected is None and out.safety_scores is None


def test_disabled_checker_is_logged_at_load(tiny_bundle: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="sdrt"):
        sdrt.engine.load(tiny_bundle, safety_checker=False)
    assert any("safety checker disabled" in r.message for r in caplog.records)


def test_bad_policy(tiny_bundle: Path) -> None:
    with pytest.raises(sdrt.engine.InvalidArgumentError, match="safety_checker: must be True, False or one of"):
        sdrt.engine.load(tiny_bundle, safety_checker="maybe")


def _cli(bundle: Path, out: Path, *extra: str) -> int:
    return main(["generate", str(bundle), PROMPT, "-o", str(out), "--backend", "exact", "-n", "8", "-s", str(STEPS), "--height", str(SIZE),
                 "--width", str(SIZE), "--latents", str(out.parent / "noise.npy"), "-q", *extra])


def test_cli_names_blocked_images_and_does_not_write_them(calibrated, tmp_path: Path, capsys) -> None:
    _, bundle, latents = calibrated
    np.save(tmp_path / "noise.npy", latents)
    flags = _generate(_ours(bundle), latents).nsfw_content_detected
    assert _cli(bundle, tmp_path / "img.png") == 3
    err = capsys.readouterr().err
    for i, nsfw in enumerate(flags):
        path = tmp_path / f"img-{i}.png"
        assert path.exists() != nsfw
        assert (f"{path} blocked by the safety checker" in err) == nsfw
        if not nsfw:
            assert read_png_parameters(path)["nsfw_content_detected"] is False


def test_cli_flag_policy_writes_and_names(calibrated, tmp_path: Path, capsys) -> None:
    _, bundle, latents = calibrated
    np.save(tmp_path / "noise.npy", latents)
    flags = _generate(_ours(bundle), latents).nsfw_content_detected
    assert _cli(bundle, tmp_path / "img.png", "--safety-checker", "flag") == 0
    err = capsys.readouterr().err
    for i, nsfw in enumerate(flags):
        path = tmp_path / f"img-{i}.png"
        assert read_png_parameters(path)["nsfw_content_detected"] is nsfw
        assert (f"{path} flagged by the safety checker" in err) == nsfw
