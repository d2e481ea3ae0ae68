"""Hostile input by class (#27): each case is one line on stderr and exit 2 from the CLI, or a 4xx JSON
error from the server — never a traceback, a hang or a 5xx. The cases are new ones in the spirit of each
class; the places they exercise are the shared entries (primitives.inputs, the config's typed fields,
the sampling ranges, the chat-template sandbox, the server's request reader)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import raw
import torch

import edge_dlm
from edge_dlm.cli import main
from edge_dlm.primitives.errors import UserError
from edge_dlm.primitives.tokenizer import Tokenizer
from edge_dlm.server.app import ServeOptions, build_server

EXE = [sys.executable, "-m", "edge_dlm.cli"]


def one_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def gen(capsys, ckpt, *extra: str, prompt: str = "hi") -> tuple[int, str]:
    code = main(["generate", "--model", str(ckpt), "--prompt", prompt, "--max-new-tokens", "4", "--mode", "ar",
                 *extra])
    return code, capsys.readouterr().err


def sub(*args, stdin: bytes | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], input=stdin, capture_output=True, timeout=timeout, **kw)


@pytest.fixture()
def ckpt(tiny_ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    path.write_text(json.dumps(fn(d) if fn(d) is not None else d))


# ---- text that is not valid Unicode -------------------------------------------------------------

@pytest.mark.parametrize("text", ["\udcff", "ok \ud800 then", "\udfff" * 3])
def test_lone_surrogates_in_a_prompt(capsys, tiny_ckpt, text):
    one_line(*gen(capsys, tiny_ckpt, prompt=text), "not valid Unicode")


def test_invalid_utf8_in_argv_stdin_and_files(tiny_ckpt, tmp_path):
    p = sub("generate", "--model", str(tiny_ckpt), "--prompt", b"caf\xe9 \xff", "--max-new-tokens", "2", "--raw")
    one_line(p.returncode, p.stderr.decode(), "not valid Unicode")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"def f():\n  \xc3\x28 return 1\n")
    p = sub("generate", "--model", str(tiny_ckpt), "--prompt-file", str(bad), "--max-new-tokens", "2")
    one_line(p.returncode, p.stderr.decode(), "not UTF-8")
    p = sub("edit", "--model", str(tiny_ckpt), "--file", str(bad), "--span", "0:3")
    one_line(p.returncode, p.stderr.decode(), "not UTF-8")
    p = sub("chat", "--plain", "--model", str(tiny_ckpt), "--mode", "ar", "--max-new-tokens", "2",
            stdin=b"\xfe\xff\n/quit\n")
    assert p.returncode == 0 and b"Traceback" not in p.stderr and b"not valid Unicode" in p.stderr, p.stderr


# ---- numbers at the edges of their type ----------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--temperature", "inf"], "--temperature must be a number"),
    (["--temperature", "nan"], "--temperature must be a number"),
    (["--temperature", "1e300"], "--temperature must be a number"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--seed", str(2 ** 64)], "--seed must be an integer in 0..2**64-1"),
    (["--seed", "-1"], "--seed"),
    (["--block-size", str(10 ** 9)], "larger than the model's"),
    (["--steps", str(2 ** 63)], "--steps must be in 1.."),
    (["--threshold", "nan"], "--threshold"),
])
def test_numbers_out_of_range(capsys, tiny_ckpt, args, needle):
    one_line(*gen(capsys, tiny_ckpt, "--temperature", "0.5", *args) if "--temperature" not in args
             else gen(capsys, tiny_ckpt, *args), needle)


@pytest.mark.parametrize("temperature", ["1e-30", "1e-300", "5e-324", "100"])
def test_extreme_but_valid_temperatures_sample_finite_tokens(capsys, tiny_ckpt, temperature):
    code = main(["generate", "--model", str(tiny_ckpt), "--prompt", "hi", "--max-new-tokens", "6", "--mode",
                 "linear-spec", "--temperature", temperature, "--top-p", "1e-300", "--seed", str(2 ** 64 - 1),
                 "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert len(json.loads(out.out)["output_ids"]) >= 1


def test_power_budget_is_checked_before_any_calibration(capsys, ckpt):
    code = main(["generate", "--model", str(ckpt), "--prompt", "hi", "--power-budget", "-5"])
    err = capsys.readouterr().err
    one_line(code, err, "--power-budget must be a positive number")
    assert "calibrating" not in err


# ---- files that are not regular files ------------------------------------------------------------

def test_prompt_files_that_are_not_regular_files(tiny_ckpt, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for path, needle in [(fifo, "is a FIFO"), ("/dev/zero", "is a device"), (tmp_path, "is a directory"),
                         (loop, "symlink loop"), (tmp_path / "missing", "no such file")]:
        p = sub("generate", "--model", str(tiny_ckpt), "--prompt-file", str(path), timeout=30)
        one_line(p.returncode, p.stderr.decode(), needle)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "dir", "loop"])
def test_checkpoint_files_that_are_not_regular_files(ckpt, name, kind):
    f = ckpt / name
    f.unlink()
    if kind == "fifo":
        os.mkfifo(f)
    elif kind == "dir":
        f.mkdir()
    else:
        f.symlink_to(f)
    p = sub("generate", "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2", timeout=30)
    one_line(p.returncode, p.stderr.decode(), name)


def test_output_path_checked_before_the_model_loads(capsys, tiny_ckpt, tmp_path):
    for out, needle in [(tmp_path / "nope" / "x.md", "does not exist"), (tmp_path, "is a directory"),
                        ("/dev/null", "not a regular file")]:
        code = main(["edit", "--model", str(tiny_ckpt), "--text", "hello world", "--span", "0:5", "-o", str(out)])
        one_line(code, capsys.readouterr().err, needle)


# ---- JSON that parses but is not the expected shape ----------------------------------------------

@pytest.mark.parametrize("mutate, needle", [
    (lambda d: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (lambda d: json.dumps([d]), "must hold a JSON object"),
    (lambda d: json.dumps({**d, "rope_parameters": "yarn"}), "rope_parameters must be an object"),
    (lambda d: json.dumps({**d, "rope_parameters": {**d["rope_parameters"], "factor": "2"}}), "factor must be"),
    (lambda d: json.dumps({**d, "rope_parameters": {**d["rope_parameters"], "beta_fast": []}}), "beta_fast"),
    (lambda d: json.dumps({**d, "hidden_size": str(d["hidden_size"])}), "hidden_size must be a positive"),
    (lambda d: json.dumps({**d, "rms_norm_eps": float("nan")}), "rms_norm_eps must be a finite number"),
    (lambda d: json.dumps({**d, "rms_norm_eps": float("inf")}), "rms_norm_eps"),
    (lambda d: json.dumps({**d, "tie_word_embeddings": "no"}), "tie_word_embeddings must be true or false"),
    (lambda d: json.dumps({**d, "quantization": [1, 2]}), "quantization must be an object"),
    (lambda d: json.dumps({**d, "vocab_size": 7}).replace('"vocab_size": 7', '"vocab_size": ' + "9" * 5000),
     "not valid JSON"),
    (lambda d: json.dumps({**d, "num_hidden_layers": 10 ** 9}), "more than this device's"),
    (lambda d: json.dumps({**d, "hidden_size": 1 << 30, "head_dim": 64}), "more than this device's"),
])
def test_config_of_the_wrong_shape(capsys, ckpt, mutate, needle):
    cfg = ckpt / "config.json"
    cfg.write_text(mutate(json.loads(cfg.read_text())))
    for mode in ("ar", "auto"):
        code = main(["generate", "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2", "--mode", mode])
        one_line(code, capsys.readouterr().err, needle)


@pytest.mark.parametrize("content, needle", [
    ("[1, 2]", "must hold a JSON object"),
    ('{"chat_template": 7}', "chat_template must be a string"),
    ('{"chat_template": "{{ bos_token }}", "bos_token": ["<s>"]}', "bos_token must be a string"),
    ('{"a": ' * 50_000 + '1' + '}' * 50_000, "nested too deeply"),
])
def test_tokenizer_config_of_the_wrong_shape(capsys, ckpt, content, needle):
    (ckpt / "tokenizer_config.json").write_text(content)
    one_line(*gen(capsys, ckpt), needle)


# ---- LoRA adapters -------------------------------------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": "8"}, "r must be a positive integer"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ({"use_rslora": "yes"}, "use_rslora"),
])
def test_adapter_configs(capsys, ckpt, change, needle):
    f = ckpt / "linear_spec_lora" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **change}))
    one_line(*gen(capsys, ckpt), needle)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "float64"])
def test_adapter_tensors_in_other_float_types(capsys, ckpt, dtype):
    from safetensors.torch import load_file, save_file

    f = ckpt / "linear_spec_lora" / "adapter_model.safetensors"
    save_file({k: v.to(getattr(torch, dtype)) for k, v in load_file(f).items()}, str(f))
    one_line(*gen(capsys, ckpt), "a LoRA drafter is floating point")


# ---- the tokenizer and the model disagreeing ------------------------------------------------------

def test_tokenizer_with_ids_beyond_the_embedding(capsys, ckpt):
    f = ckpt / "tokenizer.json"
    tok = json.loads(f.read_text())
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    tok.setdefault("added_tokens", []).append({"id": vocab + 1000, "content": "<far>", "single_word": False,
                                               "lstrip": False, "rstrip": False, "normalized": False,
                                               "special": True})
    f.write_text(json.dumps(tok))
    one_line(*gen(capsys, ckpt), "the tokenizer does not belong to this model")


# ---- chat templates --------------------------------------------------------------------------------

@pytest.mark.parametrize("template, needle", [
    ("{% for m in messages %}{% endfor %}", "rendered an empty prompt"),
    ("{{ '' }}{% if false %}x{% endif %}", "rendered an empty prompt"),
    ("{{ 'x'.rjust(2000000000) }}", "oversized width or count"),
    ("{{ 'x'.zfill(2000000000) }}", "oversized width or count"),
    ("{{ '%999999999d' % 1 }}", "oversized width"),
    ("{{ '%-*s' % (999999999, 'x') }}", "oversized width"),
    ("{{ '{:^999999999}'.format('x') }}", "oversized width"),
    ("{{ '{0:{1}}'.format('x', 999999999) }}", "oversized width or count"),
    ("{{ ('ab' * 30000).replace('a', 'b' * 30000) }}", "oversized string"),
    ("{{ messages[0].content | wordwrap(1) }}", "failed to render"),
    ("{{ messages[0].content | urlize }}", "failed to render"),
    ("{{ raise_exception('E' * 60000) }}", "chat template: EEE"),
    ("{{ ((messages|string) * 5000) | truncate(10) }}", "oversized"),
])
def test_chat_templates_are_bounded_per_call(ckpt, template, needle):
    tok = Tokenizer.from_dir(ckpt)
    tok.chat_template = template
    with pytest.raises(UserError) as err:
        tok.encode_prompt("hello")
    assert needle in str(err.value) and len(str(err.value)) < 400, str(err.value)[:400]


# ---- permissions ---------------------------------------------------------------------------------

SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(SETPRIV is None or os.geteuid() != 0, reason="needs setpriv and root (drops root's override)")
@pytest.mark.parametrize("target", ["config.json", "tokenizer.json", "model.safetensors", ".",
                                    "linear_spec_lora/adapter_model.safetensors"])
def test_unreadable_files_without_roots_override(ckpt, target):
    f = ckpt / target
    mode = f.stat().st_mode
    f.chmod(0)
    try:
        p = subprocess.run([SETPRIV, "--inh-caps=-all", "--bounding-set=-all", *EXE, "generate", "--model",
                            str(ckpt), "--prompt", "hi", "--max-new-tokens", "2", "--mode", "ar"],
                           capture_output=True, text=True, timeout=60)
    finally:
        f.chmod(mode)
    one_line(p.returncode, p.stderr, "permission denied")


# ---- weights that overflow -------------------------------------------------------------------------

def test_finite_weights_that_overflow_are_refused_not_nan(capsys, ckpt):
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    t = load_file(f)
    t["encoder.norm.weight"] = torch.full_like(t["encoder.norm.weight"], 3e38)
    save_file(t, str(f))
    one_line(*gen(capsys, ckpt), "NaN or infinite logits")


# ---- interrupted writes ------------------------------------------------------------------------------

def test_interrupted_force_swap_and_stale_temporaries_are_tidied(tmp_path):
    from edge_dlm.primitives.fsutil import atomic_dir

    out = tmp_path / "art"
    with atomic_dir(out) as t:
        (t / "v1").write_text("1")
    # what `kill -9` leaves: the old artifact moved aside mid-swap, and a temporary of a dead process
    dead = 2 ** 22 + 12345
    out.rename(tmp_path / f".art.old-{dead}")
    (tmp_path / f".art.tmp-{dead}-x1").mkdir()
    with pytest.raises(UserError, match="already exists"):  # the old artifact is back in place first
        with atomic_dir(out):
            pass
    assert (out / "v1").exists() and sorted(os.listdir(tmp_path)) == ["art"]
    with atomic_dir(out, force=True) as t:
        (t / "v2").write_text("2")
    assert sorted(os.listdir(out)) == ["v2"] and sorted(os.listdir(tmp_path)) == ["art"]


def test_a_kill_during_an_export_leaves_the_output_complete_or_absent(tiny_ckpt, tmp_path):
    import signal
    import time

    out = tmp_path / "q"
    for delay in (0.5, 1.5, 3.0):
        p = subprocess.Popen([*EXE, "export", str(tiny_ckpt), "-o", str(out), "--quant", "int4", "--group-size",
                              "32", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not out.exists() or (out / "manifest.json").exists()
    assert main(["export", str(tiny_ckpt), "-o", str(out), "--quant", "int4", "--group-size", "32", "--force"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no hidden temporaries left beside it


# ---- the server -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_ckpt):
    rt = edge_dlm.load(tiny_ckpt, device="cpu")
    srv = build_server(rt, "127.0.0.1", 0, ServeOptions(default_mode="ar", io_timeout=5))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.stop()
    srv.server_close()


def post(body: bytes, headers: str = "", path: str = "/v1/chat/completions", method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}"
    if "Content-Length" not in headers:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode("latin-1") + b"\r\n" + body


def status(resp: bytes) -> int:
    assert resp.startswith(b"HTTP/1."), resp[:200]
    return int(resp.split(b" ", 2)[1])


def body_of(resp: bytes) -> dict:
    return json.loads(resp.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize("request_bytes, code", [
    (post(b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'), 400),
    (post(b'{"prompt": "x\\udfff", "max_tokens": 2}', path="/v1/completions"), 400),
    (post(b'{"messages": [], "max_tokens": 1' + b"0" * 5000 + b"}"), 400),
    (post(b'[1, 2, 3]'), 400),
    (post(b'"a string"'), 400),
    (post(b'{"messages": "hi"}'), 400),
    (post(b"{}", headers="Content-Length: \xd9\xa2\r\n"), 400),
    (post(b"{}", headers="Content-Length: \xc2\xb2\r\n"), 400),
    (post(b"{}", headers="Content-Length: 2\r\nContent-Length: 2\r\n"), 400),
    (post(b"", method="HEAD", path="/v1/nowhere"), 404),
    (post(b"", method="OPTIONS", headers="Origin: https://evil.example\r\n"), 403),
    (post(b"", method="BREW"), 405),
    (post(b"{}", method="POST", headers="Transfer-Encoding: gzip\r\n"), 400),
    (post(b"5\r\n{}\r\n0\r\n\r\n", method="POST", headers="Transfer-Encoding: chunked\r\n"), 400),
    (post(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e308, "max_tokens": 2}'), 400),
    (post(b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 30 + b', "max_tokens": 2}'), 400),
])
def test_server_answers_hostile_requests_with_a_4xx_json_error(server, request_bytes, code):
    resp = raw(server.server_port, request_bytes)
    assert status(resp) == code, resp[:300]
    if b"HEAD " not in request_bytes[:5]:
        assert "error" in body_of(resp)


def test_server_fuzz_invalid_unicode_headers_and_shapes(server):
    rng = random.Random(27)
    pieces = [b'"\\ud800"', b'"\\udfff\\ud800"', b'"caf\xe9"', b"\xff\xfe", b"[]", b"{}", b"null", b"1e999",
              b"-0", b"9" * 5000, b'"' + b"x" * 100 + b'"', b'{"role": 5}', b'[{"role": "user"}]', b"true"]
    fields = ["messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "mode", "steps", "stream",
              "suffix", "n", "stop"]
    header_noise = ["", "Content-Length: 5\r\n", "Content-Length: -1\r\n", "Content-Length: 0x10\r\n",
                    "Transfer-Encoding: chunked\r\n", "Content-Type: text/plain\r\n", "X-\xff: \xfe\r\n",
                    "Content-Length: 99999999999999999999999\r\n", "Authorization: Bearer \xff\r\n"]
    codes = []
    for _ in range(300):
        body = b"{" + b", ".join(b'"' + rng.choice(fields).encode() + b'": ' + rng.choice(pieces)
                                 for _ in range(rng.randint(0, 4))) + b"}"
        if rng.random() < 0.2:
            body = rng.choice(pieces)
        path = rng.choice(list(["/v1/chat/completions", "/v1/completions", "/v1/edits", "/v1/models"]))
        req = post(body, headers=rng.choice(header_noise), path=path, method=rng.choice(["POST", "POST", "GET", "PUT"]))
        resp = raw(server.server_port, req)
        assert resp, req[:200]  # every connection gets an answer
        codes.append(status(resp))
    assert not [c for c in codes if c >= 500], codes
    assert status(raw(server.server_port, post(b"", method="GET", path="/v1/models"))) == 200  # alive


def test_cli_entry_points_with_random_argv_and_stdin(tiny_ckpt):
    rng = random.Random(2711)
    words = [b"--prompt", b"--temperature", b"--top-p", b"--seed", b"--steps", b"--block-size", b"--mode",
             b"--max-new-tokens", b"--threshold", b"--prompt-file", b"/dev/zero", b"-o", b"--span", b"nan", b"inf",
             b"-1", b"1e309", b"\xff\xfe", b"\xed\xa0\x80", b"99999999999999999999999", b"0:99", b"auto",
             b"--power-budget", b"--json"]
    for i in range(24):
        cmd = rng.choice([b"generate", b"infill", b"edit", b"chat", b"calibrate"])
        argv = [cmd, b"--model", str(tiny_ckpt).encode()] + [rng.choice(words) for _ in range(rng.randint(1, 5))]
        if cmd == b"chat":
            argv.append(b"--plain")
        stdin = bytes(rng.randrange(256) for _ in range(40)) + b"\n/quit\n"
        p = subprocess.run([*[a.encode() for a in EXE], *argv], input=stdin, capture_output=True, timeout=120)
        assert p.returncode in (0, 2), (argv, p.stderr[-800:])
        assert b"Traceback" not in p.stderr, (argv, p.stderr[-800:])


def test_a_body_no_route_reads_is_read_before_the_answer(server):
    """A 404, a GET or an unknown method with a body: the server reads it first, so closing the connection
    never resets an answer the client has not read yet."""
    body = b'{"seed": ' + b"9" * 20000 + b"}"
    for _ in range(30):
        for method, path, code in (("GET", "/v1/chat/completions", 404), ("BREW", "/v1/models", 405),
                                   ("POST", "/nowhere", 404)):
            resp = raw(server.server_port, post(body, method=method, path=path))
            assert resp and status(resp) == code, (method, path, resp[:80])
