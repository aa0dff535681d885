import io

import pytest
from PIL import Image

from winnow.pipeline.data.images import inspect_image, open_rgb
from winnow.pipeline.data.ledger import STATES, classify, format_counts
from winnow.pipeline.synth.render import bomb_png


@pytest.mark.parametrize("status, message, state", [
    ("success", None, "ok"),
    ("failed_to_download", "HTTP Error 404: Not Found", "http_error"),
    ("failed_to_download", "HTTP Error 500: Internal Server Error", "http_error"),
    ("failed_to_download", "timed out", "timeout"),
    ("failed_to_download", "<urlopen error timed out>", "timeout"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("failed_to_download", "unknown url type: ''", "bad_url"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "disallowed"),
    ("failed_to_download", "hash mismatch", "hash_mismatch"),
    ("failed_to_resize", "Image decoding error", "decode_error"),
    ("failed_to_resize", "image too small", "too_small"),
    ("failed_to_resize", "image area too large", "too_many_pixels"),
    ("failed_to_resize", "aspect ratio too large", "bad_aspect_ratio"),
    ("failed_to_resize", "stalled: no sample finished", "stalled"),
    ("failed_to_resize", "something nobody expected", "error"),
])
def test_classify_maps_every_known_message_to_one_state(status, message, state):
    assert classify(status, message) == state and state in STATES


def _jpeg(w=64, h=48):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


def test_inspect_accepts_complete_images():
    assert inspect_image(_jpeg()) is None
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    assert inspect_image(buf.getvalue()) is None


def test_inspect_refuses_html_truncation_garbage_and_bombs():
    assert classify("failed_to_resize", inspect_image(b"<!DOCTYPE html><html>")) == "not_an_image"
    data = _jpeg()
    assert classify("failed_to_resize", inspect_image(data[: len(data) // 2])) == "decode_error"
    assert classify("failed_to_resize", inspect_image(data[:4] + b"\x00" * 200 + data[204:])) == "decode_error"
    bomb = bomb_png()
    assert len(bomb) < 200_000  # a few KB on the wire ...
    assert classify("failed_to_resize", inspect_image(bomb)) == "too_many_pixels"  # ... 400 MP once decoded


def test_format_counts_states_the_invariant():
    text = format_counts({"ok": 8, "http_error": 2}, total_input=10)
    assert "holds" in text and "ok 8, failed 2" in text
    assert "BROKEN" in format_counts({"ok": 8}, total_input=10)


def test_draft_decoding_keeps_both_sides_at_least_the_requested_size():
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 30, 30)).save(buf, format="JPEG")
    full = open_rgb(buf.getvalue())
    assert full.size == (400, 300) and full.mode == "RGB"
    drafted = open_rgb(buf.getvalue(), draft_side=64)  # 1/4 scale: 100 x 75, both >= 64
    assert drafted.size == (100, 75) and drafted.mode == "RGB"
    assert open_rgb(buf.getvalue(), draft_side=200).size == (400, 300)  # 1/2 would make 150 < 200
    png = io.BytesIO()
    Image.new("L", (400, 300)).save(png, format="PNG")
    assert open_rgb(png.getvalue(), draft_side=64).size == (400, 300)  # draft mode is a JPEG feature
    with pytest.raises(ValueError, match="pixel cap"):
        open_rgb(buf.getvalue(), max_pixels=1000)
