"""Opt-outs, politeness, blocklists and personal data, one piece at a time (the end-to-end path is
``test_optout_e2e.py``)."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.personal import mask
from winnow.pipeline.synth.world import SynthConfig, _jpeg, _spec_for
from winnow.pipeline.web.blocklist import Blocklist, image_for_pdq, pdq_of
from winnow.pipeline.web.fetch import FetchLimits, UrlPolicy
from winnow.pipeline.web.optout import OptOuts, Pace, _robots_tag_refuses

LIMITS = FetchLimits(timeout=2.0, deadline=4.0, max_bytes=1 << 20, retries=0, max_redirects=3)


class _Sites(ThreadingHTTPServer):
    """Answers /robots.txt and /.well-known/tdmrep.json as told; counts requests."""

    daemon_threads = True

    def __init__(self, answers: dict):
        self.answers, self.hits = answers, []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):  # noqa: N802
                self.server.hits.append(self.path)
                status, body = self.server.answers.get(self.path, (404, b""))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


def _optouts(**kw) -> OptOuts:
    return OptOuts(UrlPolicy(("127.0.0.1",)), LIMITS, "test-agent", "winnow", **kw)


ROBOTS = b"User-agent: *\nDisallow: /private/\n\nUser-agent: winnow\nDisallow: /private/\nDisallow: /nw/\n"


@pytest.mark.parametrize("status, allowed", [(200, False), (404, True), (410, True), (503, False), (500, False),
                                             (429, False)])
def test_robots_outcomes_follow_rfc_9309(status, allowed):
    server = _Sites({"/robots.txt": (status, ROBOTS if status == 200 else b"")})
    try:
        refusal = _optouts(tdmrep=False).check(server.url("/nw/a.jpg"))
        assert (refusal is None) == allowed, refusal
        if not allowed:
            assert refusal.startswith("opted_out: robots.txt of http://127.0.0.1:")
    finally:
        server.shutdown()


def test_robots_rules_for_our_token_and_everyone_and_one_fetch_per_site():
    server = _Sites({"/robots.txt": (200, ROBOTS)})
    try:
        checks = _optouts(tdmrep=False)
        assert "(Disallow: /nw/)" in checks.check(server.url("/nw/x.jpg"))
        assert "(Disallow: /private/)" in checks.check(server.url("/private/x.jpg"))
        assert checks.check(server.url("/img/x.jpg")) is None
        other = OptOuts(UrlPolicy(("127.0.0.1",)), LIMITS, "test-agent", "otherbot", tdmrep=False)
        assert other.check(server.url("/nw/x.jpg")) is None  # only winnow's group disallows /nw/
        assert server.hits.count("/robots.txt") == 2  # once per OptOuts (no shared folder here)
    finally:
        server.shutdown()


def test_a_site_that_does_not_answer_is_a_network_failure_not_an_opt_out():
    checks = _optouts(tdmrep=False)
    refusal = checks.check("http://127.0.0.1:9/a.jpg")  # nothing listens on port 9
    assert refusal.startswith("connection_error: robots.txt of http://127.0.0.1:9 is unreachable")
    assert checks.counts["robots_unreachable"] == 1


def test_robots_is_shared_between_processes_through_a_folder(tmp_path):
    server = _Sites({"/robots.txt": (200, ROBOTS)})
    try:
        for _ in range(3):  # three processes' worth of OptOuts on one machine
            assert _optouts(tdmrep=False, shared=str(tmp_path)).check(server.url("/nw/x.jpg"))
        assert server.hits.count("/robots.txt") == 1
    finally:
        server.shutdown()


def test_tdmrep_first_matching_rule_and_the_header():
    rules = b'[{"location": "/free/*", "tdm-reservation": 0}, {"location": "/*.jpg$", "tdm-reservation": 1, ' \
            b'"tdm-policy": "https://example.org/p"}]'
    server = _Sites({"/.well-known/tdmrep.json": (200, rules)})
    try:
        checks = _optouts(robots=False)
        assert checks.check(server.url("/free/a.jpg")) is None  # the first rule that matches applies
        refusal = checks.check(server.url("/img/a.jpg"))
        assert "reserves TDM rights for /*.jpg$" in refusal and "https://example.org/p" in refusal
        assert checks.check(server.url("/img/a.jpg?x=1")) is None  # $ ends the path
    finally:
        server.shutdown()
    headers = Message()
    headers["tdm-reservation"] = "1"
    assert checks.headers(headers).startswith("opted_out: tdm-reservation header")


def test_x_robots_tag_directives():
    directives = ("noai", "noimageai")
    assert _robots_tag_refuses("noai", "winnow", directives)
    assert _robots_tag_refuses("winnow: noimageai, nofollow", "winnow", directives)
    assert not _robots_tag_refuses("otherbot: noai", "winnow", directives)
    assert not _robots_tag_refuses("noindex", "winnow", directives)


def test_pace_keeps_the_interval_and_the_concurrency_cap(tmp_path):
    pace = Pace(concurrency=2, interval=0.2, shared=str(tmp_path))
    starts, inside, peak = [], [0], [0]
    lock = threading.Lock()

    def request():
        with pace.turn("example.org"):
            with lock:
                starts.append(time.monotonic())
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.3)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=request) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts.sort()
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.2 - 0.01  # the clock's own resolution
    assert peak[0] <= 2


def test_blocklist_lines_are_checked_and_never_printed(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("# a comment\nsha256:" + "ab" * 32 + "\nmd5:zz-secret-entry\n")
    with pytest.raises(UserError) as err:
        Blocklist([str(bad)])
    assert "line 3" in str(err.value) and "secret" not in str(err.value)


def test_blocklist_matches_bytes_and_close_copies_only(tmp_path):
    cfg = SynthConfig()
    listed, other = _jpeg(_spec_for(cfg, 1, 11)), _jpeg(_spec_for(cfg, 1, 12))
    path = tmp_path / "list.txt"
    path.write_text(f"md5:{hashlib.md5(listed).hexdigest()}\npdq:{pdq_of(image_for_pdq(listed))}\n")
    blocklist = Blocklist([str(path)])
    assert blocklist.match_bytes(listed) == "blocked: the image's md5 is on blocklist 1"
    assert blocklist.match_bytes(other) is None
    img = Image.open(io.BytesIO(listed)).convert("RGB")
    buf = io.BytesIO()
    img.resize((img.width * 2 // 3, img.height * 2 // 3)).save(buf, "JPEG", quality=50)
    assert blocklist.match_bytes(buf.getvalue()) is None  # other bytes ...
    assert blocklist.match_image(image_for_pdq(buf.getvalue())).startswith("blocked: the image's PDQ hash")
    assert blocklist.match_image(image_for_pdq(other)) is None


@pytest.mark.parametrize("text, kinds", [
    ("write to jane.doe@example.com today", ["email"]),
    ("call +1 (555) 123-4567", ["phone"]),
    ("020 7946 0958 London", ["phone"]),
    ("card 4111 1111 1111 1111", ["card"]),
    ("from 203.0.113.42 or 2001:db8::1", ["ip", "ip"]),
    ("IMG_2019 1920x1080 (2019) 1080p red star", []),
    ("order 1234567890123 of 25.50 at 12:30:45", []),  # no Luhn, a price, a time
    ("version 1.2.3.4.5 and 999.1.1.1", []),
])
def test_personal_data_patterns(text, kinds):
    masked, found = mask(text)
    assert found == kinds
    for kind in kinds:
        assert f"[{kind}]" in masked
