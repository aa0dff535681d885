"""An existing img2dataset pool is adopted without downloading again; broken layouts get clear errors."""

import os
import shutil

import pandas as pd
import pytest

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.pool import ledger
from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.stages.register import register
from winnow.pipeline.synth.server import WebPoolServer
from winnow.pipeline.synth.world import read_truth

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def img2dataset_pool(tiny_world, tmp_path_factory):
    from img2dataset import download

    root = tmp_path_factory.mktemp("i2d")
    truth = read_truth(tiny_world["path"])
    urls = pd.read_parquet(os.path.join(tiny_world["path"], "urls.parquet"))
    quick = urls[~truth["defect"].isin(["hang", "slow"]).to_numpy()].iloc[:50]
    quick.to_parquet(root / "urls.parquet")
    out = str(root / "pool")
    with WebPoolServer(tiny_world["path"], port=tiny_world["port"]):
        download(url_list=str(root / "urls.parquet"), output_folder=out, input_format="parquet", url_col="url",
                 caption_col="text", save_additional_columns=["uid"], output_format="webdataset",
                 processes_count=1, thread_count=8, number_sample_per_shard=20, image_size=512,
                 resize_mode="keep_ratio_largest", resize_only_if_bigger=True, timeout=2, retries=0,
                 distributor="multiprocessing")
    return out


def test_register_accepts_img2dataset_output_and_derives_the_ledger(img2dataset_pool):
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        doc = register(img2dataset_pool, runner)
    assert doc["stage"] == "register" and doc["shards"] == 3 and doc["rows"]["input"] == 50
    counts, total = ledger(img2dataset_pool)
    assert total == 50 and sum(counts.values()) == 50
    assert counts["ok"] == doc["rows"]["ok"] and counts.get("http_error", 0) > 0


def test_register_reports_broken_layouts(img2dataset_pool, tmp_path):

    broken = tmp_path / "broken"
    shutil.copytree(img2dataset_pool, broken)
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        os.remove(broken / "00001.parquet")
        with pytest.raises(UserError, match=r"00001: no parquet file"):
            register(str(broken), runner)
        os.remove(broken / "00001.tar")
        with pytest.raises(UserError, match=r"without gaps.*00001\.tar"):
            register(str(broken), runner)
        with open(broken / "00002.tar", "r+b") as f:
            f.truncate(700)
        shutil.copy(os.path.join(img2dataset_pool, "00001.parquet"), broken / "00001.parquet")
        shutil.copy(os.path.join(img2dataset_pool, "00001.tar"), broken / "00001.tar")
        with pytest.raises(UserError, match=r"00002\.tar"):
            register(str(broken), runner)
