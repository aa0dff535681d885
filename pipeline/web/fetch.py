"""Fetching one URL of an untrusted URL list: a URL policy, a deadline and a byte cap.

URL lists come from the web, and the machines that download them can usually reach services that the web must
not (cloud metadata at 169.254.169.254, a cluster's private network, the node itself). :func:`fetch` is the one
function that turns a URL into bytes, and it holds these promises:

- **Policy.** Only ``http`` and ``https``. The host is resolved once and every address is checked before a
  socket is opened: loopback, private, link-local, multicast, reserved, shared and unspecified addresses (IPv4
  and IPv6, including IPv4-mapped, 6to4, Teredo and NAT64 forms) are refused unless :class:`UrlPolicy` allows
  them. The connection goes to the address that was checked, so a DNS answer that changes between check and
  connect (rebinding) cannot reach anything else. Every redirect hop is checked the same way.
- **Time.** ``timeout`` bounds each network wait (connect, each read); ``deadline`` bounds the whole URL (all
  attempts, redirects, headers and body). A watchdog thread shuts the socket down when the deadline passes, so a
  server that trickles one byte at a time, in its headers or its body, ends as ``timeout`` within it.
- **Bytes.** A declared ``Content-Length`` over ``max_bytes`` is refused before the body is read; the body is
  read in chunks and abandoned at ``max_bytes + 1``; an unrequested gzip/deflate encoding is decoded with the
  same cap on its output (a gzip bomb stops at the cap). Memory per URL stays below ``max_bytes`` plus a chunk.
- **Messages.** Failures raise :class:`FetchError`, whose text starts with a ledger state
  (:mod:`winnow.pipeline.data.ledger`) and never contains anything of the response body.

A :class:`Gate` (opt-outs, :mod:`winnow.pipeline.web.optout`) sees every redirect hop's URL before it is
requested and the answer's headers before its body is read: what it refuses ends the URL without a byte of the
body read.

Retries are spent only on failures that may pass (connection errors, 429 and 5xx answers, a read timeout) and
only while the deadline allows. No proxy from the environment is used: the policy must see the address that is
connected to. DNS resolution itself is bounded by the system resolver's own timeout, not by ``deadline``.
"""

from __future__ import annotations

import heapq
import http
import http.client
import io
import ipaddress
import itertools
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin, urlsplit

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
_CHUNK = 1 << 16
_REDIRECTS = (301, 302, 303, 307, 308)
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(Exception):
    """A URL that gave no image bytes. ``str()`` is ``"<state>: <reason>"``; ``transient`` failures are retried."""

    def __init__(self, state: str, reason: str, transient: bool = False, status: int | None = None):
        super().__init__(f"{state}: {reason}")
        self.state, self.transient, self.status = state, transient, status


class Gate:
    """What a fetch asks before each redirect hop and before reading a body; both return a refusal (a ledger
    message, ``"<state>: <reason>"``) or None. The base class refuses nothing."""

    def hop(self, url: str) -> str | None:
        return None

    def headers(self, headers: http.client.HTTPMessage) -> str | None:
        return None


def _refused(message: str) -> FetchError:
    state, _, reason = message.partition(": ")
    return FetchError(state, reason)


# ------------------------------------------------------------------------------------------------ the policy
def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo server and client, NAT64)."""
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo:
        out.extend(ip.teredo)
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public internet address ("loopback", "private", ...), or None when it is one."""
    candidates = [*(_embedded_ipv4(ip) if ip.version == 6 else []), ip]  # what an IPv6 form carries comes first
    for a in candidates:
        for kind in ("unspecified", "loopback", "link-local", "multicast", "reserved", "private"):
            if getattr(a, f"is_{kind.replace('-', '_')}"):
                return kind
        if not a.is_global:
            return "non-global"
    return None


