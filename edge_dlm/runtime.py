"""The embedding API: `load()` a model once, then `generate` / `stream` requests in any mode.

    import edge_dlm
    rt = edge_dlm.load()                       # the bundled demo model, on the best device
    print(rt.generate("def fib(n):", mode="linear-spec", max_new_tokens=64).text)
    for ev in rt.stream([{"role": "user", "content": "Hello"}], mode="diffusion", steps=4):
        if isinstance(ev, edge_dlm.Text):
            print(ev.delta, end="", flush=True)

Thread safety: a `Runtime` runs one request at a time (an internal lock serializes `generate` and
`stream`; callers wait their turn in arrival order). Share one Runtime across threads freely; to cancel, pass a
`threading.Event` as `cancel` and set it from any thread: the request stops after its current pass
with `finish_reason == "cancelled"`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from pathlib import Path
from typing import Iterator, Union

import torch

from edge_dlm.model.config import NLDConfig
from edge_dlm.decoding import (SPECULATIVE, Canvas, Decoder, Done, Draft, Emit, GenerationOptions,
                               Result, mode_fn)
from edge_dlm.primitives.errors import CheckpointError, UserError
from edge_dlm.primitives.device import resolve_device, resolve_dtype
from edge_dlm.primitives.machine import set_threads
from edge_dlm.primitives.sampling import SamplingParams
from edge_dlm.primitives.tokenizer import Message, StreamDetokenizer, Tokenizer

FILL_OPTIONS = {"steps", "threshold", "block_size", "temperature", "top_k", "top_p", "seed"}


@dataclasses.dataclass(frozen=True)
class Text:
    """Newly decoded output text (emitted alongside the `Emit` event that produced it)."""

    delta: str


StreamEvent = Union[Canvas, Draft, Emit, Text, Done]


class FifoLock:
    """A lock granted in arrival order: a request never starves behind a loop that takes the runtime
    again and again (a background calibration runs one measurement at a time between requests)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = self._serving = 0

    def __enter__(self) -> "FifoLock":
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            self._cond.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class Runtime:
    """A loaded model + tokenizer, serving requests in any decoding mode without reloading."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, path: Path,
                 device: torch.device, dtype: torch.dtype, kernels: bool = False,
                 engine: str = "torch", quant: str | None = None, name: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.name = name or path.name  # the model's own name: titles, banners, the server's "model"
        self.device = device
        self.dtype = dtype
        self.config: NLDConfig = model.config
        self.kernels = kernels  # Triton attention + greedy picks (see edge_dlm.kernels)
        self.engine = engine
        self.quant = quant  # the scheme load() quantized the weights with, if it did
        self._lock = FifoLock()
        self._cache = None  # reused across requests: a compiled pass sees the same buffers again
        self._cache_need = 0

    @property
    def quant_scheme(self) -> str | None:
        """The weights' quantization: the artifact's own, or the one applied on load."""
        return (self.config.quantization or {}).get("scheme") or self.quant

    @property
    def precision(self) -> str:
        """What the status lines show: dtype, weight quantization and a non-torch engine."""
        parts = [str(self.dtype).removeprefix("torch."), self.quant_scheme,
                 None if self.engine == "torch" else self.engine,
                 "compiled" if getattr(self.model, "compiled", False) else None]
        return " ".join(p for p in parts if p)

    @property
    def has_lora(self) -> bool:
        if hasattr(self.model, "has_lora"):  # exported engines know it from their graph
            return self.model.has_lora
        return any(layer.self_attn.o_lora is not None for layer in self.model.encoder.layers)

    def encode(self, prompt: str | list[Message], raw: bool = False) -> list[int]:
        if isinstance(prompt, str) and not prompt.strip():
            raise UserError("the prompt is empty")
        if isinstance(prompt, list) and not prompt:
            raise UserError("the conversation has no messages")
        return self.tokenizer.encode_prompt(prompt, raw=raw)

    def options(self, **kw) -> GenerationOptions:
        """`GenerationOptions` from keyword arguments: the fields themselves, and `temperature`, `top_k`,
        `top_p`, `seed`; `repeat_penalty`, `repeat_last_n`, `frequency_penalty`, `presence_penalty`,
        `logit_bias` ({token id: bias}); a constraint: `json_schema` (a dict or its JSON text),
        `json=True` (any JSON object), `regex`, or `grammar` (Lark)."""
        from edge_dlm.decoding.controls import Constraint, Penalties

        sampling = SamplingParams(**{k: kw.pop(k) for k in ("temperature", "top_k", "top_p", "seed")
                                     if k in kw and kw[k] is not None})
        pen = {"repeat": kw.pop("repeat_penalty", None), "last_n": kw.pop("repeat_last_n", None),
               "frequency": kw.pop("frequency_penalty", None), "presence": kw.pop("presence_penalty", None)}
        bias = kw.pop("logit_bias", None)
        if bias:
            try:
                pen["bias"] = tuple(sorted((int(t), float(b)) for t, b in dict(bias).items()))
            except (TypeError, ValueError):
                raise UserError("logit_bias must map token ids to numbers") from None
        penalties = Penalties(**{k: v for k, v in pen.items() if v is not None})
        penalties.validate(self.config.vocab_size)
        kinds = {"json_schema": kw.pop("json_schema", None), "regex": kw.pop("regex", None),
                 "lark": kw.pop("grammar", None), "json": kw.pop("json", None) or None}
        given = [(k, v) for k, v in kinds.items() if v is not None]
        if len(given) > 1:
            raise UserError(f"one constraint per request; got {' and '.join(k for k, _ in given)}")
        if given and kw.get("constraint") is None:
            kind, v = given[0]
            if kind == "json_schema" and not isinstance(v, str):
                import json as _json

                v = _json.dumps(v)
            kw["constraint"] = Constraint(kind, "" if kind == "json" else v)
        if isinstance(kw.get("stop"), (str, list)):
            kw["stop"] = tuple([kw["stop"]] if isinstance(kw["stop"], str) else kw["stop"])
        kw = {k: v for k, v in kw.items() if v is not None}
        opts = GenerationOptions(sampling=sampling, penalties=penalties, **kw).resolve(
            self.config.block_size, self.config.max_position_embeddings)
        if opts.constraint is not None:  # a bad grammar is refused before the request's turn
            from edge_dlm.decoding.controls import matcher

            matcher(opts.constraint, self.tokenizer, self.config.vocab_size, self.config.eos_token_id)
        return opts

    def prepare(self, prompt: str | list[Message] | list[int], *, raw: bool = False,
                **kw) -> tuple[list[int], GenerationOptions]:
        """A request's prompt ids and resolved options, or the one-line error it would fail with.
        With `tools` (OpenAI's list; `tool_choice`, `parallel_tool_calls`) they are rendered into the
        prompt and the answer is constrained to text or valid calls (`edge_dlm.decoding.tools`)."""
        tools, rendered = kw.pop("tools", None), None
        choice, parallel = kw.pop("tool_choice", None), kw.pop("parallel_tool_calls", True)
        used = isinstance(prompt, list) and any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                                                for m in prompt)
        if tools or used:
            from edge_dlm.decoding import tools as tmod

            tools = tmod.check_tools(tools) if tools else []
            choice = tmod.check_choice(choice, tools) if tools else "none"
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            if not isinstance(prompt, list) or not prompt or not isinstance(prompt[0], dict):
                raise UserError("tools need a chat (a list of messages)")
            if choice != "none":
                if any(kw.get(k) is not None for k in ("json_schema", "json", "regex", "grammar", "constraint")):
                    raise UserError("tool calls and a response format cannot be combined; drop one")
                kw["constraint"] = tmod.constraint(tools, choice, parallel is not False)
                rendered = tools
            knows = self.tokenizer.template_knows_tools
            prompt = tmod.render_messages(prompt, rendered, knows)
            if knows:
                opts = self.options(**kw)
                ids = self.tokenizer.encode_prompt(prompt, tools=rendered)
                return self._check_fits(ids, opts)
        opts = self.options(**kw)
        ids = list(prompt) if prompt and isinstance(prompt[0], int) else self.encode(prompt, raw=raw)
        return self._check_fits(ids, opts)

    def _check_fits(self, ids: list[int], opts: GenerationOptions) -> tuple[list[int], GenerationOptions]:
        if not ids:
            raise UserError("the prompt encodes to no tokens")
        ctx = self.config.max_position_embeddings
        if len(ids) >= ctx:
            raise UserError(f"the prompt is {len(ids)} tokens but the model context is {ctx}; shorten it")
        if opts.mode == "quadratic-spec" and len(ids) + opts.scratch_tokens() > ctx:
            raise UserError(f"--block-size {opts.block_size} is too large for quadratic-spec: its "
                            f"B(B+1) = {opts.scratch_tokens()}-token pass does not fit the {ctx}-token "
                            "context after the prompt; use a smaller block size")
        return ids, dataclasses.replace(opts, max_new_tokens=min(opts.max_new_tokens, ctx - len(ids)))

    def stream(self, prompt: str | list[Message] | list[int], *, raw: bool = False,
               cancel: threading.Event | None = None, **kw) -> Iterator[StreamEvent]:
        """Yield events (`Canvas`, `Draft`, `Emit`, `Text`, then `Done`) for one request.

        `prompt` is a string (chat-templated unless `raw`), a list of chat messages, or token ids.
        Keyword options: mode, max_new_tokens, block_size, steps, threshold, temperature, top_k,
        top_p, seed, use_lora; the controls of `options` (stop, penalties, logprobs, a constraint);
        tools, tool_choice, parallel_tool_calls (`prepare`; the calls land in `Result.tool_calls`).
        """
        tools = kw.get("tools") if kw.get("tool_choice") != "none" else None
        ids, opts = self.prepare(prompt, raw=raw, **kw)
        serving = getattr(getattr(self.model, "step", None), "serving", contextlib.nullcontext)
        with self._lock, serving():  # no background compile starts while a request decodes
            for event in self._run(ids, opts, cancel):
                if tools and isinstance(event, Done):  # the calls, parsed from the constrained text
                    from edge_dlm.decoding.tools import parse_calls

                    content, calls = parse_calls(event.result.text, tools)
                    if calls:
                        event.result.text, event.result.tool_calls = content or "", calls
                        event.result.finish_reason = "tool_calls" if event.result.finish_reason == "stop" \
                            else event.result.finish_reason
                yield event

    def _run(self, ids: list[int], opts: GenerationOptions,
             cancel: threading.Event | None) -> Iterator[StreamEvent]:
        from edge_dlm.decoding.controls import StopFilter

        capacity = len(ids) + opts.max_new_tokens + opts.scratch_tokens()
        dec = Decoder(self.model, opts, self._new_cache(capacity), prompt=ids, tokenizer=self.tokenizer)
        detok = StreamDetokenizer(self.tokenizer)
        stops = StopFilter(opts.stop)  # the text never holds a stop sequence; a stream holds back only
        shown: list[str] = []  # the tail that could still become one
        start = time.perf_counter()
        try:
            for event in mode_fn(opts.mode)(dec, ids):
                yield event
                if isinstance(event, Emit) and event.ids:
                    delta = stops.push(detok.push(event.ids))
                    if delta:
                        shown.append(delta)
                        yield Text(delta)
                    if stops.stopped:
                        dec.finish_reason = "stop"
                        break
                if cancel is not None and cancel.is_set():
                    dec.finish_reason = dec.finish_reason or "cancelled"
                    break
        except Exception:
            self._cache = None  # a failed pass (overflowing weights) may have left NaN in its scratch
            raise
        tail = stops.push(detok.flush()) if not stops.stopped else ""
        tail += stops.flush()
        if tail:
            shown.append(tail)
            yield Text(tail)
        elapsed = time.perf_counter() - start
        yield Done(Result(
            text="".join(shown), prompt_ids=ids, output_ids=dec.output_ids, logprobs=dec.logprobs,
            finish_reason=dec.finish_reason or "length", mode=opts.mode, nfe=dec.nfe,
            tpf=dec.stream_len / max(dec.nfe, 1), elapsed_s=elapsed,
            tokens_per_s=dec.stream_len / elapsed if elapsed > 0 else 0.0,
            mean_accepted=(dec.cycle_tokens / dec.cycles if dec.cycles else 0.0)
            if opts.mode in SPECULATIVE else None,
            ttft_s=(dec.first_token_time - start) if dec.first_token_time else None))

    def _new_cache(self, capacity: int):
        """An empty KV cache for `capacity` tokens: the last request's, when it is large enough (called
        under the lock). Its slots past the committed length are never read unmasked."""
        if self._cache is None or capacity > self._cache_need:
            self._cache = None  # free the old buffers before allocating the new ones
            self._check_cache_fits(capacity)
            self._cache, self._cache_need = self.model.new_cache(capacity), capacity
        self._cache.truncate(0)
        return self._cache

    def _check_cache_fits(self, capacity: int) -> None:
        """A request's KV cache is allocated whole: refuse one that cannot fit, with the numbers."""
        from edge_dlm.model.checks import physical_memory
        from edge_dlm.model.nld import cache_dtype

        c = self.config
        need = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * capacity * \
            torch.empty((), dtype=cache_dtype(self.dtype, self.device)).element_size()
        have = physical_memory(self.device)
        if have is not None and need > 0.9 * have:
            raise UserError(f"this request needs a {capacity}-token KV cache ({need / 2**30:.1f} GiB), more than the "
                            f"{have / 2**30:.1f} GiB available; lower max_new_tokens or shorten the prompt")

    # -- fill in the middle and edit in place (contract: docs/infill.md) ------------------------------
    def _fill_options(self, kw: dict) -> GenerationOptions:
        bad = set(kw) - FILL_OPTIONS
        if bad:
            raise UserError(f"infill/edit take no {', '.join(sorted(bad))}; known: {', '.join(sorted(FILL_OPTIONS))}")
        return self.options(mode="diffusion", max_new_tokens=1, **kw)

    def infill_stream(self, prefix: str | list[int], suffix: str | list[int], *, length: int | None = None,
                      max_length: int | None = None, cancel: threading.Event | None = None,
                      **kw) -> Iterator[StreamEvent]:
        """Fill the gap between `prefix` and `suffix` (text, or token ids) by denoising masks.

        `length` fixes the number of tokens to fill (0..B); otherwise each length 1..`max_length`
        (default B - 1) is tried and the shortest whose fill confidence (geometric mean of its picks'
        confidences) reaches `threshold` wins, else the most confident. The masks see the prefix and
        the first B - length suffix tokens. Keyword options: steps, threshold, block_size,
        temperature, top_k, top_p, seed. Yields `Canvas` per step, then `Emit`, `Text`, `Done`.
        """
        from edge_dlm.decoding.infill import Span, choose_length, fill, geometric_mean

        opts = self._fill_options(kw)
        b = opts.block_size
        pre = self._fill_ids(prefix, "prefix", special=True)
        suf = self._fill_ids(suffix, "suffix", special=False)
        if not pre and not suf:
            raise UserError("infill needs a prefix or a suffix")
        if length is not None and not (isinstance(length, int) and 0 <= length <= b):
            raise UserError(f"the fill length must be in 0..{b} (the block size), got {length}")
        if max_length is not None and not (isinstance(max_length, int) and 1 <= max_length <= b):
            raise UserError(f"the maximum fill length must be in 1..{b} (the block size), got {max_length}")
        ctx = self.config.max_position_embeddings
        if len(pre) + b > ctx:
            raise UserError(f"the prefix is {len(pre)} tokens; with the {b}-token window it exceeds the "
                            f"{ctx}-token context; shorten it")
        lengths = [length] if length is not None else list(range(1, (max_length or max(b - 1, 1)) + 1))
        with self._lock:
            start = time.perf_counter()
            dec = Decoder(self.model, opts, self._new_cache(len(pre) + b))
            tried = []
            for n in lengths:
                seq, span, got = pre + [dec.mask_id] * n + suf[:b - n], Span(len(pre), len(pre) + n), {}
                for event in fill(dec, seq, [span], got):
                    yield event
                    if cancel is not None and cancel.is_set():
                        break
                tried.append((seq[span.start:span.end], span.end - span.start < n, geometric_mean(list(got.values()))))
                if cancel is not None and cancel.is_set():
                    break
            ids, cut, _ = tried[choose_length([c for *_, c in tried], opts.threshold)] if len(tried) > 1 else tried[0]
            finish = "cancelled" if cancel is not None and cancel.is_set() else ("stop" if cut else "length")
            yield from self._fill_done(dec, pre, ids, self.tokenizer.decode(ids), "infill", finish, start, len(ids))

    def infill(self, prefix: str | list[int], suffix: str | list[int], **kw) -> Result:
        """`infill_stream` run to completion; `Result.text` is the fill."""
        return _last(self.infill_stream(prefix, suffix, **kw))

    def edit_stream(self, text: str, spans: list[tuple[int, int]], *, cancel: threading.Event | None = None,
                    **kw) -> Iterator[StreamEvent]:
        """Re-mask the character `spans` [start, end) of `text` and denoise them with their context in view.

        A span covers the whole tokens it touches and keeps their count (an EOS ends it early); each
        must fit the block window (B tokens). Everything outside the spans is kept byte for byte.
        `Result.text` is the edited text. Keyword options as for `infill_stream`.
        """
        from edge_dlm.decoding.infill import Span, edited_text, fill, token_spans

        opts = self._fill_options(kw)
        if not isinstance(text, str) or not text.strip():
            raise UserError("the text to edit is empty")
        ids, offsets = self.tokenizer.encode_offsets(text)
        tok_spans = token_spans(text, spans, offsets, opts.block_size)
        if len(ids) > self.config.max_position_embeddings:
            raise UserError(f"the text is {len(ids)} tokens; the model context is {self.config.max_position_embeddings}")
        with self._lock:
            start = time.perf_counter()
            dec = Decoder(self.model, opts, self._new_cache(len(ids)))
            seq = list(ids)
            work = [Span(a, b) for a, b, _, _ in tok_spans]
            for a, b, _, _ in tok_spans:
                seq[a:b] = [dec.mask_id] * (b - a)
            for event in fill(dec, seq, work):
                yield event
                if cancel is not None and cancel.is_set():
                    break
            edited = edited_text(text, offsets, tok_spans, [self.tokenizer.decode(
                [t for t in seq[sp.start:sp.end] if t != dec.mask_id]) for sp in work])
            finish = "cancelled" if cancel is not None and cancel.is_set() else "stop"
            yield from self._fill_done(dec, ids, seq, edited, "edit", finish, start, sum(s.end - s.start for s in work))

    def edit(self, text: str, spans: list[tuple[int, int]], **kw) -> Result:
        """`edit_stream` run to completion; `Result.text` is the edited text."""
        return _last(self.edit_stream(text, spans, **kw))

    def _fill_ids(self, value: str | list[int], what: str, special: bool) -> list[int]:
        if isinstance(value, list):
            bad = [t for t in value if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
            if bad:
                raise UserError(f"the {what} holds an invalid token id {bad[0]!r}")
            return list(value)
        if not isinstance(value, str):
            raise UserError(f"the {what} must be text or token ids")
        return self.tokenizer.encode(value, add_special_tokens=special) if value else []

    def _fill_done(self, dec: Decoder, prompt_ids: list[int], ids: list[int], text: str, mode: str,
                   finish: str, start: float, n: int) -> Iterator[StreamEvent]:
        """The closing events of infill/edit; `n` tokens were filled."""
        yield Emit([t for t in ids if t != dec.mask_id], dec.nfe)
        if text:
            yield Text(text)
        elapsed = time.perf_counter() - start
        yield Done(Result(text=text, prompt_ids=prompt_ids, output_ids=ids, finish_reason=finish, mode=mode,
                          nfe=dec.nfe, tpf=n / dec.nfe if dec.nfe else 0.0, elapsed_s=elapsed,
                          tokens_per_s=n / elapsed if elapsed > 0 else 0.0))

    def generate(self, prompt: str | list[Message] | list[int], **kw) -> Result:
        """Run one request to completion; see `stream` for the arguments."""
        result = None
        for event in self.stream(prompt, **kw):
            if isinstance(event, Done):
                result = event.result
        assert result is not None
        return result


def _last(events: Iterator[StreamEvent]) -> Result:
    result = None
    for event in events:
        if isinstance(event, Done):
            result = event.result
    assert result is not None
    return result


def load(model: str | Path | None = None, *, device: str = "auto", dtype: str | None = None,
         engine: str = "auto", quant: str | None = None, group_size: int = 64, calibrate: bool = False,
         lora: bool = True, kernels: str = "auto", name: str | None = None, threads: int | None = None,
         compile: str = "auto", tokens: int | None = None) -> Runtime:  # noqa: A002 (the flag's name)
    """Load a model (default: the bundled demo model) into a `Runtime`: a checkpoint or artifact directory,
    or a Hugging Face name `ORG/NAME[@REVISION]` (from the cache, fetched first when online). `name` is
    what titles and the server call it (default: `ORG/NAME` for a Hub snapshot, else the directory's name).

    `quant` quantizes the weights on load: "int8" / "int4" (group-wise, `group_size`), "nf4" or
    "llm-int8" (bitsandbytes); `calibrate` first rescales and clips int8 / int4 weights on the bundled
    prompts (edge_dlm.model.awq). A quantized artifact from `edge-dlm export` loads as it is.
    `kernels`: edge-dlm's own kernels (default $EDGE_DLM_KERNELS, else auto): the C matmuls and attention
    on a CPU, the Triton kernels on CUDA; "auto" uses them where they run, "on" insists (a one-line
    error where they cannot; on a CPU with TRITON_INTERPRET=1 it also interprets the Triton ones), "off"
    runs the references.
    `threads`: torch's CPU threads (process-wide; default $EDGE_DLM_THREADS, else half the CPUs:
    `edge_dlm.primitives.machine.default_threads` says why).
    `compile`: run the torch engine's passes as compiled step functions (`edge_dlm.model.compiled`):
    "on", "off", or "auto" (on where this machine already compiled them and measured them faster:
    `edge-dlm calibrate` does it once; never a cold compile before a first answer). Compiled step
    functions are kept per model and machine (`compiled_store`): a new process loads them.
    `tokens`: with "auto", the tokens a one-shot process will decode (the `generate` command): it
    compiles only where calibration measured the start-up of a compiled process paying back within them.
    """
    from edge_dlm import engines
    from edge_dlm.model.weights import check_dir

    spec = None
    if calibrate and quant is None:
        raise UserError("--calibrate calibrates a quantization: add --quant int4 (or int8)")
    if quant is not None:
        from edge_dlm.model.quant import BNB_SCHEMES, QuantSpec, require_bnb

        spec = QuantSpec(quant, group_size=group_size, calibration="awq" if calibrate else None)
        if spec.scheme in BNB_SCHEMES:
            require_bnb()
    from edge_dlm.hub import display_name, resolve

    path = check_dir(resolve(model))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, path)
    set_threads(threads)
    engine_name = engines.select(engine, path, str(dev))
    if engine_name != "torch" and spec is not None:
        raise UserError(f"--quant quantizes torch weights on load; for {engine_name}, export a quantized "
                        "engine instead (edge-dlm export CKPT -o OUT --target onnx --quant int4)")
    from edge_dlm import kernels as kmod
    from edge_dlm.kernels import backend as kbackend

    kernels = kmod.choice(kernels)  # the flag, or $EDGE_DLM_KERNELS
    backend = kbackend.choose(dev, kernels, engine_name, compile)  # the one way kernels reach the model
    use_kernels = backend.triton
    from edge_dlm.model import compiled as cmod
    from edge_dlm.model.store import (compiled_cache, compiled_key, compiled_store, drop_old_stores,
                                               measured_faster)

    use_compile = cmod.resolve(compile, dev, engine_name, use_kernels)
    tokenizer = Tokenizer.from_dir(path)
    # int8 / int4 / nf4 quantize each weight as it loads (memory follows the quantized model); AWQ needs
    # the whole model's activations and llm-int8 is bitsandbytes' own module: those quantize it loaded
    streamed = spec is not None and not spec.calibration and spec.scheme in ("int8", "int4", "nf4")
    net = engines.module(engine_name).open(path, dev, dt, lora=lora, **({"quantize": spec} if streamed else {}))
    if spec is not None and not streamed:
        from edge_dlm.model.quantize import quantize_model

        if net.config.quantization:
            raise UserError(f"{path} is already quantized ({net.config.quantization.get('scheme')}); "
                            "drop --quant, or quantize the full-precision checkpoint")
        quantize_model(net, spec, tokenizer)
    if tokenizer.max_id >= net.config.vocab_size:
        raise CheckpointError(f"tokenizer has token ids up to {tokenizer.max_id} but the model only "
                              f"{net.config.vocab_size} embedding rows; the tokenizer does not belong to this model")
    cpu_kernels = backend.apply(net)  # its layers rebuilt for the backend (C matmuls: their layouts now)
    dt = getattr(net, "dtype", dt)  # exported engines run in the dtype they were built with
    rt = Runtime(net, tokenizer, path, dev, dt, kernels=use_kernels, engine=engine_name,
                 quant=spec.scheme if spec is not None else None, name=name or display_name(path))
    rt.cpu_kernels = cpu_kernels
    if use_compile or (compile == "auto" and engine_name == "torch" and not use_kernels
                       and measured_faster(compiled_cache(), compiled_key(rt), tokens)):
        # no request waits for a compile: shapes kept in the store load, new ones compile between requests
        store = compiled_store(rt)
        drop_old_stores(store)
        cmod.enable(net, compiled_cache(), background=True, store=store)
    return rt
