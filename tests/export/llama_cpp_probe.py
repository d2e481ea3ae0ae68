"""Run by tests/export/test_llama_cpp.py in a child process (llama.cpp aborts the process on an assert,
and its log goes to stderr): reads a JSON request on stdin, answers JSON on stdout.

    {"gguf": PATH, "texts": [...]}                       -> {"ids": [[...], ...]}
    {"gguf": PATH, "chats": [[messages], ...]}           -> {"jinja": [prompt, ...], "jinja_ids": [[...], ...]}
    {"gguf": PATH, "logits": [ids]}                      -> {"logits": [[...], ...]}
    {"gguf": PATH, "greedy": [[ids], ...], "n": N}       -> {"greedy": [[...], ...]}
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main() -> None:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    req = json.load(sys.stdin)
    out: dict = {}
    if "texts" in req or "chats" in req:
        llm = Llama(model_path=req["gguf"], vocab_only=True, verbose=False)
        if "texts" in req:
            out["ids"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in req["texts"]]
        if "chats" in req:
            meta = llm.metadata
            vocab = lambda key: llm.detokenize([int(meta[key])], special=True).decode() if key in meta else ""  # noqa: E731
            fmt = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=vocab("tokenizer.ggml.eos_token_id"),
                                      bos_token=vocab("tokenizer.ggml.bos_token_id"))
            out["jinja"] = [fmt(messages=c).prompt for c in req["chats"]]
            out["jinja_ids"] = [llm.tokenize(p.encode(), add_bos=False, special=True) for p in out["jinja"]]
    else:
        llm = Llama(model_path=req["gguf"], n_ctx=512, n_threads=1, verbose=False, logits_all=True)
        if "logits" in req:
            llm.eval(req["logits"])
            out["logits"] = np.asarray(llm.scores[:len(req["logits"])]).tolist()
        if "greedy" in req:
            runs = []
            for ids in req["greedy"]:
                llm.reset()
                toks = []
                for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                    toks.append(int(t))
                    if len(toks) == req["n"]:
                        break
                runs.append(toks)
            out["greedy"] = runs
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
