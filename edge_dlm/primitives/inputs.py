"""Where outside data enters: files read by name, JSON documents and text, each checked once here.

Every reader of a user's or a checkpoint's file goes through `read_bytes` / `read_text` /
`read_json_object`, so the rules hold on every path:

- only regular files are read: a FIFO, a device, a socket or a directory where a file is expected is
  refused by name (a FIFO is opened non-blocking, so it never hangs), and so is a symlink loop;
- at most `limit` bytes: an endless or oversized file (`/dev/zero`, a 2 GB "config") is refused;
- OS errors name the file and say what happened (permission denied, not found, ...);
- text is UTF-8; JSON must parse without recursing past Python's limit and be an object.

Text from anywhere (argv, stdin, files, JSON strings) must be valid Unicode: `check_text` refuses lone
surrogates (what invalid UTF-8 bytes in argv become, or `"\\ud800"` in JSON) in one line, rather than
passing them on to the tokenizer, which cannot encode them.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from edge_dlm.primitives.errors import UserError

TEXT_LIMIT = 64 << 20  # bytes: prompt files, edit files
JSON_LIMIT = 64 << 20  # bytes: config.json, tokenizer_config.json, indexes, manifests (tokenizer.json is bigger)


def os_error(path: str | Path, exc: OSError, what: str = "file") -> str:
    """One line for an OS error on `path`: what it is, the path, and the reason in words."""
    reason = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.ENOENT: "no such file",
              errno.ELOOP: "a symlink loop", errno.EISDIR: "a directory, not a file",
              errno.ENOTDIR: "a path through something that is not a directory",
              errno.ENAMETOOLONG: "the name is too long"}.get(exc.errno, exc.strerror or str(exc))
    return f"cannot read {what} {path}: {reason}"


def kind_of(mode: int) -> str:
    """What a path that is not a regular file is, in words (from its `st_mode`)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def read_bytes(path: str | Path, what: str = "file", limit: int = TEXT_LIMIT, error: type = UserError) -> bytes:
    """The bytes of regular file `path`, at most `limit` of them; anything else is one `error` line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(os_error(path, exc, what)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is {kind_of(st.st_mode)}; expected a regular file")
        if st.st_size > limit:
            raise error(f"{what} {path} is {st.st_size} bytes, more than the {limit} allowed")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise error(f"{what} {path} is more than the {limit} bytes allowed")
        return b"".join(chunks)
    except OSError as exc:
        raise error(os_error(path, exc, what)) from None
    finally:
        os.close(fd)


def read_text(path: str | Path, what: str = "file", limit: int = TEXT_LIMIT, error: type = UserError) -> str:
    data = read_bytes(path, what, limit, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def parse_json_object(text: str | bytes, what: str, error: type = UserError) -> dict[str, Any]:
    """A JSON object from `text`; malformed, too deeply nested or not an object is one `error` line."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise error(f"{what} is nested too deeply to read") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and ints beyond the digit limit
        raise error(f"{what} is not valid JSON ({str(exc)[:160]})") from None
    if not isinstance(data, dict):
        raise error(f"{what} must hold a JSON object, not {type(data).__name__}")
    return data


def read_json_object(path: str | Path, what: str | None = None, limit: int = JSON_LIMIT,
                     error: type = UserError) -> dict[str, Any]:
    what = what or str(path)
    return parse_json_object(read_text(path, what, limit, error), what, error)


def check_text(text: str, what: str = "the text") -> str:
    """`text` itself when it is valid Unicode (encodable as UTF-8); else one `UserError` line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{what} is not valid Unicode: {text[exc.start]!r} at character {exc.start} is a lone "
                        "surrogate (invalid UTF-8 bytes, or a \\ud800-style escape); send UTF-8 text") from None
    return text
