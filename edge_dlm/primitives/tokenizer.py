"""Tokenizer (`tokenizer.json`, HF `tokenizers` format), chat template and streaming detokenizer.

The chat template is the Jinja source in `tokenizer_config.json["chat_template"]`, rendered in a
sandbox (a checkpoint's template is data, not code we trust).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Sequence

from edge_dlm.primitives.errors import CheckpointError, UserError
from edge_dlm.primitives.inputs import check_text, read_json_object, read_text

Message = dict[str, str]
TEMPLATE_MAX_CHARS = 256 * 1024  # Jinja source (real chat templates are a few KB)
TEMPLATE_SECONDS = 2.0  # render deadline
TEMPLATE_OUTPUT_CHARS = 64 * 1024  # beyond the conversation's own text
TOKENIZER_BYTES = 256 << 20  # tokenizer.json (a 131k-token vocabulary is ~17 MB)


class TemplateTimeout(CheckpointError):
    def __init__(self) -> None:
        super().__init__(f"the checkpoint's chat template ran longer than {TEMPLATE_SECONDS:.0f} s; refused")


# The filters a chat template may use: cheap ones, each run with its arguments and result bounded.
# (Left out: wordwrap, urlize, pprint, xmlattr, filesizeformat and the like — slow on large input and
# never needed to lay out a conversation.)
TEMPLATE_FILTERS = ("abs", "attr", "capitalize", "count", "default", "d", "dictsort", "e", "escape", "first",
                    "float", "forceescape", "groupby", "int", "items", "join", "last", "length", "list", "lower",
                    "map", "max", "min", "reject", "rejectattr", "replace", "reverse", "round", "safe", "select",
                    "selectattr", "sort", "string", "striptags", "sum", "title", "tojson", "trim", "truncate",
                    "unique", "upper", "wordcount")


def _oversized(value: Any) -> bool:
    """An argument that would make one call build more than the output limit: a big width or count,
    or a format string asking for a big width."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) > TEMPLATE_OUTPUT_CHARS
    if isinstance(value, float):
        return not abs(value) <= TEMPLATE_OUTPUT_CHARS
    return False


def _wide_format(fmt: Any) -> bool:
    """A %- or {}-format string with a field width or precision beyond the output limit."""
    import re

    return isinstance(fmt, str) and any(int(n) > TEMPLATE_OUTPUT_CHARS for n in re.findall(r"\d{6,}", fmt))


def _refuse(what: str) -> CheckpointError:
    return CheckpointError(f"the checkpoint's chat template {what}; refused")


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    """A chat template compiled by the sandbox (its code intercepts calls, attributes and operators),
    once per template: parsing and compiling took ~2.5 ms of every request; each render still runs
    in a sandbox of its own, with its own deadline."""
    return _sandbox(float("inf")).compile(source)


