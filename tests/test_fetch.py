"""The fetch function, the URL policy and the ingest input reader, on small cases with known answers."""

import io
import ipaddress
import socket
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.images import open_rgb, reencode_high_depth
from winnow.pipeline.data.uid import DuplicateFinder, uids_to_array
from winnow.pipeline.stages.ingest import IngestConfig, check_input, split_input
from winnow.pipeline.synth.hostile import HostileServer, images
from winnow.pipeline.web.fetch import FetchError, FetchLimits, UrlPolicy, address_kind, fetch, parse_url

LIMITS = FetchLimits(timeout=10, deadline=20, max_bytes=16 << 20, retries=2, max_redirects=5)


@pytest.mark.parametrize("address, kind", [
    ("8.8.8.8", None), ("2001:4860:4860::8888", None), ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.0.1", "private"), ("169.254.169.254", "link-local"),
    ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("100.64.0.1", "non-global"), ("240.0.0.1", "reserved"),
    ("::1", "loopback"), ("fe80::1", "link-local"), ("fd00::1", "private"), ("::", "unspecified"),
    ("::ffff:127.0.0.1", "loopback"), ("2002:7f00:1::1", "loopback"),  # IPv4-mapped, 6to4 of 127.0.0.1
    ("::ffff:169.254.169.254", "link-local"), ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
])
def test_address_kinds(address, kind):
    assert address_kind(ipaddress.ip_address(address)) == kind


def test_policy_allows_named_hosts_addresses_and_networks():
    policy = UrlPolicy(("127.0.0.1", "10.2.0.0/16", "Mirror.Internal"))
    ip = ipaddress.ip_address
    assert policy.refusal("x", ip("127.0.0.1")) is None and policy.refusal("x", ip("10.2.3.4")) is None
    assert policy.refusal("mirror.internal", ip("10.9.9.9")) is None
    assert "loopback" in policy.refusal("x", ip("127.0.0.2")) and "private" in policy.refusal("x", ip("10.3.0.1"))
    everything = UrlPolicy(allow_private_networks=True)
    assert everything.refusal("x", ip("10.3.0.1")) is None and everything.refusal("x", ip("0.0.0.0")) is not None


@pytest.mark.parametrize("url, state", [
    ("", "bad_url"), ("http://", "bad_url"), ("http://h:70000/", "bad_url"), ("file:///etc/passwd", "refused_url"),
    ("ftp://h/x", "refused_url"), ("javascript:alert(1)", "refused_url"), ("//h/x.jpg", "refused_url"),
])
def test_parse_url_refuses(url, state):
    with pytest.raises(FetchError) as info:
        parse_url(url)
    assert info.value.state == state and str(info.value).startswith(state + ":")


def test_parse_url_encodes_what_http_cannot_carry():
    assert parse_url("HTTP://u:p@Example.com/a b/café.jpg?q=é#frag") == (
        "http", "example.com", 80, "/a%20b/caf%C3%A9.jpg?q=%C3%A9")


def test_only_the_checked_address_is_connected_to(monkeypatch):
    """A host name that resolves to a refused and an allowed address: the socket goes to the allowed one only,
    the address that was checked (a second resolution, as in DNS rebinding, cannot change it)."""
    with HostileServer() as server:
        port = server.server_address[1]
        answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("10.0.0.1", "127.0.0.1")]
        calls, connected = [], []
        real_connect = socket.socket.connect

        def fake_getaddrinfo(host, *args, **kwargs):
            calls.append(host)
            return answers

        def spy_connect(self, address):
            connected.append(address)
            return real_connect(self, address)

        monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", spy_connect)
        resp = fetch(f"http://images.example:{port}/ok.jpg", UrlPolicy(("127.0.0.1",)), LIMITS)
        assert resp.body == server.files["ok.jpg"]
        assert connected == [("127.0.0.1", port)] and calls == ["images.example"]

        answers[:] = answers[:1]  # only a private address: refused without any connection
        connected.clear()
        with pytest.raises(FetchError, match="refused_url: 10.0.0.1 is a private address"):
            fetch(f"http://images.example:{port}/ok.jpg", UrlPolicy(("127.0.0.1",)), LIMITS)
        assert connected == []


def test_byte_cap_and_deadline_hold_with_small_limits():
    with HostileServer() as server:
        policy = UrlPolicy(("127.0.0.1",))
        size = len(server.files["ok.jpg"])
        with pytest.raises(FetchError, match="too_large"):
            fetch(f"{server.url}/ok.jpg", policy, replace(LIMITS, max_bytes=size - 1))
        assert len(fetch(f"{server.url}/ok.jpg", policy, replace(LIMITS, max_bytes=size)).body) == size
        with pytest.raises(FetchError, match="too_large: decoded body"):
            fetch(f"{server.url}/gzip_bomb", policy, replace(LIMITS, max_bytes=1 << 20))
        with pytest.raises(FetchError, match="timeout: no complete answer within the 1.5 s deadline"):
            fetch(f"{server.url}/trickle_headers", policy, replace(LIMITS, timeout=1, deadline=1.5))


