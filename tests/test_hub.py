"""Models by name (issue #18): a fake Hugging Face cache built here, in the real layout, used offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

import edge_dlm  # noqa: E402
from edge_dlm import hub  # noqa: E402
from edge_dlm.cli import main  # noqa: E402

OPENED: list[str] | None = None


def _audit(event, args):
    if OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # records only while OPENED is a list

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
TRAPS = {"modeling_nld.py": b"raise SystemExit('remote code ran')\n", "pytorch_model.bin": b"\x80\x04pickle"}


def add_snapshot(cache: Path, repo: str, src: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """`models--ORG--NAME/{blobs,snapshots/COMMIT,refs}` as huggingface_hub writes it: snapshot files are
    symlinks into blobs/ named by their content hash."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    files = {str(f.relative_to(src)): f.read_bytes() for f in src.rglob("*") if f.is_file()} | TRAPS
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture()
def cache(tmp_path, tiny_ckpt, monkeypatch):
    c = tmp_path / "hf"
    add_snapshot(c, "org/tiny", tiny_ckpt, COMMIT_A, refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return c


def gen(model: str, capsys) -> dict:
    assert main(["generate", "--model", model, "--device", "cpu", "--prompt", "hello", "--mode", "ar", "--json",
                 "--max-new-tokens", "6"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_names_parse():
    assert hub.parse_name("nvidia/Nemotron-Labs-Diffusion-8B") == ("nvidia/Nemotron-Labs-Diffusion-8B", None)
    assert hub.parse_name("org/m.v2@refs/pr/3") == ("org/m.v2", "refs/pr/3")
    for not_a_name in ("./org/m", "/abs/path", "~/m", "a/b/c", "single", "org/"):
        assert hub.parse_name(not_a_name) is None, not_a_name


def test_generate_by_name_and_revision_offline(cache, tiny_ckpt, capsys):
    global OPENED
    want = edge_dlm.load(tiny_ckpt, device="cpu").generate("hello", mode="ar", max_new_tokens=6).output_ids
    OPENED = []
    try:
        by_name = gen("org/tiny", capsys)
    finally:
        opened, OPENED = OPENED, None
    assert by_name["output_ids"] == want
    assert not [f for f in opened if f.endswith(tuple(TRAPS))], "a .py or .bin file was opened"
    assert gen(f"org/tiny@{COMMIT_A}", capsys)["output_ids"] == want
    assert gen("org/tiny@main", capsys)["output_ids"] == want
    # a second revision under a tag: the name picks main, @v2 picks the tag
    add_snapshot(cache, "org/tiny", tiny_ckpt, COMMIT_B, refs=("v2",))
    assert gen("org/tiny@v2", capsys)["output_ids"] == want
    assert edge_dlm.load("org/tiny@v2", device="cpu").path.name == COMMIT_B
    assert edge_dlm.load("org/tiny", device="cpu").path.name == COMMIT_A
    # the 10-character revisions `list` prints are accepted, as any unique prefix
    assert edge_dlm.load(f"org/tiny@{COMMIT_B[:10]}", device="cpu").path.name == COMMIT_B
    assert edge_dlm.load(f"org/tiny@{COMMIT_A[:4]}", device="cpu").path.name == COMMIT_A
    add_snapshot(cache, "org/tiny", tiny_ckpt, "a" * 39 + "c")
    assert main(["generate", "--model", "org/tiny@aaaaaa", "--prompt", "hi"]) == 2
    assert "ambiguous" in capsys.readouterr().err


def test_a_directory_wins_over_a_name(cache, tiny_ckpt, tmp_path, monkeypatch):
    import shutil

    local = tmp_path / "org" / "tiny"
    shutil.copytree(tiny_ckpt, local)
    monkeypatch.chdir(tmp_path)
    rt = edge_dlm.load("org/tiny", device="cpu")
    assert rt.path.resolve() == local.resolve()


@pytest.mark.parametrize("name,needle", [
    ("org/absent", "org/absent is not in the Hugging Face cache"),
    ("org/tiny@v9", "org/tiny@v9 is not in the Hugging Face cache"),
])
def test_a_name_not_in_the_cache_is_one_line_offline(cache, capsys, name, needle):
    assert main(["generate", "--model", name, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "HF_HUB_OFFLINE" in err[0] and "edge-dlm pull" in err[0]


def test_hub_unreachable_is_one_line(tmp_path, tiny_ckpt):
    c = tmp_path / "hf"
    add_snapshot(c, "org/tiny", tiny_ckpt, COMMIT_A, refs=("main",))
    env = {**os.environ, "HF_HUB_CACHE": str(c), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    run = [sys.executable, "-m", "edge_dlm.cli", "generate", "--prompt", "hi", "--mode", "ar", "--device", "cpu",
           "--max-new-tokens", "2", "--model"]
    missing = subprocess.run(run + ["org/absent"], capture_output=True, text=True, env=env, timeout=120)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1, missing.stderr
    assert "not in the Hugging Face cache" in lines[0] and "cannot be reached" in lines[0]
    # a cached model still runs with the Hub down
    cached = subprocess.run(run + ["org/tiny"], capture_output=True, text=True, env=env, timeout=120)
    assert cached.returncode == 0, cached.stderr


def test_downloads_fetch_only_what_edge_dlm_reads():
    """The patterns handed to snapshot_download, through huggingface_hub's own filter."""
    from huggingface_hub.utils import filter_repo_objects

    repo = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "linear_spec_lora/adapter_config.json",
            "linear_spec_lora/adapter_model.safetensors", "modeling_nemotron.py", "configuration_nemotron.py",
            "pytorch_model.bin", "optimizer.pt", "training_args.bin", "model.onnx", "README.md", "sub/evil.py",
            "weights.pkl", "flax_model.msgpack", "model.gguf"]
    got = set(filter_repo_objects(repo, allow_patterns=hub.ALLOW, ignore_patterns=hub.NEVER))
    assert got == {"config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                   "tokenizer.json", "tokenizer_config.json", "linear_spec_lora/adapter_config.json",
                   "linear_spec_lora/adapter_model.safetensors", "model.onnx"}


def test_list_and_rm(cache, tiny_ckpt, capsys):
    add_snapshot(cache, "org/tiny", tiny_ckpt, COMMIT_B, refs=("v2",))
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted((m["name"], m["revision"]) for m in listed) == [("org/tiny", COMMIT_A), ("org/tiny", COMMIT_B)]
    assert all(m["model_type"] == "nemotron_labs_diffusion" and m["quantization"] == "none" for m in listed)
    assert {tuple(m["refs"]) for m in listed} == {("main",), ("v2",)} and all(m["bytes"] > 0 for m in listed)
    assert main(["list"]) == 0 and "org/tiny" in capsys.readouterr().out
    assert main(["rm", "org/tiny@v2"]) == 0
    capsys.readouterr()
    assert not (cache / "models--org--tiny" / "snapshots" / COMMIT_B).exists()
    assert (cache / "models--org--tiny" / "snapshots" / COMMIT_A).exists()
    assert main(["rm", "org/tiny"]) == 0
    capsys.readouterr()
    assert main(["list", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []
    assert main(["rm", "org/tiny"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err


def test_bad_names_for_pull_and_rm(cache, capsys):
    with pytest.raises(SystemExit) as e:
        main(["rm", "not-a-name"])
    assert e.value.code == 2 and "is not a model name" in capsys.readouterr().err
    assert main(["pull", "org/tiny"]) == 2 and "HF_HUB_OFFLINE" in capsys.readouterr().err