@dataclass(frozen=True)
class UrlPolicy:
    """Which URLs may be fetched.

    Args:
        allow_hosts: host names (matched exactly, case-insensitive), addresses and networks (``127.0.0.1``,
            ``10.1.0.0/16``, ``::1``) that are fetched although they are not public, e.g. a test server on
            loopback or a mirror on the cluster's network.
        allow_private_networks: fetch every non-public address (loopback, private, link-local, ...); for a closed
            network where the whole list is trusted.
    """

    allow_hosts: tuple[str, ...] = ()
    allow_private_networks: bool = False
    _names: frozenset = field(init=False, repr=False, compare=False)
    _networks: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names, networks = set(), []
        for entry in self.allow_hosts:
            text = str(entry).strip().strip("[]")
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                names.add(text.lower().rstrip("."))
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_networks", tuple(networks))

    def refusal(self, host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """None when ``host`` may be fetched at address ``ip``, else why not."""
        if host.lower().rstrip(".") in self._names or any(ip in net for net in self._networks):
            return None
        kind = address_kind(ip)
        if kind is None or (self.allow_private_networks and kind not in ("unspecified", "multicast")):
            return None
        article = "an" if kind[0] in "aeiou" else "a"
        return (f"{ip} is {article} {kind} address (allow it on purpose with ingest.allow_hosts or "
                f"ingest.allow_private_networks)")


def parse_url(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, request target)`` of an http(s) URL; raises FetchError for anything else."""
    url = (url or "").strip()
    if not url:
        raise FetchError("bad_url", "url is empty")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # the library's message quotes the url: say what is wrong in our words
        what = "port" if "port" in str(exc).lower() else "IPv6 address" if "ipv6" in str(exc).lower() else "url"
        raise FetchError("bad_url", f"unparseable {what}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = scheme or "none"
        raise FetchError("refused_url", f"scheme {shown[:20]!r} is not allowed (http and https only)")
    host = parts.hostname
    if not host:
        raise FetchError("bad_url", "no host given")
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return scheme, host, port or (443 if scheme == "https" else 80), target


# ----------------------------------------------------------------------------------------------- the watchdog
class _Watchdog:
    """One thread per process that shuts a socket down when its deadline passes (wakes blocked reads)."""

    def __init__(self) -> None:
        self._heap: list = []
        self._cv = threading.Condition()
        self._count = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> list:
        entry = [deadline, next(self._count), sock, False]  # [when, tie-break, socket, fired]
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, entry)
            self._cv.notify()
        return entry

    def cancel(self, entry: list) -> None:
        with self._cv:
            entry[2] = None

    def _run(self) -> None:
        with self._cv:
            while True:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                entry = heapq.heappop(self._heap)
                entry[3] = True
                try:  # the plain socket's shutdown, also for SSL sockets: wakes a reader blocked in recv
                    socket.socket.shutdown(entry[2], socket.SHUT_RDWR)
                except OSError:
                    pass


_WATCHDOG = _Watchdog()


# ---------------------------------------------------------------------------------------------------- fetching
@dataclass(frozen=True)
class FetchLimits:
    """Per-URL bounds: ``timeout`` per network wait, ``deadline`` for everything, ``max_bytes`` of body (the
    values and their defaults come from :class:`winnow.pipeline.stages.ingest.IngestConfig`)."""

    timeout: float
    deadline: float
    max_bytes: int
    retries: int
    max_redirects: int


@dataclass
class Response:
    url: str
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def fetch(url: str, policy: UrlPolicy, limits: FetchLimits, user_agent: str = USER_AGENT, gate: Gate | None = None,
          truncate: bool = False) -> Response:
    """GET ``url`` within the policy and limits; raise :class:`FetchError` for every failure. ``truncate``: a
    body over ``max_bytes`` is cut there instead of refused (for robots.txt, whose standard says so)."""
    deadline = time.monotonic() + limits.deadline
    for attempt in range(limits.retries + 1):
        try:
            return _fetch_once(url, policy, limits, deadline, user_agent, gate or Gate(), truncate)
        except FetchError as exc:
            if not exc.transient or attempt == limits.retries or time.monotonic() >= deadline:
                raise
        except Exception as exc:  # noqa: BLE001 - whatever a server provokes is this URL's failure, never more
            raise FetchError("error", f"unexpected {type(exc).__name__} while fetching") from None
    raise AssertionError("unreachable")


def _fetch_once(url: str, policy: UrlPolicy, limits: FetchLimits, deadline: float, user_agent: str, gate: Gate,
                truncate: bool) -> Response:
    for hop in range(limits.max_redirects + 1):
        scheme, host, port, target = parse_url(url)
        refusal = gate.hop(url) if hop else None
        if refusal:
            raise _refused(refusal)
        sock, entry = _connect(scheme, host, port, policy, limits.timeout, deadline, redirected=hop > 0)
        try:
            outcome = _exchange(sock, scheme, host, port, target, user_agent, limits.max_bytes, gate, truncate)
        except FetchError as exc:
            outcome = exc
        except (TimeoutError, socket.timeout):
            outcome = FetchError("timeout", f"no data for {limits.timeout:g} s", transient=True)
        except http.client.IncompleteRead as exc:  # ``expected`` is None for a chunked body cut short
            more = f", {exc.expected:,} more announced" if isinstance(exc.expected, int) else ""
            outcome = FetchError("connection_error", f"body ended after {len(exc.partial or b''):,} bytes{more}")
        except OSError as exc:
            outcome = FetchError("connection_error", _short(exc), transient=True)
        except Exception as exc:  # noqa: BLE001 - http.client's errors can quote the server: name the kind only
            outcome = FetchError("connection_error", f"malformed HTTP answer ({type(exc).__name__})")
        finally:
            _WATCHDOG.cancel(entry)
            sock.close()
        if entry[3]:  # the watchdog cut the connection: whatever was read after that is not an answer
            raise FetchError("timeout", f"no complete answer within the {limits.deadline:g} s deadline")
        if isinstance(outcome, FetchError):
            raise outcome
        if isinstance(outcome, str):
            try:
                url = urljoin(url, outcome)
                parse_url(url)
            except (ValueError, FetchError) as exc:
                state = exc.state if isinstance(exc, FetchError) and exc.state == "refused_url" else "bad_url"
                reason = str(exc).split(": ", 1)[1] if isinstance(exc, FetchError) else "unparseable url"
                raise FetchError(state, f"a redirect target: {reason}") from None
            continue
        return Response(url, *outcome)
    raise FetchError("http_error", f"more than {limits.max_redirects} redirects")


def _exchange(sock: socket.socket, scheme: str, host: str, port: int, target: str, user_agent: str,
              max_bytes: int, gate: Gate, truncate: bool) -> str | tuple:
    """One request on a connected socket: the redirect location, or ``(status, headers, body)``."""
    conn = (http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection)(host, port)
    conn.sock = sock
    conn.putrequest("GET", target, skip_accept_encoding=True)
    for name, value in (("User-Agent", user_agent), ("Accept", "image/*,*/*;q=0.8"),
                        ("Accept-Encoding", "identity"), ("Connection", "close")):
        conn.putheader(name, value)
    conn.endheaders()
    resp = conn.getresponse()
    if resp.status in _REDIRECTS and resp.getheader("Location"):
        return resp.getheader("Location").strip()
    if not 200 <= resp.status < 300:
        raise FetchError("http_error", f"HTTP Error {resp.status}: {_phrase(resp.status)}",
                         transient=resp.status in _TRANSIENT_STATUS, status=resp.status)
    refusal = gate.headers(resp.headers)
    if refusal:
        raise _refused(refusal)
    return resp.status, resp.headers, _read_body(resp, max_bytes, truncate)


def _connect(scheme: str, host: str, port: int, policy: UrlPolicy, timeout: float, deadline: float,
             redirected: bool) -> tuple[socket.socket, list]:
    """A connected socket to the first allowed address of ``host`` (TLS-wrapped for https), and its watch."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise FetchError("connection_error", f"cannot resolve host ({_short(exc)})", transient=True) from None
    refusals, last_error = [], None
    for family, _, _, _, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        reason = policy.refusal(host, ip)
        if reason:
            refusals.append(reason)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock = socket.socket(family, socket.SOCK_STREAM)
        entry = _WATCHDOG.watch(sock, deadline)
        try:
            sock.settimeout(min(timeout, remaining))
            sock.connect(sockaddr)
            sock.settimeout(timeout)
            if scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
                entry[2] = sock
            return sock, entry
        except (OSError, ssl.SSLError) as exc:
            _WATCHDOG.cancel(entry)
            sock.close()
            last_error = "timeout" if entry[3] or isinstance(exc, TimeoutError) else _short(exc)
    if refusals and last_error is None:
        where = "a redirect target: " if redirected else ""
        raise FetchError("refused_url", where + refusals[0])
    if last_error == "timeout" or time.monotonic() >= deadline:
        raise FetchError("timeout", f"no connection within {timeout:g} s", transient=True)
    raise FetchError("connection_error", last_error or "no address", transient=True)


def _read_body(resp: http.client.HTTPResponse, max_bytes: int, truncate: bool = False) -> bytes:
    declared = resp.getheader("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > max_bytes and not truncate:
        raise FetchError("too_large", f"Content-Length {int(declared):,} bytes > cap {max_bytes:,}")
    encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
    decoder = None
    if encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(47 if encoding != "deflate" else zlib.MAX_WBITS)  # 47: gzip or zlib header
    elif encoding not in ("identity", ""):
        raise FetchError("decode_error", f"unsupported Content-Encoding {encoding[:20]!r}")
    body, raw = bytearray(), 0
    while chunk := resp.read1(_CHUNK):
        raw += len(chunk)
        if decoder is None:
            body += chunk
        else:
            try:
                body += decoder.decompress(chunk, max_bytes + 1 - len(body))
            except zlib.error:
                raise FetchError("decode_error", f"corrupt {encoding} content encoding") from None
            if decoder.unconsumed_tail:
                body += b"\0"  # more output than the cap allows
        if truncate and (len(body) >= max_bytes or raw > max_bytes):
            return bytes(body[:max_bytes])
        if len(body) > max_bytes or raw > max_bytes:
            what = "decoded body" if decoder is not None and len(body) > max_bytes else "body"
            raise FetchError("too_large", f"{what} exceeds the cap of {max_bytes:,} bytes")
    if resp.length:  # the connection closed before the announced Content-Length arrived
        raise FetchError("connection_error", f"body ended after {raw:,} bytes, {resp.length:,} more announced")
    return bytes(body)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "unknown status"


def _short(exc: BaseException) -> str:
    """A one-line description of a library exception (no response content: these carry none)."""
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fetch_image_stream(url: str, policy: UrlPolicy, limits: FetchLimits, user_agent: str = USER_AGENT,
                       gate: Gate | None = None
                       ) -> tuple[io.BytesIO | None, http.client.HTTPMessage | None, str | None]:
    """``(bytes stream, headers, None)`` or ``(None, None, ledger message)``: the shape a download loop wants."""
    try:
        resp = fetch(url, policy, limits, user_agent, gate)
    except FetchError as exc:
        return None, None, str(exc)
    return io.BytesIO(resp.body), resp.headers, None
