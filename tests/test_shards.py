import io
import json

import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from winnow.pipeline.data import shards
from winnow.pipeline.data.uid import derive_uid


def _rows_and_images(n=5):
    rows, images = [], {}
    for i in range(n):
        key = f"00000003{i:04d}"
        ok = i != 2
        rows.append({"uid": derive_uid(f"u{i}", f"t{i}"), "key": key, "caption": f"a red star {i}", "url": f"u{i}",
                     "status": "success" if ok else "failed_to_download",
                     "error_message": None if ok else "HTTP Error 404: Not Found",
                     "width": 32 if ok else None, "height": 16 if ok else None,
                     "state": "ok" if ok else "http_error"})
        if ok:
            buf = io.BytesIO()
            Image.new("RGB", (32, 16), (i * 40, 0, 0)).save(buf, "JPEG")
            images[key] = buf.getvalue()
    return rows, images


def test_shard_round_trip_is_readable_by_webdataset_and_pyarrow(tmp_path):
    rows, images = _rows_and_images()
    stats = shards.write_shard(str(tmp_path), 3, rows, images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000003.parquet", "00000003.tar", "00000003_stats.json"]
    assert stats["count"] == 5 and stats["successes"] == 4 and stats["states"] == {"http_error": 1, "ok": 4}

    table = pq.read_table(tmp_path / "00000003.parquet").to_pandas()
    assert list(table["key"]) == [r["key"] for r in rows] and list(table["state"]).count("ok") == 4

    samples = list(wds.WebDataset(str(tmp_path / "00000003.tar"), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [r["key"] for r in rows if r["state"] == "ok"]
    for s in samples:
        row = next(r for r in rows if r["key"] == s["__key__"])
        assert s["jpg"].size == (32, 16) and s["txt"] == row["caption"] and s["json"]["uid"] == row["uid"]

    assert [s["__key__"] for s in shards.iter_tar(str(tmp_path / "00000003.tar"))] == [s["__key__"] for s in samples]
    assert json.loads((tmp_path / "00000003_stats.json").read_text())["successes"] == 4
    assert shards.list_shards(str(tmp_path)) == [3] and shards.is_complete(str(tmp_path), 3)
