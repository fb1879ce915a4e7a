"""CLIP byte-level BPE tokenizer for the runtime, written with the standard library, numpy and `regex` only.

Why hand-written: the runtime is meant to stay lean (numpy + onnxruntime), and pulling in transformers + tokenizers
(+ torch, in practice) just to turn a prompt into 77 integers would dwarf everything else it imports. The exporter
keeps using transformers; this module reproduces, id for id, what the pipeline gets from

    CLIPTokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids

with transformers 5.x, where `CLIPTokenizer` is backed by the `tokenizers` library and configured as follows
(transformers/models/clip/tokenization_clip.py). Each step below is mirrored by one function here:

1. Special tokens (bos, eos, unk, pad) are "added tokens" with normalized=False: they are matched in the *raw*
   text, leftmost-longest, before any normalization, so a user typing "<|endoftext|>" gets id 49407 - and, with SD
   2.x's pad token "!", every "!" becomes the pad id 0. Text between them is processed piece by piece.
2. Normalizer: NFC, then every run of whitespace (Unicode White_Space, i.e. `\\s`) -> one space, then lowercase
   character by character (no Greek final-sigma rule - str.lower() applies it, so capital sigma is lowered first).
   No ftfy, no strip: leading and trailing spaces vanish in the next step anyway.
3. Pre-tokenizer: keep the matches of CLIP's pattern (`'s|'t|...|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`, which
   also lists the two special strings), then split each match again with GPT-2's byte-level pattern (ByteLevel
   with use_regex=True). The second split only matters for special strings that were *not* matched in step 1
   (e.g. "<|EndOfText|>", lowercased in step 2): they come out as "<|", "endoftext", "|>".
4. Byte-level BPE: each piece's UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`) and merged
   with CLIP's merge ranks, the last symbol carrying the "</w>" end-of-word suffix.
5. Post-processing: content ids are truncated to model_max_length - 2, then wrapped in BOS ... EOS (so EOS is
   always kept last) and right-padded with the pad id.

Known limit: character classes come from the `regex` module and case mapping from the interpreter's unicodedata,
the reference's from its bundled Oniguruma and Rust tables. They agree on every character except ones assigned in
very recent Unicode versions (a few dozen case mappings newer than the running Python's unicodedata, and letters
added in Unicode 17, which Oniguruma does not know yet); prompts made of such characters may tokenize differently.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import regex

logger = logging.getLogger(__name__)

# transformers' CLIPTokenizer defaults, used when tokenizer_config.json leaves a value out.
DEFAULT_BOS_TOKEN = "<|startoftext|>"
DEFAULT_EOS_TOKEN = "<|endoftext|>"
DEFAULT_MODEL_MAX_LENGTH = 77  # CLIP's text context length
#: how much of a truncated prompt's dropped tail the warning repeats
_ECHOED_CHARACTERS = 120
END_OF_WORD = "</w>"

_WHITESPACE_RUN = regex.compile(r"\s+")
# CLIP's pre-tokenizer pattern, verbatim from transformers' CLIPTokenizer (case-sensitive: lowercasing came first).
_CLIP_PIECE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# GPT-2's pattern, applied by the `tokenizers` ByteLevel pre-tokenizer to every piece the CLIP pattern produced.
_BYTE_LEVEL_PIECE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_BPE_CACHE_SIZE = 1 << 16


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _to_byte_symbols(piece: str) -> str:
    """The piece's UTF-8 bytes, each spelled as its printable BPE symbol."""
    # Latin-1 decoding turns each byte into the code point of the same value, which translate() then remaps.
    return piece.encode("utf-8").decode("latin-1").translate(bytes_to_unicode())


def normalize(text: str) -> str:
    """The reference's normalizer: NFC, whitespace runs -> one space, per-character lowercase."""
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text)
    # str.lower() maps a word-final capital sigma to "ς"; per-character lowercasing (Rust's) always gives "σ".
    return text.replace("Σ", "σ").lower()


def pre_tokenize(normalized: str) -> list[str]:
    """Split normalized text into the pieces that are BPE-encoded independently."""
    return [
        byte_level_piece
        for clip_piece in _CLIP_PIECE.findall(normalized)
        for byte_level_piece in _BYTE_LEVEL_PIECE.findall(clip_piece)
    ]


