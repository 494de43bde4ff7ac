"""Text <-> token ids through the `tokenizers` library, the chat template of
`tokenizer_config.json` (or `chat_template.jinja`), and incremental decoding for streams.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtimes.errors import BackendUnavailable, ModelFormatError, ModelNotFound


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older configs: {"content": "<s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """A `tokenizer.json` with the special tokens and chat template its config names."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFound(f"{path}: no tokenizer.json; an LLM package needs one")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for bad files
            raise ModelFormatError(f"{path}: not a tokenizers file: {exc}") from exc
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ModelFormatError(f"{config_path}: not valid JSON: {exc}") from exc
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        jinja_file = directory / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.vocab_size = self._tok.get_vocab_size()
        eos: set[int] = set()
        for name in (self.eos_token, "</s>", "<|end|>", "<|endoftext|>", "<|im_end|>"):
            tid = self._tok.token_to_id(name) if name else None
            if tid is not None:
                eos.add(tid)
        self.eos_ids = frozenset(eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def decode_stream(self) -> Any | None:
        """A Rust-side incremental decoder (tokenizers >= 0.21 `DecodeStream`): one call per
        token instead of two decodes; None where the installed tokenizers lacks it."""
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:
            return None
        return _Stream(DecodeStream(skip_special_tokens=True), self._tok)

    def token_id(self, token: str) -> int | None:
        tid = self._tok.token_to_id(token)
        return None if tid is None else int(tid)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` with the model's own template (sandboxed Jinja, as transformers)."""
        if self.chat_template is None:
            raise ModelFormatError("this model has no chat template; send a plain prompt")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise BackendUnavailable(
                "chat templates need jinja2: pip install jinja2 (or send a plain prompt)"
            ) from exc
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The template already writes the BOS token: encode without adding another."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


class _Stream:
    """`DecodeStream` bound to its tokenizer: step(token) -> new text ('' while a character
    is incomplete)."""

    def __init__(self, stream: Any, tokenizer: Any) -> None:
        self._stream, self._tok = stream, tokenizer

    def step(self, token: int) -> str:
        piece = self._stream.step(self._tok, token)
        return piece or ""


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back an incomplete UTF-8
    character and any tail that could still become a stop string."""

    def __init__(self, tokenizer: TextTokenizer, stops: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False
        self._raw = ""
        # Decode only a short window: ids[_start:_read] is decoded text, ids[_read:] is new.
        self._start = self._read = 0
        make_stream = getattr(tokenizer, "decode_stream", None)  # the fast path, where there
        self._stream = make_stream() if make_stream is not None else None

    def _new_text(self) -> str | None:
        """The text the newest token adds; None while a multi-byte character is incomplete."""
        if self._stream is not None:
            try:
                piece = self._stream.step(self.ids[-1])
            except Exception:  # an id the tokenizer cannot decode: the window way from here
                self._stream = None
                self._start = self._read = len(self.ids) - 1
            else:
                self._start = self._read = len(self.ids)
                return piece or None
        before = self._tok.decode(self.ids[self._start : self._read])
        window = self._tok.decode(self.ids[self._start :])
        if window.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return None
        self._start, self._read = self._read, len(self.ids)
        return window[len(before) :]

    def push(self, token: int) -> str:
        """Add a token; return the text now safe to send ('' if none)."""
        self.ids.append(token)
        new = self._new_text()
        if new is None:
            return ""
        self._raw += new
        if not self._stops:  # nothing to hold back: all of it is safe to send
            self.text = self._raw
            self.sent = len(self._raw)
            return new
        text = self.text = self._raw
        for stop in self._stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                self.text = text[:at]
                self.stopped = True
        if self.stopped:
            return self.flush()
        hold = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        safe = len(self.text) - hold
        piece = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return piece

    def flush(self) -> str:
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        return piece
