"""A hostile web on loopback: one server that misbehaves in every way a URL list from strangers can.

``HostileServer`` serves, on 127.0.0.1, good images in awkward encodings (16-bit, CMYK, palette, grey+alpha,
gzip-encoded) and every kind of bad answer: errors, redirect loops, redirects to private and metadata
addresses and to other schemes, trickled headers and bodies, endless and falsely announced bodies, gzip and pixel
bombs, HTML, and error pages holding a secret that must never reach the ledger. ``Canary`` listens on a second
loopback address that the URL policy does not allow and counts connections: a correct ingest makes none.
``hostile_rows`` is the URL list (with the state each row must end in); tests and ``benchmarks/bench_ingest.py``
use both.
"""

from __future__ import annotations

import gzip
import io
import socket
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from .server import trickle

SECRET = "WINNOW-CANARY-SECRET-4242"


def _png(width: int, height: int, bit_depth: int, colour: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def exif_bomb(tags: int = 24_000, values: int = 999) -> bytes:
    """A valid 48 px JPEG whose EXIF block holds ``tags`` RATIONAL tags of ``values`` values each (all pointing
    at one 8-byte value): about 300 KB that keep a pure-Python EXIF parser busy for minutes. The block is
    longer than one APP1 segment allows, so it continues in APP2 segments (the JPEG stays decodable)."""
    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((48, 48, 3), 90, dtype=np.uint8)).save(out, format="JPEG")
    jpeg = out.getvalue()
    value_at = 8 + 2 + 12 * tags + 4
    entries = b"".join(struct.pack("<HHII", 0x0100 + i % 0x7000, 5, values, value_at) for i in range(tags))
    tiff = b"II*\x00" + struct.pack("<IH", 8, min(tags, 0xFFFF)) + entries + b"\0" * 4 + struct.pack("<II", 1, 3)
    payload, segments = b"Exif\x00\x00" + tiff, []
    for i, start in enumerate(range(0, len(payload), 65_533)):
        part = payload[start:start + 65_533]
        segments.append((b"\xff\xe1" if i == 0 else b"\xff\xe2") + struct.pack(">H", len(part) + 2) + part)
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def rotated_jpeg() -> bytes:
    """A 64x32 JPEG (left half red, right half blue) tagged EXIF orientation 6: shown upright it is 32x64 with
    red on top."""
    from PIL import Image

    im = Image.new("RGB", (64, 32), (220, 20, 20))
    im.paste((20, 20, 220), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


def images() -> dict[str, bytes]:
    """The served image files: name -> bytes (all small)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = 48

    def save(im, fmt: str, **kw) -> bytes:
        out = io.BytesIO()
        im.save(out, format=fmt, **kw)
        return out.getvalue()

    rgb = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    grey16 = np.full((side, side), 128 * 257, dtype=">u2")  # mid grey, 16 bits per sample
    rgb16 = np.full((side, side, 3), 128 * 257, dtype=">u2")
    rows16 = b"".join(b"\0" + row.tobytes() for row in rgb16)  # filter byte 0 before each row
    palette = Image.new("P", (side, side), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    return {
        "ok.jpg": save(rgb, "JPEG", quality=90),
        "ok.png": save(rgb, "PNG"),
        "grey16.png": _png(side, side, 16, 0, b"".join(b"\0" + r.tobytes() for r in grey16)),
        "rgb16.png": _png(side, side, 16, 2, rows16),
        "cmyk.jpg": save(Image.new("CMYK", (side, side), (0, 255, 255, 0)), "JPEG"),
        "palette.png": save(palette, "PNG", transparency=0),
        "grey_alpha.png": save(Image.new("LA", (side, side), (90, 255)), "PNG"),
        "grey.jpg": save(Image.new("L", (side, side), 77), "JPEG"),
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 2000, dtype=np.uint8)) + b"\xff\xd9",
        "pixel_bomb.png": _png(40_000, 40_000, 8, 2, b"\0" * 64),
        "exif_bomb.jpg": exif_bomb(),
        "rotated.jpg": rotated_jpeg(),
    }


#: path -> Location of the server's redirects (``{canary}``: the refused listener's URL)
REDIRECTS = {
    "redirect/ok": "/ok.jpg", "redirect/chain": "/redirect/ok", "redirect/loop": "/redirect/loop",
    "redirect/canary": "{canary}/secret.jpg", "redirect/metadata": "http://169.254.169.254/latest/meta-data/",
    "redirect/private": "http://10.0.0.1/admin.jpg", "redirect/file": "file:///etc/passwd",
    "redirect/ftp": "ftp://127.0.0.1/image.jpg",
    "redirect/bad_ipv6": "http://[oops/x", "redirect/bad_port": "http://127.0.0.1:" + "9" * 45_000 + "/x.jpg",
}


class _Handler(BaseHTTPRequestHandler):
    server: HostileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _trickle(self, data: bytes) -> None:
        trickle(self.wfile, data, self.server.trickle_seconds, self.server.closing)
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.hits.append(self.path)
        name = unquote(self.path.split("?", 1)[0]).lstrip("/")
        srv = self.server
        try:
            reply = self._plain(name)
            if reply is not None:
                self._send(*reply)
            elif name == "hold":  # answers only once released: lets a test act while a download is in flight
                srv.held.set()
                srv.release.wait(60)
                self._send(200, srv.files["ok.jpg"])
            elif name.startswith("status/"):
                self.send_error(int(name.split("/")[1]))
            elif name in REDIRECTS:
                self._redirect(REDIRECTS[name].format(canary=srv.canary_url))
            elif name in ("endless", "endless_chunked"):
                self._endless(chunked=name == "endless_chunked")
            elif name.startswith("trickle_"):
                self._trickle_route(name)
            elif not self._broken_framing(name):
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _plain(self, name: str) -> tuple | None:
        """(status, body, content type, headers) of the routes that answer with one well-formed response."""
        files = self.server.files
        if name in files:
            return 200, files[name], "image/png" if name.endswith(".png") else "image/jpeg"
        ok = files["ok.jpg"]
        routes = {
            "unicode/café au lait.jpg": lambda: (200, ok),
            "secret_500": lambda: (500, f"<html>internal error {SECRET}</html>".encode(), "text/html"),
            "secret_page": lambda: (200, f"{SECRET} not an image".encode(), "text/plain"),
            "html": lambda: (200, b"<!DOCTYPE html><html><body>a web page</body></html>", "text/html"),
            "empty": lambda: (200, b"", "image/jpeg"),
            "robots_noai": lambda: (200, ok, "image/jpeg", {"X-Robots-Tag": "noai"}),
            "gzip_ok": lambda: (200, gzip.compress(ok), "image/jpeg", {"Content-Encoding": "gzip"}),
            "gzip_bomb": lambda: (200, self.server.gzip_bomb, "image/jpeg", {"Content-Encoding": "gzip"}),
            "brotli": lambda: (200, b"\x0b\x02\x80", "image/jpeg", {"Content-Encoding": "br"}),
        }
        return routes[name]() if name in routes else None

    def _trickle_route(self, name: str) -> None:
        ok = self.server.files["ok.jpg"]
        if name == "trickle_body":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(ok)))
            self.end_headers()
            self._trickle(ok)
        elif name == "trickle_headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._trickle(b"X-Padding: " + b"a" * 10_000 + b"\r\n")
        else:
            self.send_error(404)

    def _broken_framing(self, name: str) -> bool:
        """The routes whose framing lies (lengths, chunks, status line, headers); False for any other name."""
        data = self.server.files["ok.jpg"]
        if name in ("declared_huge", "length_short", "length_long"):  # a length far over, over or under the body
            self.send_response(200)
            if name == "declared_huge":
                self.send_header("Content-Type", "image/jpeg")
            declared = {"declared_huge": 50 << 30, "length_short": len(data) * 2, "length_long": len(data) // 2}
            self.send_header("Content-Length", str(declared[name]))
            self.end_headers()
            self.wfile.write(data)
        elif name in ("chunked_short", "chunked_bad_size"):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if name == "chunked_short":  # announces a chunk, sends half of it, closes
                self.wfile.write(b"%x\r\n" % len(data) + data[: len(data) // 2])
            else:  # a chunk-size line that is no number
                self.wfile.write(b"%x\r\n%s\r\nzz" % (100, data[:100]) + f"{SECRET}\r\n".encode())
        elif name == "junk_status":
            self.wfile.write(f"HTTP/1.1 2OO {SECRET}\r\nContent-Length: 3\r\n\r\nabc".encode())
        elif name == "header_flood":
            self.send_response(200)
            for i in range(300):
                self.send_header(f"X-Flood-{i}", "x")
            self.end_headers()
        else:
            return False
        self.close_connection = True
        return True

    def _endless(self, chunked: bool) -> None:
        """Zeros after a JPEG signature, until the client leaves or the server's byte limit."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\xff\xd8\xff\xe0" + b"\0" * ((1 << 16) - 4)
        sent = 0
        while sent < self.server.endless_bytes and not self.server.closing.is_set():
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            sent += len(block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True


class HostileServer(ThreadingHTTPServer):
    """The hostile web on ``127.0.0.1:port``; a context manager (serves from a background thread).

    ``endless_bytes`` bounds what an endless body sends before the server gives up, ``trickle_seconds`` how long
    a trickle lasts: so a downloader without limits still finishes (slowly, and with the memory it shows).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, port: int = 0, canary_url: str = "http://127.0.0.2:9", endless_bytes: int = 1 << 30,
                 trickle_seconds: float = 150.0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.files = images()
        self.gzip_bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
        self.canary_url = canary_url
        self.endless_bytes, self.trickle_seconds = endless_bytes, trickle_seconds
        self.closing = threading.Event()
        self.held, self.release = threading.Event(), threading.Event()
        self.hits: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> HostileServer:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.release.set()
        self.shutdown()
        self.server_close()


class Canary:
    """A listener on a loopback address the URL policy refuses; ``connections`` must stay 0."""

    def __init__(self, host: str = "127.0.0.2"):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()

    @property
    def host_port(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.host_port
        return f"http://{host}:{port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def __enter__(self) -> Canary:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.sock.close()


def hostile_rows(base: str, canary: Canary) -> list[dict]:
    """The hostile URL list: ``url``, ``caption``, ``uid`` and ``expected`` (the state the row must end in)."""
    host, port = canary.host_port
    packed = int.from_bytes(socket.inet_aton(host), "big")
    rows = [
        # schemes other than http(s)
        ("file:///etc/passwd", "refused_url"),
        (f"file://{__file__}", "refused_url"),
        ("ftp://127.0.0.1/image.jpg", "refused_url"),
        ("javascript:alert(1)", "refused_url"),
        ("data:image/png;base64,iVBORw0KGgo=", "refused_url"),
        ("gopher://127.0.0.1:70/", "refused_url"),
        # private, metadata and other non-public targets, directly ...
        ("http://169.254.169.254/latest/meta-data/", "refused_url"),
        ("http://10.0.0.1/admin.jpg", "refused_url"),
        ("http://192.168.1.1/router.jpg", "refused_url"),
        ("http://[::1]/x.jpg", "refused_url"),
        ("http://[::ffff:169.254.169.254]/latest/", "refused_url"),
        ("http://0.0.0.0/x.jpg", "refused_url"),
        (f"{canary.url}/secret.jpg", "refused_url"),
        (f"http://{packed}:{port}/decimal.jpg", "refused_url"),
        (f"http://{hex(packed)}:{port}/hex.jpg", "refused_url"),
        # ... and by redirect
        (f"{base}/redirect/canary", "refused_url"),
        (f"{base}/redirect/metadata", "refused_url"),
        (f"{base}/redirect/private", "refused_url"),
        (f"{base}/redirect/file", "refused_url"),
        (f"{base}/redirect/ftp", "refused_url"),
        (f"{base}/redirect/loop", "http_error"),
        # malformed
        ("", "bad_url"),
        ("http:///no-host.jpg", "bad_url"),
        ("http://127.0.0.1:99999/port.jpg", "bad_url"),
        # slow, endless and lying bodies, bombs
        (f"{base}/trickle_body", "timeout"),
        (f"{base}/trickle_headers", "timeout"),
        (f"{base}/endless", "too_large"),
        (f"{base}/endless_chunked", "too_large"),
        (f"{base}/declared_huge", "too_large"),
        (f"{base}/gzip_bomb", "too_large"),
        (f"{base}/length_short", "connection_error"),
        (f"{base}/length_long", "decode_error"),
        (f"{base}/header_flood", "connection_error"),
        (f"{base}/pixel_bomb.png", "too_many_pixels"),
        (f"{base}/brotli", "decode_error"),
        (f"{base}/chunked_short", "connection_error"),
        (f"{base}/chunked_bad_size", "connection_error"),
        (f"{base}/junk_status", "connection_error"),
        (f"{base}/redirect/bad_ipv6", "bad_url"),
        (f"{base}/redirect/bad_port", "bad_url"),
        (f"{base}/corrupt.jpg", "decode_error"),
        # wrong content and HTTP errors (the secret must never reach error_message)
        (f"{base}/secret_500", "http_error"),
        (f"{base}/secret_page", "not_an_image"),
        (f"{base}/html", "not_an_image"),
        (f"{base}/empty", "not_an_image"),
        (f"{base}/status/404", "http_error"),
        (f"{base}/status/503", "http_error"),
        (f"{base}/robots_noai", "disallowed"),
        (f"https://127.0.0.1:{base.rsplit(':', 1)[1]}/ok.jpg", "connection_error"),
        # good images in awkward forms
        (f"{base}/ok.jpg", "ok"),
        (f"{base}/exif_bomb.jpg", "over_budget"),  # beside good images: they must not suffer
        (f"{base}/ok.png", "ok"),
        (f"{base}/grey16.png", "ok"),
        (f"{base}/rgb16.png", "ok"),
        (f"{base}/cmyk.jpg", "ok"),
        (f"{base}/palette.png", "ok"),
        (f"{base}/grey_alpha.png", "ok"),
        (f"{base}/grey.jpg", "ok"),
        (f"{base}/rotated.jpg", "ok"),
        (f"{base}/gzip_ok", "ok"),
        (f"{base}/redirect/chain", "ok"),
        (f"{base}/unicode/café au lait.jpg", "ok"),
        (f"HTTP://user:pw@{base.split('://', 1)[1]}/ok.jpg?a=1#fragment", "ok"),
    ]
    out = [{"url": url, "caption": f"hostile row {i}: {url[:40]}", "uid": f"{i + 1:032x}", "expected": state}
           for i, (url, state) in enumerate(rows)]
    # a repeated uid: the later row is not downloaded, whatever its url
    out.append({"url": f"{base}/ok.jpg", "caption": "the same uid again", "uid": out[-1]["uid"],
                "expected": "duplicate_uid"})
    out.append({"url": f"{base}/ok.jpg", "caption": "a uid that is not hex", "uid": "not-a-uid!",
                "expected": "bad_uid"})
    return out
