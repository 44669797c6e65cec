"""Synthetic prompts of a given length: random tokens through a tokenizer, or random words.

With a tokenizer (``--tokenizer``: a HF model directory, a .gguf file or ``builtin://...``; the
built-in model's file is found through ``berth.models_builtin``, not the server) each prompt is a
random sequence of non-special token ids, decoded to text and re-encoded until it holds exactly
the requested number of tokens (decoding and re-encoding can merge or split tokens). Without one, a prompt is that many random common English words (about one
token each in the usual BPE vocabularies); the server's ``usage`` then gives the real count.

Lengths follow vLLM's random dataset: with ``range_ratio`` r the length is drawn uniformly
from the integers in ``[floor(L * (1 - r)), ceil(L * (1 + r))]``.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from berth import models_builtin

logger = logging.getLogger(__name__)

WORDS: tuple[str, ...] = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "hot",
    "word",
    "but",
    "what",
    "some",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "there",
    "when",
    "up",
    "use",
    "your",
    "how",
    "said",
    "an",
    "each",
    "she",
    "which",
    "do",
    "their",
    "time",
    "if",
    "will",
    "way",
    "about",
    "many",
    "then",
    "them",
    "write",
    "would",
    "like",
    "so",
    "these",
    "her",
    "long",
    "make",
    "thing",
    "see",
    "him",
    "two",
    "has",
    "look",
    "more",
    "day",
    "could",
    "go",
    "come",
    "did",
    "number",
    "sound",
    "no",
    "most",
    "people",
    "my",
    "over",
    "know",
    "water",
    "than",
    "call",
    "first",
    "who",
    "may",
    "down",
    "side",
    "been",
    "now",
    "find",
    "any",
    "new",
    "work",
    "part",
    "take",
    "get",
    "place",
    "made",
    "live",
    "where",
    "after",
    "back",
    "little",
    "only",
    "round",
    "man",
    "year",
    "came",
    "show",
    "every",
    "good",
    "me",
    "give",
    "our",
    "under",
    "name",
    "very",
    "through",
    "just",
    "form",
    "sentence",
    "great",
    "think",
    "say",
    "help",
    "low",
    "line",
    "differ",
    "turn",
    "cause",
    "much",
    "mean",
    "before",
    "move",
    "right",
    "boy",
    "old",
    "too",
    "same",
    "tell",
    "does",
    "set",
    "three",
    "want",
    "air",
    "well",
    "also",
    "play",
    "small",
    "end",
    "put",
    "home",
    "read",
    "hand",
    "port",
    "large",
    "spell",
    "add",
    "even",
    "land",
    "here",
    "must",
    "big",
    "high",
    "such",
    "follow",
    "act",
    "why",
    "ask",
    "men",
    "change",
    "went",
    "light",
    "kind",
    "off",
    "need",
    "house",
    "picture",
    "try",
    "us",
    "again",
    "animal",
    "point",
    "mother",
    "world",
    "near",
    "build",
    "self",
    "earth",
    "father",
    "head",
    "stand",
    "own",
    "page",
    "should",
    "country",
    "found",
    "answer",
    "school",
    "grow",
    "study",
    "still",
    "learn",
    "plant",
    "cover",
    "food",
    "sun",
    "four",
    "between",
    "state",
    "keep",
    "eye",
    "never",
    "last",
    "let",
    "thought",
    "city",
    "tree",
    "cross",
    "farm",
    "hard",
    "start",
    "might",
    "story",
    "saw",
    "far",
    "sea",
    "draw",
    "left",
    "late",
    "run",
)


def sample_lengths(n: int, length: int, range_ratio: float, rng: random.Random) -> list[int]:
    """``n`` lengths around ``length`` (vLLM's --random-range-ratio semantics), each >= 1."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(n)]


class PromptSource(Protocol):
    name: str

    def make(self, num_tokens: int, rng: random.Random) -> tuple[str, int]:
        """A prompt of about ``num_tokens`` tokens and its length as far as the source knows."""
        ...


class WordPrompts:
    name = "words"

    def make(self, num_tokens: int, rng: random.Random) -> tuple[str, int]:
        return " ".join(rng.choice(WORDS) for _ in range(num_tokens)), num_tokens


@dataclass
class TokenizerPrompts:
    tokenizer: Any  # a transformers tokenizer
    name: str = "tokenizer"

    def __post_init__(self) -> None:
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        self._ids = [i for i in range(len(self.tokenizer)) if i not in special]
        if not self._ids:
            raise ValueError("the tokenizer has no non-special tokens")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    def make(self, num_tokens: int, rng: random.Random) -> tuple[str, int]:
        ids = [rng.choice(self._ids) for _ in range(num_tokens)]
        text = self.decode(ids)
        for _ in range(10):
            ids = self.encode(text)
            if len(ids) == num_tokens:
                return text, num_tokens
            if len(ids) > num_tokens:
                ids = ids[:num_tokens]
            else:
                ids = ids + [rng.choice(self._ids) for _ in range(num_tokens - len(ids))]
            text = self.decode(ids)
        n = len(self.encode(text))
        logger.debug("prompt of %d tokens asked, %d made", num_tokens, n)
        return text, n


def load_tokenizer(ref: str) -> Any:
    """A transformers tokenizer from a HF directory or name, a .gguf file or ``builtin://<name>``."""
    from transformers import AutoTokenizer

    if ref.startswith(models_builtin.BUILTIN_SCHEME):
        return _gguf_tokenizer(models_builtin.builtin_gguf_path(models_builtin.builtin_name(ref)))
    path = Path(ref)
    if ref.endswith(".gguf") and not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {ref} does not exist")
        return _gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(ref)


def _gguf_tokenizer(path: Path) -> Any:
    """The tokenizer of a GGUF file: from the server's converted copy when there is one (seconds faster)."""
    from transformers import AutoTokenizer

    cached = models_builtin.converted_dir(path)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@dataclass
class Prompt:
    text: str
    prompt_len: int  # tokens, as far as the client knows (the server's usage wins)
    output_len: int


def build_prompts(
    source: PromptSource,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    prefix_len: int = 0,
) -> list[Prompt]:
    """``num_prompts`` prompts with random lengths; a shared prefix of ``prefix_len`` tokens when > 0."""
    rng = random.Random(seed)
    in_lens = sample_lengths(num_prompts, input_len, range_ratio, rng)
    out_lens = sample_lengths(num_prompts, output_len, range_ratio, rng)
    prefix, plen = source.make(prefix_len, rng) if prefix_len > 0 else ("", 0)
    prompts = []
    for n_in, n_out in zip(in_lens, out_lens, strict=True):
        text, n = source.make(n_in, rng)
        if prefix:
            text = f"{prefix} {text}"
        prompts.append(Prompt(text=text, prompt_len=plen + n, output_len=n_out))
    return prompts
