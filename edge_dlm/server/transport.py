"""The server's HTTP side, apart from what it answers (`app`): its options, the routes and their aliases,
which browser origins may call it, the admission of requests (one decodes, some wait, the rest 429), and
the threaded server that drains on shutdown."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import ipaddress
import select
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/edits": "edit"}


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    default_mode: str = "linear-spec"  # what a request naming no mode (or "auto") runs
    default_steps: int | None = None  # the step budget auto chose, when it chose diffusion
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes
    queue: int = 8  # requests waiting beside the running one
    queue_timeout: float = 60.0  # s a request may wait before 503
    request_timeout: float = 600.0  # s a request may decode
    io_timeout: float = 30.0  # s a socket may stall
    origins: tuple[str, ...] = ()  # browser origins allowed beside `LOCAL_ORIGINS` ("*" wildcards; "*": any)


# Browser pages that may call the server (CORS) without being named: this machine's own pages and local
# apps (Electron / Tauri apps such as note-taking tools, VS Code webviews), as Ollama allows by default.
# Any other page's requests are refused (403): a web page must not drive a local model unasked.
LOCAL_ORIGINS = ("http://localhost", "https://localhost", "http://localhost:*", "https://localhost:*",
                 "http://127.0.0.1", "https://127.0.0.1", "http://127.0.0.1:*", "https://127.0.0.1:*",
                 "http://[::1]", "http://[::1]:*", "http://0.0.0.0", "http://0.0.0.0:*",
                 "app://*", "file://*", "tauri://*", "http://tauri.localhost", "vscode-webview://*", "vscode-file://*")


def origin_allowed(origin: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether a browser page from `origin` may call the server (`LOCAL_ORIGINS` and `extra`, shell-style
    patterns, "*" any)."""
    import fnmatch

    return any(fnmatch.fnmatchcase(origin.lower(), pat.lower()) for pat in (*LOCAL_ORIGINS, *extra))


# paths clients send without the /v1 prefix (a base URL configured without it), as llama.cpp accepts
ALIASES = {"/chat/completions": "/v1/chat/completions", "/completions": "/v1/completions", "/models": "/v1/models",
           "/edits": "/v1/edits", "/embeddings": "/v1/embeddings"}


def route_of(path: str) -> str:
    """The route a request path names: no query string, no trailing slash, the /v1 prefix implied."""
    path = path.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    if path.startswith("/models/"):
        return "/v1" + path
    return ALIASES.get(path, path)


class HTTPError(Exception):
    def __init__(self, code: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.kind, self.headers = code, kind, headers or {}


SHUTTING_DOWN = HTTPError(503, "the server is shutting down", "server_error", {"Retry-After": "5"})


class Admission:
    """One request decodes at a time; up to `queue` wait in arrival order; beyond that, 429.

    The running request hands its turn straight to the oldest waiter (no thundering herd); a waiter
    that is not handed the turn within `timeout` seconds leaves with 503.
    """

    def __init__(self, queue: int, timeout: float) -> None:
        self.queue, self.timeout = queue, timeout
        self.lock = threading.Lock()
        self.busy = False
        self.waiting: collections.deque[threading.Event] = collections.deque()
        self.closed = False
        self.active_cancel: threading.Event | None = None
        self.idle = threading.Event()
        self.idle.set()

    @contextlib.contextmanager
    def turn(self, cancel: threading.Event):
        mine = None
        with self.lock:
            if self.closed:
                raise SHUTTING_DOWN
            if not self.busy:
                self.busy = True
                self.idle.clear()
            elif len(self.waiting) >= self.queue:
                raise HTTPError(429, f"the server is busy ({len(self.waiting)} requests already waiting); retry "
                                "later", "rate_limit_error", {"Retry-After": "2"})
            else:
                mine = threading.Event()
                self.waiting.append(mine)
        if mine is not None:
            mine.wait(self.timeout)
            with self.lock:
                if not mine.is_set():  # not handed the turn in time
                    self.waiting.remove(mine)
                    raise HTTPError(503, f"the model was busy for {self.timeout:g} s; retry later", "server_error",
                                    {"Retry-After": "5"})
        try:
            with self.lock:
                if self.closed:
                    raise SHUTTING_DOWN
                self.active_cancel = cancel
            yield
        finally:
            with self.lock:
                self.active_cancel = None
                if self.waiting:
                    self.waiting.popleft().set()  # the turn passes on; busy stays set
                else:
                    self.busy = False
                    self.idle.set()

    def close(self) -> None:
        """Shutdown: refuse new requests, cancel the running one (waiters get 503 as their turn comes)."""
        with self.lock:
            self.closed = True
            if self.active_cancel is not None:
                self.active_cancel.set()


def client_gone(sock: socket.socket) -> bool:
    """True when the peer has closed its end (readable with nothing to read) or reset it."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection stalled in a read cannot hold the process at exit
    request_queue_size = 64

    def __init__(self, addr, handler, admission: Admission) -> None:
        super().__init__(addr, handler)
        self.admission = admission

    def stop(self) -> None:
        """Graceful: refuse new work, cancel the running request, leave serve_forever."""
        self.admission.close()
        threading.Thread(target=self.shutdown, daemon=True).start()

    def drain(self, seconds: float) -> None:
        """After `stop`: keep answering what reaches the socket (503 for new work) until the running
        request has finished and nothing has arrived for a moment, at most `seconds`; a client that
        connected during shutdown gets an answer, not a reset."""
        self.timeout, self.quiet = 0.2, False
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.quiet = True
            self.handle_request()  # one connection, or `handle_timeout` after 0.2 s of silence
            if self.quiet and self.admission.idle.is_set():
                return

    def handle_timeout(self) -> None:
        self.quiet = True

    def process_request(self, request, client_address):
        self.quiet = False
        super().process_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        """A connection that broke is one log line; anything else keeps its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            print(f"{client_address[0]} connection closed ({type(exc).__name__})", file=sys.stderr)
        else:
            super().handle_error(request, client_address)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
