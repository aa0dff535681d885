"""Opt-outs and politeness at ingest: robots.txt, TDMRep, and a pace per host.

A site says "not for this crawler" in three ways this module reads, before any image of it is requested:

- **robots.txt** (RFC 9309), fetched once per origin (scheme, host, port) and run: kept in a folder the run's
  processes on a machine share (a lock file per origin makes the others wait for the first), under the same URL
  policy, deadline and retries as images (at most :data:`ROBOTS_BYTES` are parsed, as the standard allows).
  Rules are matched by `protego` for the crawler's user-agent token, falling back to the ``*`` group. The
  standard's outcomes: a 2xx answer is parsed; 4xx (*unavailable*) allows everything; 5xx, 429 and no answer at
  all (*unreachable*: timeout, refused, reset) disallow everything. A 5xx or 429 answer makes the site's rows
  ``opted_out``; no answer makes them ``timeout`` or ``connection_error`` (the site is down, which a later run may
  find otherwise), still without a request for an image. Each outcome is counted by the process that fetched it
  (:attr:`OptOuts.counts`).
- **TDMRep** (the W3C community group's TDM Reservation Protocol): ``/.well-known/tdmrep.json``, an array of
  ``{"location": pattern, "tdm-reservation": 0|1, "tdm-policy": url}`` rules whose first match for the path
  applies (patterns as robots.txt's: ``*`` any run of characters, ``$`` the end); and the ``tdm-reservation: 1``
  header on an image's own answer, read before its body.
- **X-Robots-Tag** (``noai``, ``noimageai``, ...), as img2dataset reads it, also before the body.

A refused row ends ``opted_out`` (robots.txt, TDMRep) or ``disallowed`` (X-Robots-Tag) with the rule that
refused it; a row refused by robots.txt or tdmrep.json is never requested. Redirect hops are checked the same way.

:class:`Pace` keeps a download process polite to each host: at most ``concurrency`` requests at once and at least
``interval`` seconds between the starts of two requests (raised to the host's robots.txt ``Crawl-delay``, up to
``max_crawl_delay``). The interval holds across the processes of one machine when they share a folder (a lock
file per host); the concurrency cap is per process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from protego import Protego

from winnow.pipeline.web.fetch import FetchError, FetchLimits, Gate, UrlPolicy, fetch, parse_url

ROBOTS_BYTES = 512 << 10  # RFC 9309: a parsing limit of at least 500 KiB
TDMREP_BYTES = 256 << 10
TDMREP_PATH = "/.well-known/tdmrep.json"


def origin_of(url: str) -> str | None:
    """``scheme://host:port`` of an http(s) URL (host lower-cased), or None when it is not one."""
    try:
        scheme, host, port, _ = parse_url(url)
    except FetchError:
        return None
    host = host.lower().rstrip(".")
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _pattern(location: str) -> re.Pattern:
    """A robots.txt-style path pattern: ``*`` any run of characters, a final ``$`` the end of the path."""
    anchored = location.endswith("$")
    body = re.escape(location[:-1] if anchored else location).replace(r"\*", ".*")
    return re.compile(body + ("$" if anchored else ""))


@dataclass
class _Site:
    """What an origin says: its robots.txt (a protego parser, or None: everything allowed), or that it said
    nothing we could read (``unreachable``: everything disallowed); its TDMRep rules."""

    robots: object | None = None
    robots_outcome: str = "off"  # off, parsed, unavailable (4xx: allow), unreachable (5xx/429/no answer: disallow)
    robots_detail: str = ""
    robots_failure: str = ""  # the ledger state of a robots.txt that got no answer (timeout, connection_error)
    robots_text: str = ""
    tdm: tuple = ()  # (compiled pattern, location, reserved, policy url) in the file's order
    answers: tuple = ()  # the raw (status, text) of robots.txt and tdmrep.json, kept for the run's other processes