def _sandbox(deadline: float):
    """An immutable Jinja sandbox that stops at `deadline` (at every call, filter, attribute and chunk)
    and refuses any single operation whose result would exceed the output limit before it runs."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def bounded(result: Any) -> Any:
        if isinstance(result, (str, list, tuple)) and len(result) > TEMPLATE_OUTPUT_CHARS:
            raise _refuse("builds an oversized value")
        return result

    class Sandbox(ImmutableSandboxedEnvironment):
        def check(self) -> None:
            if time.monotonic() > deadline:
                raise TemplateTimeout()

        def precheck(self, obj: Any, args: tuple, kwargs: dict) -> None:
            self.check()
            values = list(args) + list(kwargs.values())
            name = getattr(obj, "__name__", "")
            if name != "safe_range" and any(_oversized(v) for v in values):  # Jinja bounds range() itself
                raise _refuse("passes an oversized width or count")
            if name in ("format", "format_map") and (_wide_format(getattr(obj, "__self__", None))
                                                     or any(_wide_format(v) for v in values)):
                raise _refuse("formats with an oversized width")
            if name == "replace" and len(values) >= 2:
                src = getattr(obj, "__self__", values[0] if len(values) > 2 else "")
                new = values[-1] if isinstance(values[-1], str) else values[1] if len(values) > 1 else ""
                if isinstance(src, str) and isinstance(new, str) and (len(src) + 1) * len(new) > TEMPLATE_OUTPUT_CHARS:
                    raise _refuse("replaces into an oversized string")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            __self.precheck(__obj, args, kwargs)
            return bounded(super().call(__context, __obj, *args, **kwargs))

        def getattr(self, obj, attribute):
            self.check()
            if attribute in ("format", "format_map") and _wide_format(obj):
                raise _refuse("formats with an oversized width")
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self.check()
            if argument in ("format", "format_map") and _wide_format(obj):
                raise _refuse("formats with an oversized width")
            return super().getitem(obj, argument)

        intercepted_binops = frozenset(["*", "**", "%", "+"])

        def call_binop(self, context, operator, left, right):
            self.check()
            if operator == "*" and any(isinstance(x, (str, list, tuple)) for x in (left, right)):
                n = right if isinstance(left, (str, list, tuple)) else left
                seq = left if isinstance(left, (str, list, tuple)) else right
                if isinstance(n, int) and len(seq) * n > TEMPLATE_OUTPUT_CHARS:
                    raise _refuse("builds an oversized string")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise _refuse("raises to an oversized power")
            if operator == "%" and (_wide_format(left) or any(
                    _oversized(v) for v in (right if isinstance(right, (tuple, list)) else (right,)))):
                raise _refuse("formats with an oversized width")
            return bounded(super().call_binop(context, operator, left, right))

    env = Sandbox(trim_blocks=True, lstrip_blocks=True)

    def guarded(fn):
        def run(*args, **kwargs):
            env.precheck(fn, args, kwargs)
            return bounded(fn(*args, **kwargs))

        for attr in ("jinja_pass_arg",):  # keep Jinja's context/environment passing markers
            if hasattr(fn, attr):
                setattr(run, attr, getattr(fn, attr))
        return run

    env.filters = {name: guarded(f) for name, f in env.filters.items() if name in TEMPLATE_FILTERS}
    env.tests = {name: guarded(f) for name, f in env.tests.items()}
    return env


# Split regexes of byte-level BPE tokenizers: GPT-2's (what `ByteLevel(use_regex=True)` splits with) and
# the Tekken family's (Mistral's; NLD's vocabulary), as their tokenizer.json files write them
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


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
        if not tj.exists() and not tj.is_symlink():
            raise CheckpointError(f"{path} has no tokenizer.json")
        text = read_text(tj, "tokenizer file", TOKENIZER_BYTES, CheckpointError)
        try:
            tok = HFTokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{tj} is not a valid tokenizers file ({str(exc)[:120]})") from None
        config: dict[str, Any] = {}
        tc = path / "tokenizer_config.json"
        if tc.exists() or tc.is_symlink():
            config = read_json_object(tc, str(tc), error=CheckpointError)
        template = config.get("chat_template")
        if isinstance(template, list):  # HF's named templates: [{"name": "default", "template": "..."}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{tc}: chat_template must be a string, got {type(template).__name__}")
        for key in ("bos_token", "eos_token"):
            v = config.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if v is not None and not isinstance(v, str):
                raise CheckpointError(f"{tc}: {key} must be a string, got {type(v).__name__}")
        config = {**config, "chat_template": template}
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """The largest id this tokenizer can produce (added tokens may sit beyond the vocabulary's count)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def json(self) -> str:
        """The tokenizer's `tokenizer.json` text (for llguidance's grammar masks)."""
        return self._tok.to_str()

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
        return self._tok.encode(check_text(text), add_special_tokens=add_special_tokens).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids (special tokens added) and each token's [start, end) character span in `text`
        (special tokens, which cover no text, get None)."""
        enc = self._tok.encode(check_text(text))
        special = enc.special_tokens_mask
        return enc.ids, [None if sp else tuple(o) for o, sp in zip(enc.offsets, special)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def template_knows_tools(self) -> bool:
        """Whether the chat template renders a `tools` list and tool messages itself."""
        return isinstance(self.chat_template, str) and "tools" in self.chat_template

    def render_chat(self, messages: list[Message], *, add_generation_prompt: bool = True,
                    tools: list | None = None) -> str:
        """Render `messages` ([{"role", "content"}]) with the checkpoint's chat template.

        The template is untrusted data: it runs in Jinja's immutable sandbox, with a source size limit,
        a render deadline (checked at every call and output chunk) and an output size limit.
        """
        if not self.chat_template:
            raise UserError("this checkpoint has no chat template; pass --raw to send the prompt as is")
        if not isinstance(self.chat_template, str) or len(self.chat_template) > TEMPLATE_MAX_CHARS:
            raise CheckpointError(f"the checkpoint's chat template is not a string of at most "
                                  f"{TEMPLATE_MAX_CHARS} characters; refused")
        from jinja2 import TemplateError

        def raise_exception(msg: str) -> None:
            raise UserError(f"chat template: {str(msg)[:200]}")

        limit = TEMPLATE_OUTPUT_CHARS + sum(len(str(m.get("content", ""))) for m in messages)
        env = _sandbox(time.monotonic() + TEMPLATE_SECONDS)
        env.globals["raise_exception"] = raise_exception
        out, size = [], 0
        try:
            template = env.template_class.from_code(env, _compiled(self.chat_template), env.make_globals(None))
            for chunk in template.generate(
                    messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                    bos_token=self._special("bos_token"), eos_token=self._special("eos_token")):
                env.check()
                size += len(chunk)
                if size > limit:
                    raise CheckpointError(f"the checkpoint's chat template rendered more than {limit} characters "
                                          "for this conversation; refused")
                out.append(chunk)
        except TemplateError as exc:
            raise CheckpointError(f"the checkpoint's chat template failed to render ({str(exc)[:200]})") from None
        except (RecursionError, MemoryError, OverflowError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint's chat template failed to render "
                                  f"({type(exc).__name__}: {str(exc)[:120]})") from None
        return "".join(out)

    def encode_prompt(self, prompt: str | list[Message], *, raw: bool = False, tools: list | None = None) -> list[int]:
        """Token ids for a prompt: chat-templated unless `raw` or the checkpoint has no template."""
        if isinstance(prompt, str):
            if raw or not self.chat_template:
                return self.encode(prompt)
            prompt = [{"role": "user", "content": prompt}]
        # the template writes the bos text itself; special-token strings in it map to their ids
        ids = self.encode(self.render_chat(prompt, tools=tools), add_special_tokens=False)
        if not ids:
            raise CheckpointError("the checkpoint's chat template rendered an empty prompt; pass --raw to send "
                                  "the prompt as is")
        return ids


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
