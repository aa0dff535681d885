"""The loopback web server for a synthetic world: serves ``site/`` on 127.0.0.1 with planted misbehaviour.

``site/routes.json`` maps a path to a behaviour: ``{"status": 500}``, ``{"delay": s}`` (answer after s
seconds), ``{"trickle": s}`` (send one byte every 0.5 s for up to s seconds: a download that never times out),
``{"content_type": "text/html"}``, ``{"headers": {...}}`` (more response headers), ``{"flaky": n}`` (503 for
the first n requests, then the file). Any other path is served from
``site/`` if the file exists, else 404. ``site/hosts.json`` (optional) names more sites, each on another loopback
address at the same port, with their own routes (``{"status": 503}`` or ``{"json": ...}`` for a path); they serve
the same files otherwise. ``hits`` counts the requests per (address, path); ``requests`` lists them with their
arrival times.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from winnow.pipeline.core.errors import UserError

_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


class _Handler(BaseHTTPRequestHandler):
    server: WebPoolServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the ledger is the log
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlparse(self.path).path
        host = self.server.server_address[0]
        self.server.hits[host, path] += 1
        self.server.requests.append((time.monotonic(), host, path))
        route = self.server.sites.get(host, {}).get(path) or self.server.routes.get(path, {})
        try:
            if "status" in route or self.server.hits[host, path] <= route.get("flaky", 0):
                self.send_error(route.get("status", 503))
                return
            if "json" in route:
                body = json.dumps(route["json"]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            file = os.path.normpath(os.path.join(self.server.site, path.lstrip("/")))
            if not file.startswith(self.server.site + os.sep) or not os.path.isfile(file):
                self.send_error(404)
                return
            with open(file, "rb") as f:
                data = f.read()
            if "delay" in route:
                time.sleep(route["delay"])
            ctype = route.get("content_type") or _TYPES.get(os.path.splitext(file)[1], "application/octet-stream")
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for name, value in route.get("headers", {}).items():
                self.send_header(name, value)
            self.end_headers()
            if "trickle" in route:
                trickle(self.wfile, data, route["trickle"], self.server.closing)
                self.close_connection = True
                return
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def trickle(wfile, data: bytes, seconds: float, closing: threading.Event) -> None:
    """Send ``data`` one byte every half second, for at most ``seconds`` (a download no socket timeout ends)."""
    stop = time.monotonic() + seconds
    for i in range(len(data)):
        if time.monotonic() > stop or closing.is_set():
            break
        wfile.write(data[i: i + 1])
        wfile.flush()
        time.sleep(0.5)


def _loopback(host: str) -> str:
    """``host`` when it is a loopback address (``localhost`` is 127.0.0.1); anything else is refused: the world
    holds planted secrets and bombs for the downloader, never to be served to the network."""

    text = (host or "").strip().strip("[]")
    if text.lower() == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(text).is_loopback:
            return text
    except ValueError:
        pass
    raise UserError(f"winnow serves synthetic worlds on loopback only, not on {host[:60]!r}; use a base_url on "
                    "127.0.0.1 (e.g. --set synth.base_url=http://127.0.0.1:8741)")


class WebPoolServer(ThreadingHTTPServer):
    """Serve a world's ``site/`` folder; use as a context manager (starts a background thread)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the default backlog of 5 drops connections when many threads fetch at once

    def __init__(self, world: str, host: str = "127.0.0.1", port: int = 8741, hint: str = ""):
        """``hint``: how the caller's user picks another port, added to the message when the port is taken."""
        self.site = os.path.realpath(os.path.join(world, "site"))
        routes_path = os.path.join(self.site, "routes.json")
        if not os.path.isfile(routes_path):
            raise UserError(f"{world} is not a synthetic world (no site/routes.json); run `winnow synth` first")
        with open(routes_path) as f:
            self.routes = json.load(f)
        hosts_path = os.path.join(self.site, "hosts.json")
        self.sites: dict = {}
        if os.path.isfile(hosts_path):
            with open(hosts_path) as f:
                self.sites = json.load(f)
        self.closing = threading.Event()
        self.hits: collections.Counter = collections.Counter()
        self.requests: list[tuple[float, str, str]] = []  # (monotonic time, address, path) of every request
        host = _loopback(host)
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise UserError(f"cannot serve on {host}:{port} ({exc.strerror}); stop what uses the port"
                            f"{hint or ', or serve on another'}") from None
        self.others = [_Site(self, other) for other in self.sites if other != host]
        self._serving: list[threading.Thread] = []

    @classmethod
    def for_url(cls, world: str, base_url: str, hint: str = ", or run the demo on another: `winnow demo --set "
                "synth.base_url=http://127.0.0.1:PORT`") -> WebPoolServer:
        parsed = urlparse(base_url)
        return cls(world, parsed.hostname or "127.0.0.1", parsed.port or 80, hint)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> WebPoolServer:
        for server in (self, *self.others):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
            thread.start()
            self._serving.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        for server in (self, *self.others):
            server.shutdown()
            server.server_close()


class _Site(ThreadingHTTPServer):
    """Another site of the same world: the same files and counters, another loopback address, the same port."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, main: WebPoolServer, host: str):
        self.site, self.routes, self.sites, self.hits = main.site, main.routes, main.sites, main.hits
        self.requests = main.requests
        self.closing = main.closing
        try:
            super().__init__((_loopback(host), main.server_address[1]), _Handler)
        except OSError as exc:
            raise UserError(f"cannot serve the world's site {host}:{main.server_address[1]} ({exc.strerror}); "
                            "stop what uses that address") from None


def serve_world(world: str, port: int | None = None) -> None:
    """``winnow serve``: serve a world in the foreground on its base_url's host (and ``port``) until Ctrl-C."""

    manifest_path = os.path.join(world, "_manifest.json")
    if not os.path.isfile(manifest_path):
        raise UserError(f"{world} is not a synthetic world (no _manifest.json); run `winnow synth` first")
    with open(manifest_path) as f:
        base = urlparse(json.load(f)["params"]["base_url"])
    hint = (f", or serve on another with `winnow serve {world} --port PORT` (the world's URLs name port "
            f"{base.port}: then write one for PORT with `winnow synth OUT --set synth.base_url=http://127.0.0.1:PORT`)")
    with WebPoolServer(world, base.hostname or "127.0.0.1", port or base.port or 80, hint) as server:
        print(f"serving {world}/site at {server.url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
