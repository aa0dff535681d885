"""Patch Mixing operations: exact fractions of foreign patches at the recorded positions, shuffles, drops."""

import os

import numpy as np
import pytest

from winnow.pipeline.evalsets.patchmix import (
    PatchmixConfig,
    blob_mask,
    build_patchmix,
    drop_patches,
    mix_patches,
    occlude,
    patch_count,
    shuffle_tiles,
)
from winnow.pipeline.tasks.curves import area_under_curve


def cells_equal_to(img, ref, grid):
    patch = img.shape[0] // grid
    return {y * grid + x for y in range(grid) for x in range(grid)
            if np.array_equal(img[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch],
                              ref[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch])}


@pytest.mark.parametrize("grid,side", [(7, 224), (14, 224), (7, 64), (14, 70)])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
def test_mix_puts_the_exact_fraction_of_foreign_patches_at_the_recorded_positions(grid, side, fraction):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
    other = rng.integers(128, 256, (side, side, 3), dtype=np.uint8)  # no pixel value in common with img
    out, cells = mix_patches(img, other, grid, fraction, np.random.default_rng(1))
    assert len(cells) == patch_count(fraction, grid) == round(fraction * grid * grid)
    assert cells_equal_to(out, other, grid) == set(cells.tolist())
    assert cells_equal_to(out, img, grid) == set(range(grid * grid)) - set(cells.tolist())
    edge = (side // grid) * grid
    assert np.array_equal(out[edge:], img[edge:]) and np.array_equal(out[:, edge:], img[:, edge:])
    again, cells2 = mix_patches(img, other, grid, fraction, np.random.default_rng(1))
    assert np.array_equal(again, out) and np.array_equal(cells, cells2)  # deterministic from the seed


@pytest.mark.parametrize("n", [4, 16, 64, 196])
def test_tile_shuffle_is_a_permutation_of_the_tiles(n):
    side = 224
    img = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out, perm = shuffle_tiles(img, n, np.random.default_rng(2))
    grid, patch = int(np.sqrt(n)), side // int(np.sqrt(n))
    assert sorted(perm.tolist()) == list(range(n))
    for i, j in enumerate(perm):
        y, x = divmod(i, grid)
        sy, sx = divmod(int(j), grid)
        assert np.array_equal(out[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch],
                              img[sy * patch:(sy + 1) * patch, sx * patch:(sx + 1) * patch])
    with pytest.raises(ValueError, match="square number"):
        shuffle_tiles(img, 10, np.random.default_rng(0))


def test_drop_fills_the_exact_cells_with_the_mean_colour():
    img = np.zeros((56, 56, 3), np.uint8)
    img[:, 28:] = 200
    out, cells = drop_patches(img, 7, 0.2, np.random.default_rng(3))
    assert len(cells) == 10
    patch = 8
    for c in cells:
        y, x = divmod(int(c), 7)
        assert (out[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch] == 100).all()


def test_area_under_curve_is_normalised():
    assert area_under_curve([0, 0.5], [0.8, 0.8]) == pytest.approx(0.8)
    assert area_under_curve([0, 0.25, 0.5], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        patch_count(1.5, 7)


@pytest.mark.e2e
def test_patchmix_evalset_from_the_tiny_world(tiny_world, tmp_path):

    import pandas as pd

    from winnow.pipeline.stages.evaluate import evaluate
    from winnow.pipeline.tasks import load_tasklist

    source = os.path.join(tiny_world["path"], "eval")
    tasks = build_patchmix(source, str(tmp_path / "pm"), PatchmixConfig(seed=3, size=56), log=lambda m: None)
    assert len(tasks) == 2 * 6 + 5 + 2 * 6 + 4
    manifest = pd.read_parquet(tmp_path / "pm" / "manifest.parquet")
    labels = dict(zip(manifest["key"], manifest["label"]))
    n_images = len(labels)
    assert len(manifest) == len(tasks) * n_images
    mix = manifest[manifest["condition"] == "mix-g7-r0.3"]
    assert (mix["cells"].str.split().map(len) == round(0.3 * 49)).all()
    assert all(labels[p] != lab for p, lab in zip(mix["partner"], mix["label"]))  # partner of another class
    again = build_patchmix(source, str(tmp_path / "pm2"), PatchmixConfig(seed=3, size=56), log=lambda m: None)
    assert [t["name"] for t in again] == [t["name"] for t in tasks]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "pm2" / "manifest.parquet"), manifest)
    occ = manifest[manifest["condition"] == "occlude-0.4"]["occluded"]
    assert ((occ - 0.4).abs() < 0.03).all()  # the real occluded share is recorded and near the target
    listed = load_tasklist(str(tmp_path / "pm" / "tasks.yaml"))
    picked = [t for t in listed if t.curve == "mix-g7"][:3]
    summary = evaluate("winnow-tiny-clip", "", picked, str(tmp_path / "ev"), device="cpu", log=lambda m: None)
    curve = summary["curves"]["mix-g7"]
    assert curve["x"] == [0.0, 0.1, 0.2] and len(curve["y"]) == 3 and 0 <= curve["auc"] <= 1
    assert summary["average"] is None  # curve points are diagnostics: reported by their area, not averaged


