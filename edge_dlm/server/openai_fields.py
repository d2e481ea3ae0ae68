"""OpenAI's response fields made from the core's results: the finish reason, tool calls, logprobs and usage
(the Ollama route's are `ollama`)."""

from __future__ import annotations

import threading
import uuid

def finish(result, timed_out: threading.Event | None = None) -> str:
    if result is None:
        return "error"
    if result.finish_reason == "cancelled" and timed_out is not None and timed_out.is_set():
        return "timeout"
    return result.finish_reason


def tool_calls(result) -> list[dict]:
    """A result's calls in OpenAI's shape."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in result.tool_calls or []]


def logprobs_json(tokenizer, infos: list[dict], chat: bool) -> dict:
    """The core's logprobs (`Result.logprobs`) in OpenAI's chat or completions shape."""
    def piece(i: int) -> str:
        return tokenizer.decode([i], skip_special_tokens=False)

    if chat:
        return {"content": [{"token": piece(d["id"]), "logprob": d["logprob"], "bytes": list(piece(d["id"]).encode()),
                             "top_logprobs": [{"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode())}
                                              for t, lp in d["top"]]} for d in infos], "refusal": None}
    offsets, at = [], 0
    for d in infos:
        offsets.append(at)
        at += len(piece(d["id"]))
    return {"tokens": [piece(d["id"]) for d in infos], "token_logprobs": [d["logprob"] for d in infos],
            "top_logprobs": [{piece(t): lp for t, lp in d["top"]} for d in infos], "text_offset": offsets}


def usage(results, reading=None) -> dict:
    """OpenAI's usage fields, edge-dlm's pass counts, and `joules` where a meter measured the request
    (`results`: one result, or the request's choices')."""
    results = [r for r in (results if isinstance(results, list) else [results]) if r is not None]
    if not results:
        return {}
    result = results[0]
    completion = sum(len(r.output_ids) for r in results)
    out = {"prompt_tokens": len(result.prompt_ids), "completion_tokens": completion,
           "total_tokens": len(result.prompt_ids) + completion, "nfe": sum(r.nfe for r in results),
           "tpf": round(result.tpf, 3), "tokens_per_s": round(result.tokens_per_s, 1)}
    if result.mean_accepted is not None:
        out["mean_accepted"] = round(result.mean_accepted, 3)
    if reading is not None and reading.joules is not None:
        out["joules"] = round(reading.joules, 4)
    return out
