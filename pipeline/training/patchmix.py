"""Patch Mixing as a training augmentation (Lee et al. 2023): foreign patches mixed into a training batch and
CLIP's contrastive targets interpolated by area. Installed into open_clip_train by
:mod:`winnow.pipeline.training.train_entry`
when ``TrainConfig.patch_mixing`` > 0; the eval-set side of Patch Mixing is :mod:`winnow.pipeline.evalsets.patchmix`."""

from __future__ import annotations


def mix_batch(images, prob: float, r_max: float, grid: int, generator=None):
    """Patch Mixing on a training batch (B, C, H, W): each image, with probability ``prob``, gets
    ``round(r * grid**2)`` patches (r ~ U(0, r_max)) from its partner at the same positions; partners pair the
    batch with its flip (i <-> B-1-i, as timm's Mixup). Returns (mixed batch, r actually used per image as
    replaced cells / grid**2, partner index per image)."""
    import torch

    b, _, h, w = images.shape
    partner = torch.arange(b - 1, -1, -1, device=images.device)
    on = torch.rand(b, generator=generator) < prob
    n_cells = torch.where(on, torch.round(torch.rand(b, generator=generator) * r_max * grid * grid),
                          torch.zeros(b)).long()
    ranks = torch.rand(b, grid * grid, generator=generator).argsort(dim=1).argsort(dim=1)
    cells = (ranks < n_cells[:, None]).view(b, 1, grid, grid).to(images.device)
    ph, pw = h // grid, w // grid
    mask = torch.zeros(b, 1, h, w, dtype=torch.bool, device=images.device)
    mask[:, :, :ph * grid, :pw * grid] = cells[:, :, :, None, :, None].expand(b, 1, grid, ph, grid, pw).reshape(
        b, 1, ph * grid, pw * grid)
    r = (n_cells.float() / (grid * grid)).to(images.device)
    r = torch.where(partner == torch.arange(b, device=images.device), torch.zeros_like(r), r)  # odd batch middle
    return torch.where(mask, images[partner], images), r, partner


def soft_clip_loss(image_features, text_features, logit_scale, r, partner, smoothing: float = 0.0):
    """CLIP's contrastive loss with Patch Mixing's area-interpolated targets: image i matches its own caption
    with weight 1 - r_i and its partner's caption with weight r_i (then label smoothing ``smoothing``); the
    text-to-image targets are the same weights, normalised per caption."""
    import torch

    b = image_features.shape[0]
    idx = torch.arange(b, device=image_features.device)
    weights = torch.zeros(b, b, device=image_features.device, dtype=image_features.dtype)
    weights[idx, idx] = 1 - r
    weights[idx, partner] += r
    logits = logit_scale * image_features @ text_features.T
    t_img = weights / weights.sum(dim=1, keepdim=True)
    t_txt = weights.T / weights.T.sum(dim=1, keepdim=True)
    if smoothing:
        t_img, t_txt = (t * (1 - smoothing) + smoothing / b for t in (t_img, t_txt))
    loss_img = -(t_img * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_txt = -(t_txt * torch.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_img + loss_txt) / 2
