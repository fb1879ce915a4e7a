"""The runtime's CLIP tokenizer must give exactly the ids transformers' CLIPTokenizer gives the diffusers pipeline."""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest

from sdrt.engine.tokenizer import CLIPTokenizer
from sdrt.export.clip_vocab import EOS_TOKEN, write_clip_tokenizer

transformers = pytest.importorskip("transformers")

SD1_PAD = EOS_TOKEN  # id 49407
SD2_PAD = "!"  # id 0
BOS_ID, EOS_ID = 49406, 49407

HARD_PROMPTS = [
    # plain
    "a photograph of an astronaut riding a horse",
    "A Beautiful Sunset Over The Mountains, highly detailed, 8k, trending on artstation",
    "a",
    "",
    # unicode, accents, decomposed accents (NFC), case mappings
    "café",
    "cafe\u0301 nai\u0308ve",
    "naïve Ångström",
    "Straße ÉCOLE Œuvre",
    "İstanbul",
    "ΟΔΟΣ ΣΑΣ ς",
    "ﬁne ligature ½ ² Ⅻ",
    # emoji: single, ZWJ sequences, flags, skin tones, variation selectors
    "🚀",
    "🐱‍👤 ninja cat",
    "🇺🇸🇯🇵 flags",
    "👍🏽 👩🏿‍🚀",
    "❤️ ☀︎",
    # CJK and other scripts
    "一只猫",
    "日本語のテキスト",
    "한국어",
    "кошка на крыше",
    "قطة",
    "हिन्दी",
    # digits
    "12345",
    "3.14159",
    "1,000,000",
    "year 2024 v2",
    # punctuation runs
    "!!!???...",
    "---",
    '"quotes" and \'single\'',
    "(brackets) [square] {curly} <angle>",
    "a,b;c:d/e\\f|g",
    "@#$%^&*_+=~`",
    # contractions, any case
    "don't",
    "it's",
    "we'll",
    "I'M",
    "THEY'RE",
    "you've she'd o'clock",
    "''s 's' rock'n'roll",
    # odd whitespace
    "tab\tseparated",
    "new\nline\r\nwindows",
    "multiple     spaces",
    "non\u00a0breaking",
    "zero\u200bwidth",
    "ideographic\u3000space",
    "   leading and trailing   ",
    "\t\n ",
    # control characters
    "bell\x07 null\x00 escape\x1b del\x7f",
    "\x85next line\u2028separator",
    # special-token strings typed by a user
    "<|startoftext|>",
    "<|endoftext|>",
    "a <|endoftext|> b",
    "a<|endoftext|>b<|startoftext|>c",
    "<|endoftext|><|endoftext|>",
    "<|ENDOFTEXT|> <|EndOfText|>",
    "x <|startoftext|>! y",
    "<|endoftext",
    "<|endoftext|>|>",
    # mixed case
    "MiXeD CaSe PrOmPt",
    "HTTPServer XMLHttpRequest",
    "SD2 pad ! inside!! words!!!",
]