@pytest.mark.parametrize("level", [0.0, 0.2, 0.4, 0.6])
def test_occluder_covers_the_target_share_with_the_other_image(level):
    rng = np.random.default_rng(5)
    img = np.zeros((96, 96, 3), np.uint8)
    other = np.full((96, 96, 3), 255, np.uint8)
    out, real = occlude(img, other, level, rng)
    assert abs(real - level) < 0.02 and abs((out[..., 0] == 255).mean() - real) < 1e-9
    assert blob_mask(96, level, np.random.default_rng(5)).mean() == real  # deterministic from the seed


def test_training_mix_replaces_exactly_the_cells_it_reports_from_the_flipped_partner():
    import torch

    from winnow.pipeline.training.patchmix import mix_batch

    b, grid, side = 6, 7, 30  # 30 px: 4 px patches, a 2 px edge that is never mixed
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, side, side).clone()
    mixed, r, partner = mix_batch(images, prob=1.0, r_max=0.5, grid=grid, generator=torch.Generator().manual_seed(0))
    assert partner.tolist() == [5, 4, 3, 2, 1, 0]
    for i in range(b):
        foreign = mixed[i, 0] == partner[i]
        assert (mixed[i] == i).logical_or(mixed[i] == partner[i]).all()
        cells = foreign[:28, :28].reshape(grid, 4, grid, 4).float().mean(dim=(1, 3))
        assert set(cells.unique().tolist()) <= {0.0, 1.0}  # whole patches only
        assert float(cells.mean()) == float(r[i]) <= 0.5
        assert not foreign[28:].any() and not foreign[:, 28:].any()
    assert (r > 0).any()
    same, r0, _ = mix_batch(images, prob=0.0, r_max=0.5, grid=grid)
    assert torch.equal(same, images) and (r0 == 0).all()


def test_soft_clip_loss_interpolates_targets_by_area():
    import torch

    from winnow.pipeline.training.patchmix import soft_clip_loss

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    scale = torch.tensor(10.0)
    partner = torch.tensor([3, 2, 1, 0])
    plain = soft_clip_loss(img, txt, scale, torch.zeros(4), partner)
    labels = torch.arange(4)
    logits = scale * img @ txt.T
    clip = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(plain, clip)  # r = 0: CLIP's own loss
    r = torch.tensor([0.25, 0.0, 0.0, 0.5])
    mixed = soft_clip_loss(img, txt, scale, r, partner)
    lsm = torch.log_softmax(logits, dim=1)
    expected_img0 = -(0.75 * lsm[0, 0] + 0.25 * lsm[0, 3])
    w = torch.zeros(4, 4)
    w[range(4), range(4)] = 1 - r
    w[range(4), partner] += r
    t_txt = w.T / w.T.sum(dim=1, keepdim=True)
    loss_txt = -(t_txt * torch.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    loss_img = torch.stack([expected_img0, -lsm[1, 1], -lsm[2, 2], -(0.5 * lsm[3, 3] + 0.5 * lsm[3, 0])]).mean()
    assert torch.allclose(mixed, (loss_img + loss_txt) / 2)