# ---------------------------------------------------------------------------------------------- input reading
def test_duplicate_finder_marks_later_rows_whatever_the_batching(tmp_path):
    rng = np.random.default_rng(0)
    uids = [f"{x:032x}" for x in rng.integers(0, 50, 400)]  # many repeats
    rows = np.arange(400)
    expected = {}
    first = {}
    for r, u in zip(rows, uids):
        if u in first:
            expected[r] = first[u]
        else:
            first[u] = r
    for batches in ([slice(0, 400)], [slice(300, 400), slice(0, 300)], [slice(i, i + 7) for i in range(0, 400, 7)]):
        scratch = tmp_path / f"s{len(batches)}"
        scratch.mkdir()
        finder = DuplicateFinder(str(scratch), buckets=8)
        for b in batches:
            finder.add(uids_to_array(uids[b], sort=False), rows[b])
        later, firsts = finder.later()
        assert dict(zip(later.tolist(), firsts.tolist())) == expected


def test_caption_column_is_found_by_name(tmp_path):
    for name in ("text", "caption", "TEXT", "Caption"):
        pd.DataFrame({"url": ["http://h/a.jpg"], name: ["a"]}).to_csv(tmp_path / "u.csv", index=False)
        assert check_input(str(tmp_path / "u.csv"), IngestConfig())[1].caption_col == name
    pd.DataFrame({"URL": ["http://h/a.jpg"], "TEXT": ["a"]}).to_parquet(tmp_path / "laion.parquet")
    assert check_input(str(tmp_path / "laion.parquet"), IngestConfig())[1].url_col == "URL"
    pd.DataFrame({"url": ["http://h/a.jpg"], "text": ["a"], "caption": ["b"]}).to_csv(tmp_path / "u.csv", index=False)
    with pytest.raises(UserError, match="several possible columns"):
        check_input(str(tmp_path / "u.csv"), IngestConfig())
    assert check_input(str(tmp_path / "u.csv"), IngestConfig(caption_col="caption"))[1].caption_col == "caption"
    pd.DataFrame({"url": ["http://h/a.jpg"]}).to_csv(tmp_path / "u.csv", index=False)
    with pytest.raises(UserError, match="no caption column"):
        check_input(str(tmp_path / "u.csv"), IngestConfig())
    assert check_input(str(tmp_path / "u.csv"), IngestConfig(no_captions=True))[1].caption_col == ""


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_odd_bytes_in_captions_are_decoded_never_repr(tmp_path, fmt):
    """A UTF-8 list with one latin-1 byte: that caption gets U+FFFD, the others are untouched, in every format;
    with encoding=latin-1 the byte reads as é."""
    sep = {"csv": b",", "tsv": b"\t"}.get(fmt)
    if sep:
        data = sep.join([b"url", b"text"]) + b"\nhttp://h/1.jpg" + sep + b"caf\xe9\nhttp://h/2.jpg" + sep + b"plain\n"
        (tmp_path / f"u.{fmt}").write_bytes(data)
    elif fmt == "jsonl":
        (tmp_path / "u.jsonl").write_bytes(b'{"url": "http://h/1.jpg", "text": "caf\xe9"}\n'
                                           b'{"url": "http://h/2.jpg", "text": "plain"}\n')
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"url": ["http://h/1.jpg", "http://h/2.jpg"],
                                 "text": pa.array([b"caf\xe9", b"plain"], pa.binary())}), tmp_path / "u.parquet")
    for encoding, expected in (("utf-8", "caf\ufffd"), ("latin-1", "café")):
        files, cfg = check_input(str(tmp_path / f"u.{fmt}"), IngestConfig(encoding=encoding))
        pool = tmp_path / f"pool-{encoding}"
        split_input(files, str(pool), cfg)
        got = pd.read_feather(pool / "_inputs" / "00000000.feather")["caption"].tolist()
        assert got == [expected, "plain"]


# ---------------------------------------------------------------------------------------------------- images
def test_high_depth_images_become_correct_8bit():
    files = images()
    for name in ("grey16.png", "rgb16.png"):
        eight = Image.open(io.BytesIO(reencode_high_depth(files[name])))
        assert eight.mode in ("L", "RGB") and abs(np.asarray(eight, dtype=float).mean() - 128) < 1.5
        assert abs(np.asarray(open_rgb(files[name]), dtype=float).mean() - 128) < 1.5
    assert reencode_high_depth(files["ok.png"]) is None and reencode_high_depth(files["ok.jpg"]) is None
    rgb = np.asarray(open_rgb(files["palette.png"]), dtype=float)
    assert np.allclose(rgb.mean(axis=(0, 1)), [200, 30, 30])
    white = io.BytesIO()
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(white, "PNG")
    assert (np.asarray(open_rgb(white.getvalue())) == 255).all()  # transparent pixels on white, as ingest does
