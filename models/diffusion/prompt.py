"""The CLIP tokenizer of a diffusion pipeline, with the `tokenizers` library only (no transformers).

Reads `tokenizer/tokenizer.json`, or builds the same BPE from the `vocab.json` and `merges.txt`
that optimum's exports carry; pads with the pad token to the text encoder's length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtimes.errors import PackageError

CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _from_vocab_merges(directory: Path, bos: str, eos: str, unk: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    bpe = models.BPE.from_file(
        str(vocab),
        str(merges),
        unk_token=unk,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        fuse_unk=False,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    bos_id, eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
    if bos_id is None or eos_id is None:
        raise PackageError(f"{vocab}: has no {bos!r} or {eos!r} token")
    tok.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, bos_id), (eos, eos_id)]
    )
    return tok


class PromptTokenizer:
    """Text to the fixed-length int ids the text encoder takes."""

    def __init__(self, directory: Path, max_length: int | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # a core dependency, but say what to do
            raise PackageError(
                f"the tokenizers package is missing ({exc}): pip install tokenizers"
            ) from exc
        self.directory = directory
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise PackageError(f"{config_path}: not valid JSON: {exc}") from exc
        bos = _token_text(config.get("bos_token")) or "<|startoftext|>"
        eos = _token_text(config.get("eos_token")) or "<|endoftext|>"
        unk = _token_text(config.get("unk_token")) or eos
        pad = _token_text(config.get("pad_token")) or eos
        if (directory / "tokenizer.json").is_file():
            try:
                self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as exc:  # tokenizers raises a bare Exception on bad files
                raise PackageError(f"{directory / 'tokenizer.json'}: cannot load: {exc}") from exc
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            self._tok = _from_vocab_merges(directory, bos, eos, unk)
        else:
            raise PackageError(
                f"{directory}: no tokenizer.json, nor vocab.json with merges.txt (CLIP BPE)"
            )
        limit = config.get("model_max_length")
        if max_length is None:
            max_length = int(limit) if isinstance(limit, int) and 0 < limit < 100_000 else 77
        self.max_length = max_length
        pad_id = self._tok.token_to_id(pad)
        if pad_id is None:
            raise PackageError(f"{directory}: the pad token {pad!r} is not in the vocabulary")
        self.pad_id = int(pad_id)
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad)

    def __call__(self, texts: list[str]) -> npt.NDArray[np.int64]:
        """Ids [len(texts), max_length]: bos, the text, eos, then pad tokens."""
        encoded = self._tok.encode_batch(texts)
        return np.asarray([e.ids for e in encoded], np.int64)
