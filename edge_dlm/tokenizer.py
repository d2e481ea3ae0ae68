"""Tokenizer (`tokenizer.json`, HF `tokenizers` format), chat template and streaming detokenizer.

The chat template is the Jinja source in `tokenizer_config.json["chat_template"]`, rendered in a
sandbox (a checkpoint's template is data, not code we trust).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from edge_dlm.errors import CheckpointError, UserError

Message = dict[str, str]


class Tokenizer:
    def __init__(self, tok: Any, config: dict[str, Any]) -> None:
        self._tok = tok
        self.config = config
        self.chat_template: str | None = config.get("chat_template") or None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise CheckpointError(f"{path} has no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{tj} is not a valid tokenizers file ({str(exc)[:120]})") from None
        config: dict[str, Any] = {}
        tc = path / "tokenizer_config.json"
        if tc.exists():
            try:
                config = json.loads(tc.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{tc} is not valid JSON ({exc})") from None
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def _special(self, key: str) -> str:
        v = self.config.get(key)
        if isinstance(v, dict):  # {"content": "<s>", ...}
            v = v.get("content")
        return v or ""

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role", "content"}]) with the checkpoint's chat template."""
        if not self.chat_template:
            raise UserError("this checkpoint has no chat template; pass --raw to send the prompt as is")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise UserError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._special("bos_token"), eos_token=self._special("eos_token"))
        except TemplateError as exc:
            raise CheckpointError(f"the checkpoint's chat template failed to render ({exc})") from None

    def encode_prompt(self, prompt: str | list[Message], *, raw: bool = False) -> list[int]:
        """Token ids for a prompt: chat-templated unless `raw` or the checkpoint has no template."""
        if isinstance(prompt, str):
            if raw or not self.chat_template:
                return self.encode(prompt)
            prompt = [{"role": "user", "content": prompt}]
        # the template writes the bos text itself; special-token strings in it map to their ids
        return self.encode(self.render_chat(prompt), add_special_tokens=False)


class StreamDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 / merges.

    Decodes a short window `ids[prefix:]` each step and emits what it adds beyond `ids[prefix:read]`
    (the approach of HF's TextStreamer and vLLM's incremental detokenizer), so cost stays O(window).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
