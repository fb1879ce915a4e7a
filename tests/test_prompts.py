"""Long prompts and prompt weighting (sdrt.engine.prompts): the parser, the chunking, the embeddings against a torch
reference built here from the documented semantics, and that with both options off nothing changes."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import sdrt.engine
from sdrt.engine import InvalidArgumentError, PromptOptions
from sdrt.engine.backends import BACKENDS
from sdrt.cli.main import main
from sdrt.engine.image_io import read_png_parameters
from sdrt.engine.manifest import TensorEntry
from sdrt.engine.pipeline import StableDiffusionPipeline
from sdrt.engine.prompts import NEGLIGIBLE_MEAN, WeightedText, emphasize, parse_weights, tokenize_prompt
from sdrt.engine.safety_checker import SafetyPolicy
from sdrt.engine.specs import Component
from sdrt.engine.tokenizer import CLIPTokenizer

PLAIN = PromptOptions()
LONG = PromptOptions(long_prompts=True)
WEIGHTED = PromptOptions(weighting=True)
BOTH = PromptOptions(long_prompts=True, weighting=True)
SCENE = "a red circle on a blue background, "  # 8 CLIP tokens
LONG_BASE = SCENE * 10  # 80 tokens: past one window's 75


def _run(text: str, weight: float = 1.0) -> WeightedText:
    return WeightedText(text, weight)


# ---- the weighting syntax -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, expected", [
    ("a cat", [_run("a cat")]),
    ("", [_run("")]),
    ("a (cat) and [dog]", [_run("a "), _run("cat", 1.1), _run(" and "), _run("dog", 1 / 1.1)]),
    ("(cat:1.3) (dog:.5) (fox:-1)", [_run("cat", 1.3), _run(" "), _run("dog", 0.5), _run(" "), _run("fox", -1.0)]),
    ("((cat))", [_run("cat", 1.1 * 1.1)]),
    ("((cat:1.5))", [_run("cat", 1.5 * 1.1)]),
    ("[(cat)]", [_run("cat", 1.1 / 1.1)]),
    ("(a (b:2) c)", [_run("a ", 1.1), _run("b", 2 * 1.1), _run(" c", 1.1)]),
    # escapes are the characters themselves; a backslash before anything else is text
    (r"\(cat\) \[dog\] \\ a\b", [_run(r"(cat) [dog] \ a\b")]),
    # unbalanced: a stray closer is text, an unclosed opener weighs everything after it
    ("cat) dog]", [_run("cat) dog]")]),
    ("a (cat", [_run("a "), _run("cat", 1.1)]),
    ("a [cat", [_run("a "), _run("cat", 1 / 1.1)]),
    ("cat:1.2) dog", [_run("cat:1.2) dog")]),
    # ":" not forming ":W)" is text
    ("time: 3 (cat:x)", [_run("time: 3 "), _run("cat:x", 1.1)]),
    ("(cat:1.2.3)", [_run("cat:1.2.3", 1.1)]),
    # adjacent runs of equal weight are joined; weight 1 brackets vanish
    ("(unnecessary)(parens)", [_run("unnecessaryparens", 1.1)]),
    ("a (word:1.0) b", [_run("a word b")]),
    # AUTOMATIC1111's own example of its parser
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        _run("a "), _run("house", 1.3 * 1.1 * 1.1), _run(" ", 1.1), _run("on", 1.1 / 1.1), _run(" a ", 1.1),
        _run("hill", 0.5 * 1.1), _run(", sun, ", 1.1), _run("sky", 1.1 ** 4), _run(".", 1.1)]),
])
def test_weighting_syntax(prompt: str, expected: list[WeightedText]) -> None:
    parsed = parse_weights(prompt)
    assert [r.text for r in parsed] == [r.text for r in expected]
    assert [r.weight for r in parsed] == pytest.approx([r.weight for r in expected], rel=1e-12)


def test_a_weight_too_large_for_a_float_is_refused(tiny_pipe) -> None:
    with pytest.raises(InvalidArgumentError, match="negative_prompt: the weight of 'dog' .* beyond float32's range") as error:
        tiny_pipe(["a cat"], negative_prompt="(dog:" + "9" * 400 + ")", num_inference_steps=1, prompt_options=WEIGHTED)
    assert error.value.parameter == "negative_prompt"
    with pytest.raises(ValueError, match="weight of 'cat' "):
        large = "1" + "0" * 30  # 1e30 (the syntax has no exponents): fits float32, its square does not
        parse_weights(f"((cat:{large}):{large})")


# ---- tokens and chunks --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers(checkpoints: dict[str, Path]) -> dict[str, CLIPTokenizer]:
    return {arch: CLIPTokenizer.from_directory(path / "tokenizer") for arch, path in checkpoints.items()}


def test_weights_go_to_their_runs_tokens(tokenizers) -> None:
    tokenizer = tokenizers["tiny"]
    tokenized = tokenize_prompt(tokenizer, "a (big red:1.5) [circle]", WEIGHTED)
    ids = [tokenizer.encode(word)[0] for word in ("a", "big", "red", "circle")]
    assert tokenized.input_ids.shape == (1, tokenizer.model_max_length)
    np.testing.assert_array_equal(tokenized.input_ids[0], tokenizer("a big red circle")[0])
    assert tokenized.input_ids[0, 1:5].tolist() == ids
    expected = np.ones(tokenizer.model_max_length, dtype=np.float32)
    expected[2:4], expected[4] = 1.5, 1 / 1.1  # BOS, EOS and padding weigh 1
    np.testing.assert_array_equal(tokenized.weights[0], expected)


@pytest.mark.parametrize("arch", ["tiny", "tiny-alt"])  # tiny-alt pads with SD 2's "!", not EOS
def test_long_prompts_are_cut_into_framed_chunks(tokenizers, arch: str) -> None:
    tokenizer = tokenizers[arch]
    window, size = tokenizer.model_max_length, tokenizer.chunk_length
    prompt = SCENE * 20  # 160 tokens: two full chunks and 10 more
    content = tokenizer.encode(prompt)
    tokenized = tokenize_prompt(tokenizer, prompt, LONG)
    assert tokenized.input_ids.shape == (3, window) and len(content) == 2 * size + 10
    for row, chunk in zip(tokenized.input_ids, (content[:size], content[size : 2 * size], content[2 * size :])):
        assert row[0] == tokenizer.bos_token_id and row[len(chunk) + 1] == tokenizer.eos_token_id
        assert row[1 : len(chunk) + 1].tolist() == chunk
        assert (row[len(chunk) + 2 :] == tokenizer.pad_token_id).all()
    assert (tokenized.input_ids[2, 12:] == tokenizer.pad_token_id).all() and len(tokenized.input_ids[2, 12:]) == window - 12
    np.testing.assert_array_equal(tokenized.weights, 1.0)


def test_prompts_within_one_window_tokenize_as_the_tokenizer_does(tokenizers) -> None:
    tokenizer = tokenizers["tiny"]
    for prompt in ("", "a cat", SCENE * 9):  # 72 tokens: still one window
        for options in (PLAIN, LONG, WEIGHTED, BOTH):
            tokenized = tokenize_prompt(tokenizer, prompt, options)
            np.testing.assert_array_equal(tokenized.input_ids, tokenizer(prompt))


def test_without_long_prompts_the_tail_is_truncated_with_a_warning(tokenizers, caplog) -> None:
    tokenizer = tokenizers["tiny"]
    with caplog.at_level(logging.WARNING):
        tokenized = tokenize_prompt(tokenizer, LONG_BASE + "(top left:1.4)", WEIGHTED)
    assert "truncated" in caplog.text and "top left" in caplog.text
    np.testing.assert_array_equal(tokenized.input_ids, tokenizer(LONG_BASE + "top left"))
    np.testing.assert_array_equal(tokenized.weights, 1.0)


# ---- embeddings ---------------------------------------------------------------------------------------------------
def test_with_options_off_embeddings_are_those_of_the_tokenizer_and_text_encoder(tiny_pipe) -> None:
    prompts = ["a cat", "", LONG_BASE + "top left", "(a cat:1.3)"]
    input_ids = tiny_pipe.tokenizer(prompts).astype(np.int32)  # (4, L): what the pipeline always fed
    expected = tiny_pipe.backend.run(Component.TEXT_ENCODER, {"input_ids": input_ids})[0]  # (4, L, D)
    for options in (PLAIN, PromptOptions(long_prompts=False, weighting=False)):
        np.testing.assert_array_equal(tiny_pipe.encode_prompts(prompts, options=options), expected)
    np.testing.assert_array_equal(tiny_pipe.encode_prompts(prompts), expected)


def test_unit_weights_and_short_prompts_give_the_plain_embedding_exactly(tiny_pipe) -> None:
    plain = tiny_pipe.encode_prompts(["a red circle on a blue background"])
    for prompt in ("a red (circle:1.0) on a blue background", "a red circle on a blue background"):
        for options in (WEIGHTED, BOTH):
            np.testing.assert_array_equal(tiny_pipe.encode_prompts([prompt], options=options), plain)
    np.testing.assert_array_equal(tiny_pipe.encode_prompts(["a red circle on a blue background"], options=LONG), plain)


def test_emphasis_scales_positions_then_restores_the_chunks_mean() -> None:
    rng = np.random.default_rng(0)
    hidden = (rng.standard_normal((2, 7, 5)) + 0.3).astype(np.float32)  # (K, L, D), means well away from zero
    weights = np.ones((2, 7), dtype=np.float32)
    weights[0, 2], weights[0, 4] = 1.5, 0.5  # chunk 1 keeps weight 1 throughout
    out = emphasize(hidden, weights)
    np.testing.assert_array_equal(out[1], hidden[1])
    assert out[0].mean(dtype=np.float64) == pytest.approx(hidden[0].mean(dtype=np.float64), rel=1e-6)
    factor = out[0, 0, 0] / hidden[0, 0, 0]
    np.testing.assert_allclose(out[0], hidden[0] * weights[0][:, None] * factor, rtol=1e-6)
    assert factor != pytest.approx(1.0)
    # a zero mean (a text encoder whose last layer norm has no bias) is not restored: the weights act alone
    centred = hidden - hidden.mean(axis=2, keepdims=True)  # (K, L, D), every position's mean ~0
    np.testing.assert_array_equal(emphasize(centred, weights), centred * weights[:, :, None])


def test_a_weight_scales_its_tokens_against_the_others_and_the_mean_is_kept(tiny_pipe) -> None:
    plain = tiny_pipe.encode_prompts(["a red circle on a blue background"])[0]  # (L, D)
    weighted = tiny_pipe.encode_prompts(["a (red:1.5) circle on a blue background"], options=WEIGHTED)[0]  # (L, D)
    red = 2  # BOS, "a", "red"
    assert abs(weighted.mean(dtype=np.float64) - plain.mean(dtype=np.float64)) <= 1e-5 * np.abs(plain).mean()
    ratio = np.linalg.norm(weighted, axis=1) / np.linalg.norm(plain, axis=1)  # (L,): the common rescaling, except red
    others = np.delete(ratio, red)
    np.testing.assert_allclose(others, others[0], rtol=1e-5)
    assert ratio[red] == pytest.approx(1.5 * others[0], rel=1e-5)  # red's positions moved up by 1.5 against the rest
    np.testing.assert_allclose(weighted[red] / weighted[0], 1.5 * plain[red] / plain[0], rtol=1e-4)  # same direction


def _reference_contexts(checkpoint: Path, prompts: list[list[WeightedText]]) -> np.ndarray:
    """The documented semantics, with transformers' tokenizer and torch text encoder: each prompt's runs tokenized
    on their own, cut into windows - 2 ids, framed BOS + ids + EOS + pad, encoded, weighted, mean restored per chunk,
    concatenated, and padded with the empty prompt's embedding to the longest prompt's chunk count."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    encoder = transformers.CLIPTextModel.from_pretrained(checkpoint / "text_encoder").eval()
    window = tokenizer.model_max_length
    size = window - 2

    def encode(rows: list[list[int]]) -> torch.Tensor:
        with torch.inference_mode():
            return encoder(torch.tensor(rows))[0]  # (K, L, D)

    empty = encode(tokenizer([""], padding="max_length", max_length=window).input_ids)  # (1, L, D)
    contexts = []
    for runs in prompts:
        ids: list[int] = []
        weights: list[float] = []
        for run in runs:
            run_ids = tokenizer(run.text, add_special_tokens=False).input_ids
            ids += run_ids
            weights += [run.weight] * len(run_ids)
        rows, row_weights = [], []
        for start in range(0, max(len(ids), 1), size):
            chunk, chunk_weights = ids[start : start + size], weights[start : start + size]
            padding = window - 2 - len(chunk)
            rows.append([tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
            row_weights.append([1.0, *chunk_weights, 1.0] + [1.0] * padding)
        hidden = encode(rows)  # (K, L, D)
        weighted = hidden * torch.tensor(row_weights)[:, :, None]  # (K, L, D)
        before, after = hidden.double().mean(dim=(1, 2)), weighted.double().mean(dim=(1, 2))  # (K,)
        negligible = NEGLIGIBLE_MEAN * hidden.double().abs().mean(dim=(1, 2))  # (K,)
        restorable = (before.abs() > negligible) & (after.abs() > negligible)
        weighted = weighted * torch.where(restorable, before / after, 1.0).float()[:, None, None]
        contexts.append(list(weighted))
    chunks = max(len(c) for c in contexts)
    return np.stack([torch.cat(c + [empty[0]] * (chunks - len(c))).numpy() for c in contexts])  # (B, chunks * L, D)


def test_long_weighted_prompts_match_a_torch_reference(tiny_pipe, tiny_checkpoint: Path) -> None:
    prompts = [
        "(a red circle:1.2) on a blue background, " + SCENE * 9 + "(top left:1.4), [tiny] square",  # 2 chunks
        "a green (triangle:0.8)",  # 1 chunk, padded with the empty prompt
        SCENE * 19,  # 152 tokens: 3 chunks
    ]
    runs = [
        [_run("a red circle", 1.2), _run(" on a blue background, " + SCENE * 9), _run("top left", 1.4), _run(", "),
         _run("tiny", 1 / 1.1), _run(" square")],
        [_run("a green "), _run("triangle", 0.8)],
        [_run(SCENE * 19)],
    ]
    assert [parse_weights(p) for p in prompts] == runs  # the reference is fed these runs, not our parser's output
    ours = tiny_pipe.encode_prompts(prompts, options=BOTH)
    window = tiny_pipe.tokenizer.model_max_length
    assert ours.shape == (3, 3 * window, tiny_pipe.manifest.model.text_hidden_size)
    np.testing.assert_allclose(ours, _reference_contexts(tiny_checkpoint, runs), atol=1e-4, rtol=1e-4)
    empty = tiny_pipe.empty_prompt_embedding()[0]  # (L, D)
    np.testing.assert_array_equal(ours[1, window:], np.concatenate([empty, empty]))


# ---- in the pipeline ----------------------------------------------------------------------------------------------
def _latents(pipe, prompt: str, options: PromptOptions, **kwargs) -> np.ndarray:
    return pipe(prompt, num_inference_steps=2, seed=3, height=64, width=64, output_type="latent", prompt_options=options,
                **kwargs).images


def test_a_long_prompts_tail_changes_the_image_only_with_long_prompts(tiny_pipe) -> None:
    left, right = LONG_BASE + "top left", LONG_BASE + "bottom right"
    np.testing.assert_array_equal(_latents(tiny_pipe, left, PLAIN), _latents(tiny_pipe, right, PLAIN))  # truncated
    assert np.abs(_latents(tiny_pipe, left, LONG) - _latents(tiny_pipe, right, LONG)).max() > 1e-3
    # a prompt within one window gives the same image whatever the options
    short = "a red circle, top left"
    np.testing.assert_array_equal(_latents(tiny_pipe, short, BOTH), _latents(tiny_pipe, short, PLAIN))


@pytest.mark.parametrize("backend", [b.name for b in BACKENDS if b.name != "onnxruntime-cpu"])
def test_other_backends_run_long_prompts_as_onnxruntime_does(tiny_pipe, tiny_bundle: Path, backend: str) -> None:
    backend_class = next(b for b in BACKENDS if b.name == backend)
    reason = backend_class.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")
    bundle_reason = backend_class.bundle_unavailable_reason(tiny_bundle, tiny_pipe.backend.components)
    if bundle_reason is not None:
        pytest.skip(f"{backend} cannot run the tiny bundle: {bundle_reason}")
    pipe = sdrt.engine.load(tiny_bundle, backend=backend, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = LONG_BASE + "(top left:1.3)"
    ours, reference = _latents(pipe, prompt, BOTH), _latents(tiny_pipe, prompt, BOTH)
    tolerance = 1e-3 if backend_class.exact else 0.1 * np.abs(reference).max()  # bf16 / fp16: close, not equal
    np.testing.assert_allclose(ours, reference, atol=tolerance)


def test_prompt_and_negative_prompt_are_padded_to_the_same_chunks(tiny_pipe, monkeypatch) -> None:
    contexts = []
    run = tiny_pipe.backend.run

    def recording_run(component, feeds):
        if component is Component.UNET:
            contexts.append(feeds["encoder_hidden_states"])
        return run(component, feeds)

    monkeypatch.setattr(tiny_pipe.backend, "run", recording_run)
    window = tiny_pipe.tokenizer.model_max_length
    empty = tiny_pipe.empty_prompt_embedding()[0]  # (L, D)
    negative = SCENE * 12  # 96 tokens: 2 chunks
    tiny_pipe("a cat", negative_prompt=negative, num_inference_steps=1, output_type="latent", prompt_options=LONG)
    uncond, cond = contexts[-1]  # (2 * L, D) each
    np.testing.assert_array_equal(uncond, tiny_pipe.encode_prompts([negative], options=LONG)[0])
    np.testing.assert_array_equal(cond, np.concatenate([tiny_pipe.encode_prompts(["a cat"])[0], empty]))
    # without a negative prompt the unconditional side is the empty prompt, once per chunk
    tiny_pipe(negative, num_inference_steps=1, output_type="latent", prompt_options=LONG, num_images_per_prompt=2)
    assert contexts[-1].shape == (4, 2 * window, empty.shape[1])
    np.testing.assert_array_equal(contexts[-1][:2], np.broadcast_to(np.concatenate([empty, empty]), (2, 2 * window, empty.shape[1])))
    # guidance off: the negative prompt is not encoded and does not lengthen the context
    tiny_pipe("a cat", negative_prompt=negative, guidance_scale=1.0, num_inference_steps=1, output_type="latent", prompt_options=LONG)
    assert contexts[-1].shape == (1, window, empty.shape[1])


def test_bundles_with_a_fixed_text_context_refuse_long_prompts_only(tiny_pipe) -> None:
    manifest = tiny_pipe.manifest
    window = tiny_pipe.tokenizer.model_max_length
    unet = manifest.components[Component.UNET]
    fixed = tuple(  # as bundles exported before the context was a dynamic axis record it
        TensorEntry(t.name, t.dtype, (t.shape[0], window, t.shape[2])) if t.name == "encoder_hidden_states" else t
        for t in unet.inputs)
    old = dataclasses.replace(manifest, components={**manifest.components, Component.UNET: dataclasses.replace(unet, inputs=fixed)})
    pipe = StableDiffusionPipeline(tiny_pipe.bundle_dir, old, tiny_pipe.backend, tiny_pipe.tokenizer, tiny_pipe.scheduler,
                                   None, SafetyPolicy.OFF, tiny_pipe.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_latents(pipe, "a (red:1.2) circle", BOTH), _latents(tiny_pipe, "a (red:1.2) circle", BOTH))
    with pytest.raises(InvalidArgumentError, match=rf"prompt: needs a text context of {2 * window} tokens .* fixed text "
                                                   rf"context of {window} tokens: re-export the bundle") as error:
        _latents(pipe, LONG_BASE, LONG)
    assert error.value.parameter == "prompt"


def test_prompt_options_must_be_prompt_options(tiny_pipe) -> None:
    with pytest.raises(InvalidArgumentError, match="prompt_options: must be a sdrt.engine.PromptOptions"):
        tiny_pipe("a cat", num_inference_steps=1, prompt_options={"long_prompts": True})


def test_cli_flags(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "long.png"
    prompt = LONG_BASE + "(top left:1.3)"
    assert main(["generate", str(tiny_bundle), prompt, "-o", str(out), "-s", "1", "--seed", "1", "-q", "--height", "64",
                 "--width", "64", "--no-safety-checker", "--long-prompts", "--prompt-weighting"]) == 0
    parameters = read_png_parameters(out)
    assert parameters["prompt"] == prompt and parameters["long_prompts"] and parameters["prompt_weighting"]