def _special_token_value(value: object) -> str | None:
    """A special token as tokenizer_config.json spells it: a plain string or a serialized AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional "#version" header, then one "left right" pair per line in priority order."""
    merges = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or (line_number == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{line_number}: expected 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer; `__call__` gives the text encoder's `input_ids`."""

    model_max_length: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    unk_token_id: int

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        bos_token: str = DEFAULT_BOS_TOKEN,
        eos_token: str = DEFAULT_EOS_TOKEN,
        unk_token: str = DEFAULT_EOS_TOKEN,
        pad_token: str = DEFAULT_EOS_TOKEN,
    ) -> None:
        if model_max_length < 2:
            raise ValueError(f"model_max_length must leave room for BOS and EOS, got {model_max_length}")
        self._token_to_id = dict(vocab)
        self._id_to_token = {token_id: token for token, token_id in self._token_to_id.items()}
        self._merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._byte_symbol_to_byte = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
        self.model_max_length = model_max_length
        self.bos_token_id = self._special_token_id(bos_token)
        self.eos_token_id = self._special_token_id(eos_token)
        self.unk_token_id = self._special_token_id(unk_token)
        self.pad_token_id = self._special_token_id(pad_token)
        self._special_ids = {token: self._token_to_id[token] for token in (bos_token, eos_token, unk_token, pad_token)}
        # Longest first, so that the alternation picks the longest special string at the leftmost position.
        alternatives = sorted(self._special_ids, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        # Per instance: a decorated method would share one cache across tokenizers. Bounded for long-lived servers.
        self._piece_ids = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._encode_piece)

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> CLIPTokenizer:
        """Load a checkpoint's `tokenizer/` folder: vocab.json, merges.txt and tokenizer_config.json.

        Special tokens missing from tokenizer_config.json are taken from special_tokens_map.json when present,
        then from transformers' CLIPTokenizer defaults.
        """
        path = Path(path)
        vocab = _read_json(path / "vocab.json")
        merges = _read_merges(path / "merges.txt")
        config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
        special_map_path = path / "special_tokens_map.json"
        special_map = _read_json(special_map_path) if special_map_path.exists() else {}
        defaults = {
            "bos_token": DEFAULT_BOS_TOKEN,
            "eos_token": DEFAULT_EOS_TOKEN,
            "unk_token": DEFAULT_EOS_TOKEN,
            "pad_token": DEFAULT_EOS_TOKEN,
        }
        special_tokens = {
            name: _special_token_value(config.get(name)) or _special_token_value(special_map.get(name)) or default
            for name, default in defaults.items()
        }
        model_max_length = int(config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH))
        return cls(vocab, merges, model_max_length=model_max_length, **special_tokens)

    def _special_token_id(self, token: str) -> int:
        if token not in self._token_to_id:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return self._token_to_id[token]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}: {text!r}")
        ids: list[int] = []
        # re.split with a capturing group alternates: ordinary text, special token, ordinary text, ...
        for index, segment in enumerate(self._special_split.split(text)):
            if index % 2:
                ids.append(self._special_ids[segment])
            elif segment:
                for piece in pre_tokenize(normalize(segment)):
                    ids.extend(self._piece_ids(piece))
        return ids

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized piece (cached: prompts repeat the same words over and over)."""
        tokens = self._bpe(_to_byte_symbols(piece))
        # Every byte symbol is in CLIP's vocabulary; unk only guards against a malformed one, as `tokenizers` does.
        return tuple(self._token_to_id.get(token, self.unk_token_id) for token in tokens)

    def _bpe(self, word: str) -> list[str]:
        """Merge the word's symbols, always applying the best-ranked adjacent pair first.

        Every occurrence of the best pair is merged in one left-to-right pass. `tokenizers` merges one occurrence
        at a time from a priority queue instead; the two agree because a merge can only create pairs ranked after
        itself (a token exists only once the merge producing it was learned).
        """
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            ranked_pairs = [(self._merge_ranks.get(pair), pair) for pair in zip(symbols, symbols[1:])]
            known = [(rank, pair) for rank, pair in ranked_pairs if rank is not None]
            if not known:
                break
            _, best = min(known)
            symbols = self._merge_pair(symbols, best)
        return symbols

    @staticmethod
    def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
        """Replace each non-overlapping occurrence of `pair`, scanning left to right, by its concatenation."""
        merged = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        return merged

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` as transformers decodes it (special tokens kept, "</w>" -> space, stripped), for messages."""
        byte_chunks = []
        for token_id in ids:
            token = self._id_to_token.get(int(token_id))
            if token is None:
                raise ValueError(f"token id {token_id} is not in the vocabulary")
            symbols = [self._byte_symbol_to_byte.get(char) for char in token]
            # Like the `tokenizers` ByteLevel decoder: a token that is not all byte symbols is taken as plain text.
            byte_chunks.append(token.encode("utf-8") if None in symbols else bytes(symbols))
        text = b"".join(byte_chunks).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    @property
    def chunk_length(self) -> int:
        """Content ids one sequence holds between BOS and EOS: model_max_length - 2 (75 for CLIP's 77)."""
        return self.model_max_length - 2

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """`input_ids` of shape (batch, model_max_length), int64: BOS + ids + EOS, truncated, then padded.

        A prompt longer than the model allows loses its tail (EOS stays last); a warning names the dropped text.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a str or a sequence of str, got {type(prompts).__name__}")
        if not prompts:
            return np.full((0, self.model_max_length), self.pad_token_id, dtype=np.int64)
        return np.stack([self.frame(self.truncate(self.encode(prompt))) for prompt in prompts])  # (batch, L)

    def frame(self, content: Sequence[int]) -> np.ndarray:
        """One sequence of model_max_length int64 ids: BOS + `content` + EOS, right-padded with the pad id.
        `content` must fit (at most `chunk_length` ids): see `truncate`."""
        if len(content) > self.chunk_length:
            raise ValueError(f"{len(content)} ids do not fit between BOS and EOS ({self.chunk_length} do)")
        sequence = np.full(self.model_max_length, self.pad_token_id, dtype=np.int64)  # (L,)
        sequence[: len(content) + 2] = [self.bos_token_id, *content, self.eos_token_id]
        return sequence

    def truncate(self, ids: list[int]) -> list[int]:
        """Keep the ids that fit between BOS and EOS, warning (as diffusers does) about the rest."""
        room = self.chunk_length
        if len(ids) <= room:
            return ids
        dropped = self.decode(ids[room:])
        if len(dropped) > _ECHOED_CHARACTERS:  # diffusers echoes it all: kilobytes for a long prompt
            dropped = f"{dropped[:_ECHOED_CHARACTERS]}... ({len(ids) - room} tokens dropped)"
        logger.warning(
            "The following part of your input was truncated because CLIP can only handle sequences up to %d tokens: %s",
            self.model_max_length,
            [dropped],
        )
        return ids[:room]