def reference_ids(reference, prompts) -> np.ndarray:
    """Exactly how diffusers' StableDiffusionPipeline calls its tokenizer."""
    return reference(
        prompts,
        padding="max_length",
        max_length=reference.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    """Real-vocabulary tokenizer folders, SD 1.x style (pad "<|endoftext|>") and SD 2.x style (pad "!")."""
    root = tmp_path_factory.mktemp("clip_tokenizers")
    return {
        SD1_PAD: str(write_clip_tokenizer(root / "sd1", pad_token=SD1_PAD)),
        SD2_PAD: str(write_clip_tokenizer(root / "sd2", pad_token=SD2_PAD)),
    }


@pytest.fixture(scope="module", params=[SD1_PAD, SD2_PAD], ids=["sd1-pad-eos", "sd2-pad-bang"])
def tokenizer_pair(request, tokenizer_dirs) -> tuple[CLIPTokenizer, object]:
    """(ours, transformers' reference), loaded from the same folder."""
    path = tokenizer_dirs[request.param]
    return CLIPTokenizer.from_directory(path), transformers.CLIPTokenizer.from_pretrained(path)


def assert_same_ids(ours: CLIPTokenizer, reference, prompts: list[str]) -> None:
    expected = reference_ids(reference, prompts)
    actual = ours(prompts)
    assert actual.dtype == np.int64
    assert actual.shape == expected.shape == (len(prompts), 77)
    for prompt, actual_row, expected_row in zip(prompts, actual, expected):
        assert actual_row.tolist() == expected_row.tolist(), f"prompt {prompt!r}"


@pytest.mark.parametrize("prompt", HARD_PROMPTS, ids=[ascii(p)[:40] for p in HARD_PROMPTS])
def test_hard_prompt_matches_transformers(tokenizer_pair, prompt):
    assert_same_ids(*tokenizer_pair, [prompt])


def test_single_string_is_a_batch_of_one(tokenizer_pair):
    ours, reference = tokenizer_pair
    np.testing.assert_array_equal(ours("a red apple"), reference_ids(reference, "a red apple"))


def test_a(tokenizer_pair):
    ours, _ = tokenizer_pair
    row = ours("a")[0]
    assert row[:3].tolist() == [BOS_ID, 320, EOS_ID]
    assert (row[3:] == ours.pad_token_id).all()


def test_empty_prompt_is_bos_eos_then_padding(tokenizer_pair):
    ours, _ = tokenizer_pair
    row = ours("")[0]
    assert row[:2].tolist() == [BOS_ID, EOS_ID]
    assert (row[2:] == ours.pad_token_id).all()


def test_special_token_ids(tokenizer_dirs):
    sd1 = CLIPTokenizer.from_directory(tokenizer_dirs[SD1_PAD])
    sd2 = CLIPTokenizer.from_directory(tokenizer_dirs[SD2_PAD])
    for tokenizer in (sd1, sd2):
        assert (tokenizer.model_max_length, tokenizer.bos_token_id, tokenizer.eos_token_id) == (77, BOS_ID, EOS_ID)
    assert (sd1.pad_token_id, sd2.pad_token_id) == (EOS_ID, 0)


def test_sd2_pad_token_bang(tokenizer_dirs):
    """With pad "!" (a special token, matched in raw text), each "!" is id 0 and padding is 0 after EOS."""
    ours = CLIPTokenizer.from_directory(tokenizer_dirs[SD2_PAD])
    row = ours("wow!!")[0]
    assert row[:5].tolist() == [BOS_ID, ours.encode("wow")[0], 0, 0, EOS_ID]
    assert (row[5:] == 0).all()
    assert CLIPTokenizer.from_directory(tokenizer_dirs[SD1_PAD]).encode("wow!!") != ours.encode("wow!!")


def test_batch_of_prompts(tokenizer_pair):
    assert_same_ids(*tokenizer_pair, ["a cat", "", "一只猫 🚀", "a dog " * 50, "<|endoftext|>", "DON'T stop"])


def test_truncation_keeps_eos_and_warns_with_dropped_words(tokenizer_pair, caplog):
    ours, reference = tokenizer_pair
    prompt = "cat " * 80 + "elephant giraffe zebra"  # 83 tokens: 75 fit between BOS and EOS
    with caplog.at_level(logging.WARNING, logger="sdrt.engine.tokenizer"):
        row = ours(prompt)[0]
    assert row[-1] == EOS_ID
    messages = [record.getMessage() for record in caplog.records if record.name == "sdrt.engine.tokenizer"]
    assert messages == [
        "The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens: "
        "['cat cat cat cat cat elephant giraffe zebra']"
    ]
    assert_same_ids(ours, reference, [prompt, "word " * 200])


def test_no_warning_without_truncation(tokenizer_pair, caplog):
    ours, _ = tokenizer_pair
    exactly_full = " ".join(["cat"] * 75)
    with caplog.at_level(logging.WARNING, logger="sdrt.engine.tokenizer"):
        row = ours(exactly_full)[0]
    assert row[-1] == EOS_ID
    assert not [record for record in caplog.records if record.name == "sdrt.engine.tokenizer"]


def random_prompts(count: int, seed: int = 1234) -> list[str]:
    """Strings stitched from ascii, punctuation, whitespace, accented, CJK, emoji and special-token fragments."""
    rng = random.Random(seed)
    alphabets = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        " \t\n\r\u00a0\u2003\u3000\u200b\x0b\x0c",
        "éèêëÉàâäÅåñÑçÇøØßœŒıİΣσςΩüÜ\u0301\u0308\u0327",
        "一只猫日本語のテキスト한국어中文字符漢字カタカナ",
        "🚀🐱👤🏽🏿🇺🇸🇯🇵❤\ufe0f\u200d😀👍🎨",
    ]
    fragments = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "'s", "'LL", "n't", " a ", "..."]
    prompts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(0, 24)):
            if rng.random() < 0.05:
                pieces.append(rng.choice(fragments))
            else:
                alphabet = rng.choice(alphabets)
                pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
        prompts.append("".join(pieces))
    return prompts


def test_random_strings_match_transformers(tokenizer_pair):
    assert_same_ids(*tokenizer_pair, random_prompts(400))


def test_encode_has_no_bos_eos_and_decode_reads_back(tokenizer_pair):
    ours, reference = tokenizer_pair
    ids = ours.encode("Hello   wörld 🚀 <|endoftext|> it's")
    assert ids == reference("Hello   wörld 🚀 <|endoftext|> it's").input_ids[1:-1]
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(ours.encode("a photo of a cat")) == "a photo of a cat"


def test_encode_is_stable_across_calls(tokenizer_pair):
    """The per-word BPE cache must not change results."""
    ours, _ = tokenizer_pair
    first = ours.encode("the the the cat sat on the mat")
    assert first == ours.encode("the the the cat sat on the mat")
    assert first[0] == first[1] == first[2] == first[-2]


@pytest.mark.parametrize("bad", [None, 123, b"bytes", ["fine", None], [1.5]])
def test_non_string_prompt_raises_type_error(tokenizer_pair, bad):
    ours, _ = tokenizer_pair
    with pytest.raises(TypeError, match="str"):
        ours(bad)


def test_encode_non_string_raises_type_error(tokenizer_pair):
    ours, _ = tokenizer_pair
    with pytest.raises(TypeError, match="str"):
        ours.encode(42)  # type: ignore[arg-type]


def test_reads_added_token_dicts_and_missing_config(tokenizer_dirs, tmp_path):
    """Real checkpoints spell some special tokens as serialized AddedToken dicts; a missing config means defaults."""
    source = tokenizer_dirs[SD2_PAD]
    write_clip_tokenizer(tmp_path, pad_token=SD2_PAD)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for name in ("bos_token", "eos_token", "unk_token"):
        config[name] = {"__type": "AddedToken", "content": config[name], "lstrip": False, "normalized": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = CLIPTokenizer.from_directory(tmp_path)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (BOS_ID, EOS_ID, 0)
    np.testing.assert_array_equal(ours("a cat!"), CLIPTokenizer.from_directory(source)("a cat!"))

    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "special_tokens_map.json").unlink()
    defaults = CLIPTokenizer.from_directory(tmp_path)
    assert (defaults.model_max_length, defaults.bos_token_id, defaults.pad_token_id) == (77, BOS_ID, EOS_ID)
