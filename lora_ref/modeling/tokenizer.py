"""Tokenizers for a model folder: the byte tokenizer of the tutorial model, or an HF ``tokenizer.json``.

A real model's tokenizer is not what this project teaches, so its byte-level BPE runs in Hugging Face's
``tokenizers`` library (the Rust implementation that transformers itself uses), read from the folder's
``tokenizer.json``. What this module adds is the small amount of glue transformers puts around it:

- the special tokens named in ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``,
  ``unk_token``) and the ids they map to;
- the chat template: a Jinja template stored in ``chat_template.jinja`` (transformers >= 4.43 writes it there)
  or under ``chat_template`` in ``tokenizer_config.json``, rendered the way transformers renders it
  (``transformers/utils/chat_template_utils.py``: a sandboxed environment with ``trim_blocks`` and
  ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML,
  ``raise_exception`` and ``strftime_now``, and the special tokens passed as variables).

A folder without ``tokenizer.json`` is a byte-level model (the tutorial model): :func:`load_tokenizer` returns a
:class:`ByteTokenizer`, whose ids are the UTF-8 bytes of the text.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np

__all__ = ["load_tokenizer", "HFTokenizer", "ByteTokenizer", "render_chat_template"]

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ByteTokenizer:
    """The tutorial model's tokenizer: token id = byte value (vocabulary 256), no special tokens, no template."""

    vocab_size = 256
    bos_token_id = None
    eos_token_id = None
    pad_token_id = None
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError("byte token ids must lie in 0..255")
        return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False):
        raise ValueError("this model folder has no chat template (a byte-level model without tokenizer.json)")


def _token_text(entry) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict with "content"."""
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    raise ValueError(f"special token entry is neither a string nor an AddedToken dict: {entry!r}")


def render_chat_template(template: str, messages, *, add_generation_prompt: bool = True, **variables) -> str:
    """Render a chat template as transformers' ``apply_chat_template(..., tokenize=False)`` does.

    ``messages`` is a list of ``{"role": ..., "content": ...}`` dicts; ``variables`` (special tokens and the
    like) are passed to the template as transformers passes them. ``{% generation %}`` blocks, which
    transformers uses to find assistant tokens, render their body unchanged.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    _check_messages(messages)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")


class HFTokenizer:
    """A folder's ``tokenizer.json`` (run by the ``tokenizers`` library) with its special tokens and chat template."""

    def __init__(self, folder: str | os.PathLike):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises its own exception type
            raise ValueError(f"cannot read {path}: {' '.join(str(e).split())}") from None
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        self.folder = folder
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            text = _token_text(config.get(key))
            if text is not None:
                self.special_tokens[key] = text
        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            self.chat_template = template_file.read_text(encoding="utf-8")
        else:
            template = config.get("chat_template")
            self.chat_template = template if isinstance(template, str) else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    def _special_id(self, key: str) -> int | None:
        text = self.special_tokens.get(key)
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        """Token ids of ``text`` (int64). ``add_special_tokens`` applies the tokenizer's post-processor (e.g. a BOS)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return np.asarray(self._tok.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.int64)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}")
        return self._tok.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False):
        """The chat prompt for ``messages`` as text (or, with ``tokenize=True``, its ids, no special tokens added)."""
        if self.chat_template is None:
            raise ValueError(f"{self.folder} has no chat template (chat_template.jinja or tokenizer_config.json)")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **self.special_tokens)
        return self.encode(text) if tokenize else text


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return obj


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a model folder: :class:`HFTokenizer` if it has ``tokenizer.json``, else :class:`ByteTokenizer`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"not a model folder: {folder}")
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer(folder)
    return ByteTokenizer()
