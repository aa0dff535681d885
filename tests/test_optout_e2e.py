"""A pool one may publish, end to end: opt-outs, politeness, blocklists and personal data at ingest.

A small world whose rows are clean except the safety plants (robots.txt disallowing paths for everyone and for
the token "winnow", a site whose robots.txt answers 503, one answering 404, a site whose tdmrep.json reserves its
images, images answered with a tdm-reservation header, a blocklisted image with re-encoded copies, captions with
personal data), served on four loopback addresses and ingested by img2dataset's downloader on the real Dask
LocalCluster. The server counts every request.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import fields, replace

import pandas as pd
import pytest
from helpers import free_port, tiny_ingest_config

from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.stages.ingest import ingest
from winnow.pipeline.stages.ledger import report
from winnow.pipeline.synth.server import WebPoolServer
from winnow.pipeline.synth.truth import ingest_check
from winnow.pipeline.synth.world import SITES, DefectRates, SafetyPlants, SynthConfig, build_world, read_truth

pytestmark = pytest.mark.e2e
HOSTS = ["127.0.0.1", *SITES]


def safety_config(port: int) -> SynthConfig:
    zero = {f.name: 0.0 for f in fields(DefectRates) if f.name not in ("bomb", "hang")}
    return SynthConfig(seed=3, n_pool=60, n_clean=4, n_eval_per_class=1, base_url=f"http://127.0.0.1:{port}",
                       chunk_size=60, rates=DefectRates(**zero, bomb=0, hang=0),
                       safety=SafetyPlants(robots_path=3, robots_token=2, robots_5xx=3, robots_4xx=2, tdmrep_file=3,
                                           tdm_header=2, blocklisted=1, blocklisted_copy=2, personal_caption=5))


@pytest.fixture(scope="module")
def published(tmp_path_factory, local_cluster):
    port = free_port()
    world, pool = str(tmp_path_factory.mktemp("safety-world")), str(tmp_path_factory.mktemp("safety-pool"))
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        build_world(safety_config(port), world, runner, log=lambda m: None)
    cfg = tiny_ingest_config(allow_hosts=HOSTS, blocklists=[os.path.join(world, "blocklist.txt")], shard_size=30)
    lines: list[str] = []
    with WebPoolServer(world, port=port) as server:
        doc = ingest(os.path.join(world, "urls.parquet"), pool, cfg, local_cluster, log=lines.append)
    table = pd.concat([pd.read_parquet(os.path.join(pool, n)) for n in sorted(os.listdir(pool))
                       if n.endswith(".parquet")])
    truth = read_truth(world).merge(table[["uid", "state", "error_message", "caption", "caption_pii", "key"]],
                                    on="uid")
    return {"world": world, "pool": pool, "cfg": cfg, "doc": doc, "hits": server.hits, "truth": truth,
            "lines": lines}


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def _host(url: str) -> str:
    return url.split("/")[2].split(":")[0]


def test_every_plant_ends_in_its_state(published):
    check = ingest_check(published["pool"], published["world"], published["cfg"]).set_index("defect")
    assert (check["matched"] == check["rows"]).all(), check.to_string()
    assert set(check.index) >= {"robots_path", "robots_token", "robots_5xx", "robots_4xx", "tdmrep_file",
                                "tdm_header", "blocklisted", "blocklisted_copy", "personal_caption"}
    truth = published["truth"].set_index("defect")
    assert truth.loc["robots_token", "error_message"].str.contains("for winnow .Disallow: /no-winnow/.").all()
    assert truth.loc["robots_5xx", "error_message"].str.contains("unreachable .HTTP 503.").all()
    assert truth.loc["tdmrep_file", "error_message"].str.contains("tdmrep.json").all()
    assert (truth.loc["robots_4xx", "state"] == "ok").all()  # 404: RFC 9309 allows everything


def test_opted_out_rows_are_never_requested(published):
    hits, truth = published["hits"], published["truth"]
    for defect in ("robots_path", "robots_token", "robots_5xx", "tdmrep_file"):
        rows = truth[truth["defect"] == defect]
        assert len(rows) and all(hits[_host(u), _path(u)] == 0 for u in rows["url"]), defect
    header = truth[truth["defect"] == "tdm_header"]  # the header comes with the answer: asked once, body unread
    assert all(hits[_host(u), _path(u)] == 1 for u in header["url"])
    ok = truth[truth["state"] == "ok"]
    assert all(hits[_host(u), _path(u)] == 1 for u in ok["url"])
    for host in HOSTS:  # each site's files are fetched once per run (the processes share what they read)
        assert hits[host, "/robots.txt"] == 1 and hits[host, "/.well-known/tdmrep.json"] == 1, host
    # robots.txt read on 127.0.0.1 and .5 (the world's file), 404 on .4, 503 on .3; one tdmrep.json (.5)
    assert published["doc"]["sites"] == {"robots_parsed": 2, "robots_unavailable": 1, "robots_unreachable": 1,
                                         "tdmrep_parsed": 1}


def test_blocked_bytes_reach_no_shard_and_no_message(published):
    truth, pool = published["truth"], published["pool"]
    blocked = truth[truth["state"] == "blocked"]
    assert set(blocked["defect"]) == {"blocklisted", "blocklisted_copy"}
    assert blocked[blocked["defect"] == "blocklisted_copy"]["error_message"].str.contains("PDQ").all()
    listed = [ln.split(":", 1)[1] for ln in open(os.path.join(published["world"], "blocklist.txt"))
              if ln[:1] not in "#\n"]
    members, digests = set(), set()
    for name in sorted(os.listdir(pool)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(pool, name)) as tar:
                for m in tar.getmembers():
                    members.add(m.name.split(".")[0])
                    if m.name.endswith(".jpg"):
                        digests.add(hashlib.sha256(tar.extractfile(m).read()).hexdigest())
    assert not set(blocked["key"]) & members
    text = "\n".join(published["lines"]) + report(pool) + truth["error_message"].fillna("").str.cat()
    for entry in listed:  # a list's entries are never printed
        assert entry.strip() not in text
    assert not {e.strip() for e in listed} & digests


def test_personal_data_is_masked_in_parquet_and_tar(published):
    truth, pool = published["truth"], published["pool"]
    personal = truth[truth["defect"] == "personal_caption"]
    assert personal["caption_pii"].notna().all()
    assert personal["caption"].str.contains(r"\[(email|phone|ip|card)\]").all()
    assert not personal["caption"].str.contains(r"@example|555 010|203\.0\.113|4111 1111").any()
    assert truth[truth["defect"] != "personal_caption"]["caption_pii"].isna().all()
    texts = []
    for name in sorted(os.listdir(pool)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(pool, name)) as tar:
                texts += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert not any("@example" in t or "4111 1111" in t for t in texts)
    line = next(ln for ln in report(pool).splitlines() if ln.startswith("captions with personal data"))
    assert line.startswith(f"captions with personal data: {len(personal)} (")
    assert published["doc"]["personal_data"]["captions"] == len(personal)


def test_pace_holds_the_interval_between_requests_to_a_host(tmp_path, local_cluster):
    """host_interval: consecutive requests to one host start at least that far apart, across two worker
    processes (the lower bound is the interval itself, less loopback latency's spread)."""
    port = free_port()
    cfg = replace(safety_config(port), n_pool=16, safety=SafetyPlants())
    world = str(tmp_path / "world")
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        build_world(cfg, world, runner, log=lambda m: None)
    ingest_cfg = tiny_ingest_config(shard_size=8, host_interval=0.5, robots_txt=False, tdmrep=False)
    with WebPoolServer(world, port=port) as server:
        ingest(os.path.join(world, "urls.parquet"), str(tmp_path / "pool"), ingest_cfg, local_cluster,
               log=lambda m: None)
    times = sorted(t for t, host, path in server.requests if path.startswith("/img/"))
    assert len(times) == 16
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.4, gaps


def test_robots_txt_off_downloads_what_it_would_refuse(tmp_path, local_cluster):
    port = free_port()
    world = str(tmp_path / "world")
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        build_world(safety_config(port), world, runner, log=lambda m: None)
    cfg = tiny_ingest_config(allow_hosts=HOSTS, robots_txt=False, tdmrep=False, personal_data="flag", shard_size=60)
    pool = str(tmp_path / "pool")
    with WebPoolServer(world, port=port):
        ingest(os.path.join(world, "urls.parquet"), pool, cfg, local_cluster, log=lambda m: None)
    check = ingest_check(pool, world, cfg).set_index("defect")
    assert (check["matched"] == check["rows"]).all(), check.to_string()
    table = pd.read_parquet(os.path.join(pool, "00000000.parquet"))
    table = table.merge(read_truth(world)[["uid", "defect"]], on="uid")
    personal = table[table["defect"] == "personal_caption"]
    assert personal["caption_pii"].notna().all() and personal["caption"].str.contains("@example|555|203|4111").all()
    assert (table[table["defect"].str.startswith("robots")]["state"] == "ok").all()


def test_ingest_blurs_detected_faces_and_drops_over_the_nsfw_limit(tmp_path, local_cluster):
    """ingest.blur_faces: the astronaut's face is blurred in the written image (the rest of it is the plain
    download's); ingest.nsfw_max: the detector runs on every image, and a benign image passes."""
    import numpy as np
    import skimage.data
    from PIL import Image

    site = tmp_path / "world" / "site"
    site.mkdir(parents=True)
    (site / "routes.json").write_text("{}")
    Image.fromarray(skimage.data.astronaut()).save(site / "astronaut.jpg", quality=95)
    Image.fromarray(skimage.data.coffee()).save(site / "coffee.jpg", quality=95)
    port = free_port()
    urls = tmp_path / "urls.parquet"
    pd.DataFrame({"url": [f"http://127.0.0.1:{port}/{n}.jpg" for n in ("astronaut", "coffee")],
                  "text": ["an astronaut", "a cup of coffee"]}).to_parquet(urls)
    images = {}
    with WebPoolServer(str(tmp_path / "world"), port=port):
        for name, extra in (("plain", {}), ("safe", {"blur_faces": True, "nsfw_max": 0.5})):
            pool = str(tmp_path / name)
            doc = ingest(str(urls), pool, tiny_ingest_config(**extra), local_cluster, log=lambda m: None)
            table = pd.read_parquet(os.path.join(pool, "00000000.parquet")).sort_values("caption")
            assert list(table["state"]) == ["ok", "ok"], table["error_message"].tolist()
            with tarfile.open(os.path.join(pool, "00000000.tar")) as tar:
                images[name] = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
            if name == "safe":
                assert doc["faces"] == {"faces_blurred": 1, "images_with_faces_blurred": 1}
    changed = images["safe"] - images["plain"]
    assert len(changed) == 1  # the coffee's bytes are the same; the astronaut's are not
    blurred = np.asarray(Image.open(io.BytesIO(changed.pop())).convert("L"), dtype=float)
    plain = [np.asarray(Image.open(io.BytesIO(b)).convert("L"), dtype=float) for b in images["plain"]]
    plain = next(p for p in plain if p.shape == blurred.shape)
    h, w = blurred.shape
    face = (slice(int(0.16 * h), int(0.29 * h)), slice(int(0.37 * w), int(0.5 * w)))
    legs = (slice(int(0.7 * h), h), slice(0, w))
    assert np.abs(blurred[face] - plain[face]).mean() > 10 * np.abs(blurred[legs] - plain[legs]).mean()


def test_the_datasheet_counts_equal_the_ledger(published, tmp_path):
    from winnow.pipeline.data.pool import ledger
    from winnow.workflows.datasheet import write

    md, page = write(published["pool"], str(tmp_path))
    text = open(md).read()
    counts, total = ledger(published["pool"])
    rows = {line.split("|")[1].strip(): int(line.split("|")[2].strip().replace(",", ""))
            for line in text.splitlines() if line.startswith("| ") and line.split("|")[2].strip()[:1].isdigit()}
    assert rows == counts and sum(rows.values()) == total == 60
    assert "opted_out" in rows and "blocked" in rows
    assert "5 captions (" in text and "masked" in text and "1 list(s)" in text
    listed = [ln.split(":", 1)[1].strip() for ln in open(os.path.join(published["world"], "blocklist.txt"))
              if ln[:1] not in "#\n"]
    html = open(page).read()
    assert not any(entry in text or entry in html for entry in listed)
    assert "(to be answered by the dataset" in html and html.count("to be answered") >= 6
