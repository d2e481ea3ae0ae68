"""Every command block of the README and of every docs/ page runs as written, from the repository root,
and no link leaves the repository; the README stays a front page that links every docs page. A command that cannot run on a CPU machine without a network says so itself with a
`# needs: ...` comment and is skipped (the reason is checked, not invented here); a server started with
`&` and a `# server` comment runs in the background for the rest of its block. Each command is bounded."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI = ROOT / ".venv" / "bin" / "edge-dlm"
TIMEOUT = 300  # seconds for one command (the default bench takes ~40 s on the CI machine)


def blocks(lang: str) -> list[list[str]]:
    """The ```lang blocks of the README and the docs pages, each as its logical lines (backslash
    continuations joined)."""
    out = []
    text = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    for body in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S):
        lines, cur = [], ""
        for line in body.splitlines():
            if line.rstrip().endswith("\\") and not line.lstrip().startswith("#"):
                cur += line.rstrip()[:-1] + " "
                continue
            lines.append(cur + line)
            cur = ""
        out.append([ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")])
    return out


def comment(line: str) -> str:
    """The trailing `# ...` comment of a shell line (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and (quote is None or quote == ch) and (i == 0 or line[i - 1] != "\\"):
            quote = None if quote == ch else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[i + 1:].strip()
    return ""


def port_of(line: str) -> int:
    m = re.search(r"--port (\d+)", line)
    return int(m.group(1)) if m else 8000


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 180) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the server did not listen on {port} within {seconds} s")


def test_no_link_leaves_the_repository():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text, page.name
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert ROOT in path.parents or path == ROOT, f"{page.name}: {target} points outside the repository"
            assert path.exists(), f"{page.name}: {target} does not exist"


def test_the_readme_is_a_front_page():
    """About 150 lines, and every docs page is one link away."""
    assert len(README.splitlines()) <= 160
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in README, f"README does not link docs/{page.name}"


def test_every_skip_says_why():
    for block in blocks("bash"):
        for line in block:
            note = comment(line)
            if "needs:" in note:
                assert len(note.split("needs:", 1)[1].strip()) > 3, line


@pytest.mark.slow
@pytest.mark.skipif(not CLI.exists(), reason="needs the .venv CLI (make test builds it)")
def test_every_command_block_runs_as_written(tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "PYTHONDONTWRITEBYTECODE": "1"}
    had_exports = (ROOT / "exports").exists()
    (ROOT / "exports").mkdir(exist_ok=True)
    ran, skipped = [], []
    try:
        for block in blocks("bash"):
            servers = []
            try:
                for line in block:
                    note = comment(line)
                    if "needs:" in note:
                        skipped.append(line)
                        continue
                    if line.split()[0] == "curl" and shutil.which("curl") is None:
                        skipped.append(line)
                        continue
                    command = line.split(" #")[0].strip() if note else line.strip()
                    if note.startswith("server"):
                        assert command.endswith("&"), line
                        proc = subprocess.Popen(["bash", "-c", command[:-1]], cwd=ROOT, env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                        servers.append(proc)
                        wait_for_port(port_of(command), proc)
                        ran.append(line)
                        continue
                    p = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                                       text=True, timeout=TIMEOUT)
                    assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
                    assert "Traceback" not in p.stderr, f"{command}\n{p.stderr[-2000:]}"
                    ran.append(line)
            finally:
                for proc in servers:
                    proc.terminate()
                    proc.wait(timeout=60)
    finally:
        if not had_exports:
            shutil.rmtree(ROOT / "exports", ignore_errors=True)
    assert len(ran) >= 30 and len(skipped) <= 24, (len(ran), skipped)  # most of it runs here


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_every_python_block_runs(i, tmp_path):
    """A block that talks to a server on 127.0.0.1:PORT (a client example) gets `edge-dlm serve --port PORT`
    running beside it, as its page says to start first."""
    code = "\n".join(blocks("python")[i])
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    server = None
    m = re.search(r"127\.0\.0\.1:(\d+)", code)
    if m:
        if not CLI.exists():
            pytest.skip("needs the .venv CLI to start the server the example talks to (make test builds it)")
        server = subprocess.Popen([str(CLI), "serve", "--port", m.group(1)], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(int(m.group(1)), server)
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                           env=env)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]


def test_every_measured_number_in_the_docs_is_recorded():
    """A measured number the README or a docs page quotes (a decimal with a unit: x, ms, us, tok/s, GB/s,
    %, or the start of a range) appears in BENCHMARKS.md or a bench_results/ file, where the machine and
    the command that measured it are written; a number nobody recorded fails here."""
    record = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8") + "".join(
        p.read_text(encoding="utf-8") for p in sorted((ROOT / "bench_results").glob("*.json")))
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        quoted = re.findall(r"(?<![\w.\-/])(\d+\.\d+)(?=\s?(?:x\b|ms\b|us\b|tok/s|GB/s|%|-\d))", text)
        missing = sorted({n for n in quoted if n not in record})
        assert not missing, f"{page.name} quotes {missing} that no recorded run holds"


# results recorded before the scripts shared `scripts/benchlib.py`, which say their command and machine in
# BENCHMARKS.md instead (rerunning them would change the numbers the docs quote)
LEGACY_RESULTS = {"compiled_start.json"}


def test_every_recorded_result_says_where_it_came_from():
    """Each bench_results/ file is one run recorded by `benchlib.record`: its commit, machine and command
    beside the numbers; and the scripts that record results go through it (one timing loop, one way
    to write)."""
    import json

    for path in sorted((ROOT / "bench_results").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if path.name in LEGACY_RESULTS:
            assert f"bench_results/{path.name}" in (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
            continue
        assert isinstance(data, dict) and all(data.get(k) for k in ("commit", "machine", "command")), path.name
    for script in sorted((ROOT / "scripts").glob("*.py")):
        text = script.read_text(encoding="utf-8")
        if "json.dumps" in text and "write_text" in text and not script.name.startswith(("train_", "eval_demo")):
            assert "from benchlib import" in text, f"{script.name} writes results without benchlib.record"