class OptOuts(Gate):
    """The opt-out checks of one download process (thread-safe). ``check(url)`` before the first request of a
    row; then the object is the fetch's :class:`Gate` for that row's redirect hops and headers."""

    def __init__(self, policy: UrlPolicy, limits: FetchLimits, user_agent: str, token: str, robots: bool = True,
                 tdmrep: bool = True, directives: tuple[str, ...] = (), shared: str | None = None,
                 pace: Pace | None = None):
        self.policy, self.user_agent, self.token = policy, user_agent, (token or "*").strip()
        self.limits = replace(limits, max_bytes=ROBOTS_BYTES)
        self.robots, self.tdmrep = robots, tdmrep
        self.directives = tuple(d.strip().lower() for d in directives)
        self.shared, self.pace = shared, pace
        self.counts: Counter = Counter()
        self._sites: dict[str, _Site] = {}
        self._locks: defaultdict = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    # ---------------------------------------------------------------------------------------------- checks
    def check(self, url: str) -> str | None:
        """The refusal (``"opted_out: ..."``) of ``url`` by its site's robots.txt or tdmrep.json, or None. A URL
        that is no http(s) URL, or whose site the URL policy refuses, is None here: its fetch says why."""
        origin = origin_of(url)
        if origin is None or not (self.robots or self.tdmrep):
            return None
        site = self._site(origin)
        path = _path_of(url)
        if self.robots and site.robots_outcome == "unreachable":
            if site.robots_failure:  # no answer at all: the site is down, which a later run may find otherwise
                return (f"{site.robots_failure}: robots.txt of {origin} is unreachable ({site.robots_detail}); "
                        "RFC 9309 disallows the site, so its images were not requested")
            return f"opted_out: robots.txt of {origin} is unreachable ({site.robots_detail}); RFC 9309 disallows all"
        if self.robots and site.robots is not None and not site.robots.can_fetch(url, self.token):
            rule = _disallow_rule(site.robots_text, path, self.token)
            return f"opted_out: robots.txt of {origin} disallows {path[:80]} for {self.token}{rule}"
        for pattern, location, reserved, policy in site.tdm:
            if pattern.match(path):
                if reserved:
                    where = f"; policy {policy[:80]}" if policy else ""
                    return f"opted_out: {TDMREP_PATH} of {origin} reserves TDM rights for {location[:60]}{where}"
                break
        return None

    def hop(self, url: str) -> str | None:
        return self.check(url)

    def headers(self, headers) -> str | None:
        if self.tdmrep and (headers.get("tdm-reservation") or "").strip() == "1":
            policy = (headers.get("tdm-policy") or "").strip()
            return "opted_out: tdm-reservation header (TDMRep) on the answer" + (f"; policy {policy[:80]}" if policy
                                                                                    else "")
        if self.directives:
            for value in headers.get_all("X-Robots-Tag") or []:
                if _robots_tag_refuses(value, self.token, self.directives):
                    return "disallowed: Use of image disallowed by X-Robots-Tag directive"
        return None

    def crawl_delay(self, url: str) -> float:
        """The robots.txt ``Crawl-delay`` of ``url``'s site for our token (0 when none or not read yet)."""
        origin = origin_of(url)
        site = self._sites.get(origin) if origin else None
        if site is None or site.robots is None:
            return 0.0
        delay = site.robots.crawl_delay(self.token)
        return float(delay) if delay else 0.0

    # ----------------------------------------------------------------------------------------------- sites
    def _site(self, origin: str) -> _Site:
        site = self._sites.get(origin)
        if site is not None:
            return site
        with self._guard:
            lock = self._locks[origin]
        with lock, self._shared_lock(origin):  # one fetch per origin: the other threads and processes wait for it
            site = self._sites.get(origin)
            if site is None:
                site = self._read_site(origin)
                self._sites[origin] = site
        return site

    @contextlib.contextmanager
    def _shared_lock(self, origin: str):
        """The machine-wide lock of an origin's files (a lock file in the shared folder), when there is one."""
        if not self.shared:
            yield
            return
        os.makedirs(self.shared, exist_ok=True)
        with open(os.path.join(self.shared, hashlib.sha1(origin.encode()).hexdigest() + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_site(self, origin: str) -> _Site:
        cached = self._cached(origin)
        robots = (cached or {}).get("robots") or (self._get(origin + "/robots.txt") if self.robots else (0, ""))
        tdmrep = (cached or {}).get("tdmrep") or (self._get(origin + TDMREP_PATH) if self.tdmrep else (0, ""))
        counts = self.counts if cached is None else Counter()  # a site is counted by the process that fetched it
        site = _robots_site(*robots, counts) if self.robots else _Site()
        if self.tdmrep:
            site.tdm = _tdm_rules(*tdmrep, counts)
        site.answers = (robots, tdmrep)
        if cached is None:
            self._keep(origin, site)
        return site

    def _get(self, url: str) -> tuple[int | str, str]:
        """(HTTP status, text) of a site file; the status is a word when there was no answer."""
        host = urlsplit(url).hostname or ""
        with self.pace.turn(host) if self.pace else contextlib.nullcontext():
            try:
                resp = fetch(url, self.policy, self.limits, self.user_agent, truncate=True)
            except FetchError as exc:
                if exc.status is not None:
                    return exc.status, ""
                return exc.state, str(exc).split(": ", 1)[-1][:120]
        return resp.status, resp.body.decode("utf-8", "replace")

    def _cached(self, origin: str) -> dict | None:
        if not self.shared:
            return None
        path = os.path.join(self.shared, hashlib.sha1(origin.encode()).hexdigest() + ".json")
        try:
            with open(path) as f:
                doc = json.load(f)
            return {"robots": tuple(doc["robots"]) if self.robots else None,
                    "tdmrep": tuple(doc["tdmrep"]) if self.tdmrep else None}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _keep(self, origin: str, site: _Site) -> None:
        """Keep what the site said for the run's other processes (its raw answers, written atomically)."""
        if not self.shared or site.robots_outcome == "refused":
            return
        doc = {"origin": origin, "robots": list(site.answers[0]), "tdmrep": list(site.answers[1])}
        os.makedirs(self.shared, exist_ok=True)
        path = os.path.join(self.shared, hashlib.sha1(origin.encode()).hexdigest() + ".json")
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)


def _robots_site(status, text: str, counts: Counter) -> _Site:
    site = _Site()
    if status in ("refused_url", "bad_url"):  # the policy refuses the site: its images will be refused too
        site.robots_outcome = "refused"
    elif isinstance(status, int) and 200 <= status < 300:
        site.robots, site.robots_outcome, site.robots_text = Protego.parse(text), "parsed", text
    elif isinstance(status, int) and 400 <= status < 500 and status != 429:
        site.robots_outcome = "unavailable"
    else:
        site.robots_outcome = "unreachable"
        site.robots_detail = f"HTTP {status}" if isinstance(status, int) else f"{status}{': ' + text if text else ''}"
        site.robots_failure = "" if isinstance(status, int) else str(status)
    counts[f"robots_{site.robots_outcome}"] += 1
    return site


def _tdm_rules(status, text: str, counts: Counter) -> tuple:
    rules = []
    if isinstance(status, int) and 200 <= status < 300:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, list):
            for rule in doc:
                if isinstance(rule, dict) and isinstance(rule.get("location"), str):
                    reserved = str(rule.get("tdm-reservation", 0)).strip() == "1"
                    rules.append((_pattern(rule["location"]), rule["location"], reserved,
                                  str(rule.get("tdm-policy") or "")))
        counts["tdmrep_parsed" if doc is not None else "tdmrep_invalid"] += 1
    return tuple(rules)


