"""Write a real CLIP tokenizer (vocab.json + merges.txt) from the vendored open_clip merge list.

Real Stable Diffusion checkpoints ship `tokenizer/vocab.json` and `tokenizer/merges.txt`; the checkpoints we build
(test fixtures, the embedded default, full-size random checkpoints) must look the same, so the runtime is always
exercised on the real 49408-token vocabulary.
"""
from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from sdrt.engine.tokenizer import bytes_to_unicode

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP keeps the first 49152 - 256 - 2 merges of the open_clip list (its first line is a header).
NUM_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77


def clip_merges() -> list[str]:
    """The CLIP merge rules, one "left right" string each, in priority order."""
    raw = resources.files("sdrt.export").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    return lines[1 : NUM_MERGES + 1]


def clip_vocab(merges: list[str]) -> dict[str, int]:
    """CLIP's token -> id map: 256 byte symbols, the same with end-of-word, one per merge, then BOS and EOS."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_clip_tokenizer(out_dir: Path, pad_token: str = EOS_TOKEN, model_max_length: int = MODEL_MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json as SD checkpoints ship them.

    `pad_token` is "<|endoftext|>" for SD 1.x and "!" for SD 2.x.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = clip_merges()
    (out_dir / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        **special,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": model_max_length,
        "tokenizer_class": "CLIPTokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return out_dir
