"""The fixed training scales match DataComp's published values (scale_configs.py, paper Table 14)."""

import pytest

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.models.scales import SCALES, get
from winnow.pipeline.stages.train import from_scale


@pytest.mark.parametrize("name, model, batch, lr, warmup, seen, beta2", [
    ("small", "ViT-B-32", 4096, 5e-4, 500, 12_800_000, 0.98),
    ("medium", "ViT-B-32", 4096, 5e-4, 500, 128_000_000, 0.98),
    ("large", "ViT-B-16", 8192, 5e-4, 500, 1_280_000_000, 0.98),
    ("xlarge", "ViT-L-14", 90112, 1e-3, 10_000, 12_800_000_000, 0.95),
])
def test_datacomp_scales(name, model, batch, lr, warmup, seen, beta2):
    s = get(name)
    assert (s.model, s.batch_size, s.lr, s.warmup, s.samples_seen, s.beta2, s.wd, s.checkpoints) == \
        (model, batch, lr, warmup, seen, beta2, 0.2, 5)
    assert get("small").steps == 3125 and get("medium").steps == 31_250


def test_vitamin_of_matching_size_and_errors():
    assert [SCALES[n].arch("vitamin") for n in ("tiny", "small", "large", "xlarge")] == \
        ["winnow-tiny-vitamin", "ViTamin-S", "ViTamin-B", "ViTamin-L"]
    import open_clip

    from winnow.pipeline.models.registry import register
    register()
    assert all(SCALES[n].arch(a) in open_clip.list_models() for n in SCALES for a in ("clip", "vit", "vitamin"))
    assert SCALES["tiny"].arch("clip") == SCALES["tiny"].arch("vit") == "winnow-tiny-clip"
    with pytest.raises(UserError, match="unknown scale"):
        get("huge")
    with pytest.raises(UserError, match="--arch"):
        get("small").arch("resnet")


def test_train_config_takes_the_scale_values():
    cfg = from_scale("small", "vitamin", seed=3)
    assert (cfg.model, cfg.batch_size, cfg.samples_seen, cfg.epochs, cfg.seed) == ("ViTamin-S", 4096, 12_800_000, 5, 3)