def _disallow_rule(text: str, path: str, token: str) -> str:
    """`` (Disallow: /x)``: for the message only (protego decides), the longest Disallow pattern matching
    ``path`` in the group for ``token`` (else the ``*`` group); empty when none is found."""
    groups, agents, rules, in_rules = [], [], [], False
    for line in text.splitlines():
        key, _, value = line.split("#", 1)[0].partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "user-agent":
            if in_rules:
                groups.append((agents, rules))
                agents, rules, in_rules = [], [], False
            agents.append(value.lower())
        elif key in ("allow", "disallow"):
            in_rules = True
            rules.append((key, value))
    groups.append((agents, rules))
    token = token.lower()
    chosen = [r for a, r in groups if token in a] or [r for a, r in groups if "*" in a]
    matching = [v for rules in chosen for k, v in rules if k == "disallow" and v and _pattern(v).match(path)]
    return f" (Disallow: {max(matching, key=len)[:60]})" if matching else ""


def _robots_tag_refuses(value: str, token: str, directives: tuple[str, ...]) -> bool:
    """Whether one X-Robots-Tag header value opts out: ``noai``, or ``TOKEN: noai`` for our token."""
    value = value.strip().lower()
    token = token.lower()
    if ":" in value.split(",", 1)[0]:
        agent, _, rest = value.partition(":")
        if agent.strip() not in (token, "*"):
            return False
        value = rest
    return any(d.strip() in directives for d in value.split(","))


class Pace:
    """Per-host politeness of one download process: ``concurrency`` requests at once, ``interval`` seconds
    between request starts (across the processes sharing ``shared``, a local folder), raised to the host's
    robots.txt Crawl-delay (``delay_of(host)``) up to ``max_delay``."""

    def __init__(self, concurrency: int, interval: float, max_delay: float = 10.0, shared: str | None = None,
                 delay_of=None):
        self.concurrency, self.interval, self.max_delay = concurrency, interval, max_delay
        self.shared, self.delay_of = shared, delay_of
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._locks: defaultdict = defaultdict(threading.Lock)
        self._last: dict[str, float] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def turn(self, host: str, url: str = ""):
        host = (host or "").lower()
        with self._guard:
            slot = self._slots.setdefault(host, threading.BoundedSemaphore(self.concurrency))
            lock = self._locks[host]
        with slot:
            gap = max(self.interval, min(self.delay_of(url) if self.delay_of and url else 0.0, self.max_delay))
            if gap > 0:
                with lock:  # this process's requests to the host start one at a time, gap apart
                    self._wait(host, gap)
            yield

    def _wait(self, host: str, gap: float) -> None:
        if not self.shared:
            wait = self._last.get(host, 0.0) + gap - time.time()
            if wait > 0:
                time.sleep(wait)
            self._last[host] = time.time()
            return
        os.makedirs(self.shared, exist_ok=True)
        path = os.path.join(self.shared, hashlib.sha1(host.encode()).hexdigest() + ".pace")
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # the machine's other processes wait here for the same host
            try:
                f.seek(0)
                text = f.read().strip()
                last = float(text) if text else 0.0
                wait = last + gap - time.time()
                if wait > 0:
                    time.sleep(min(wait, gap))
                f.seek(0)
                f.truncate()
                f.write(f"{time.time():.6f}")
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
