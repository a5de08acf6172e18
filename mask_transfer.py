"""The mask model's own outputs (train.py --mask; Mokady et al., ICLR 2020): its grids, the
thresholded removal, soft and binary masks, and the mask scores of eval.py.

The mask decoder D_B gives a soft mask m in [0, 1]; a pixel is inside the binary mask when
m >= the threshold (MASK_THRESHOLD, the removal threshold of MB's removal.py, by default).
"""
import os

import torch

from data import write_image
from utils import UserError, save_tiles

MASK_THRESHOLD = 0.1                                       # eval.py --threshold's default
IOU_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # searched for the best IoU
UNCHANGED_LEVEL = 0.5 / 255   # a pixel is unchanged when no channel moves more (0-1 scale)


def check_threshold(threshold):
    """The threshold, or a UserError when it is not inside (0, 1)."""
    if not 0 < threshold < 1:
        raise UserError(f"--threshold {threshold} must be between 0 and 1 (exclusive)")
    return threshold


# ------------------------------------------------------------------------------------------------
# Removal and masks

@torch.no_grad()
def own_mask(model, x):
    """(soft mask (N, 1, R, R), common code) of images through D_B with their own codes."""
    common = model.common_encoder(x)
    return model.mask_of(common, model.separate_encoder(x)), common


@torch.no_grad()
def masked_removal(model, x, threshold=MASK_THRESHOLD):
    """(x with its masked pixels taken from D_A([common, 0]), soft mask). MB's removal.py passes
    x's own separate code to D_A, which only ever decoded zeros in training; zeros are used."""
    mask, common = own_mask(model, x)
    return torch.where(mask >= threshold, model.decode(common), x), mask


def mask_image(mask):
    """(N, 1, R, R) in [0, 1] -> (N, 3, R, R) in [-1, 1], a grey image for the grids."""
    return (2 * mask - 1).expand(-1, 3, -1, -1)


# ------------------------------------------------------------------------------------------------
# Grids written beside experiments_XXXXXX.png

@torch.no_grad()
def transfer_mask_tiles(model, x_a, x_b):
    """The transfer grid's layout with the masks: a blank corner, B along the top, then A_i and
    the mask of A_i's attribute on each B_j."""
    common_b, separate_a = model.common_encoder(x_b), model.separate_encoder(x_a)
    rows = [torch.cat([torch.zeros_like(x_b[:1]), x_b])]
    for i in range(x_a.shape[0]):
        separate = separate_a[i:i + 1].expand(x_b.shape[0], -1, -1, -1)
        rows.append(torch.cat([x_a[i:i + 1], mask_image(model.mask_of(common_b, separate))]))
    return torch.cat(rows)


@torch.no_grad()
def plain_render_tiles(model, x_a, x_b):
    """Rows A, D_A([common of A, 0]), B, D_A([common of B, 0])."""
    return torch.cat([x_a, model.remove(x_a), x_b, model.remove(x_b)])


@torch.no_grad()
def segmentation_tiles(model, x_a, threshold=MASK_THRESHOLD):
    """Rows A, A's soft mask, A's binary mask."""
    mask = own_mask(model, x_a)[0]
    return torch.cat([x_a, mask_image(mask), mask_image((mask >= threshold).float())])


def save_mask_grids(model, x_a, x_b, out, step, threshold=MASK_THRESHOLD):
    """masks_, d_a_ and segmentation_XXXXXX.png in `out`; returns [(name, path)]."""
    was_training = model.training
    model.eval()
    n = x_b.shape[0]
    grids = (("masks", transfer_mask_tiles(model, x_a, x_b), n + 1),
             ("d_a", plain_render_tiles(model, x_a, x_b), n),
             ("segmentation", segmentation_tiles(model, x_a, threshold), x_a.shape[0]))
    written = []
    for name, tiles, nrow in grids:
        written.append((name, os.path.join(out, f"{name}_{step:06d}.png")))
        save_tiles(tiles, written[-1][1], nrow=nrow)
    model.train(was_training)
    return written


# ------------------------------------------------------------------------------------------------
# eval.py --masks

def write_masks(model, x, names, out, threshold):
    """For each image x[k]: out/NAME_soft.png (m as grey levels) and out/NAME_mask.png (m >=
    threshold in white). Returns the paths written."""
    mask = own_mask(model, x)[0]
    written = []
    for name, m in zip(names, mask[:, 0]):
        for suffix, image in (("soft", m), ("mask", (m >= threshold).float())):
            written.append(os.path.join(out, f"{name}_{suffix}.png"))
            grey = (image * 255).round().byte().cpu().numpy()
            write_image(written[-1], grey[..., None].repeat(3, 2))
    return written


# ------------------------------------------------------------------------------------------------
# Scores: pixels kept outside the mask, IoU with true masks

def unchanged_outside_mask(transfers, bases, masks, threshold=MASK_THRESHOLD):
    """Share of the pixels outside the binary masks (m < threshold) where the transfer equals
    its base to within UNCHANGED_LEVEL in every channel. Images in [0, 1]."""
    outside = masks[:, 0] < threshold                                     # (N, R, R)
    same = (transfers - bases).abs().amax(1) <= UNCHANGED_LEVEL
    return float((same & outside).sum() / outside.sum().clamp_min(1))


def iou(soft, truth, threshold):
    """Intersection over union of (soft >= threshold) with the bool mask `truth`, pooled over
    every image (an image whose masks are both empty adds nothing)."""
    predicted = soft >= threshold
    union = (predicted | truth).sum()
    return float((predicted & truth).sum() / union) if union else 1.0


def iou_scores(soft, truth, threshold=MASK_THRESHOLD):
    """IoU at the default threshold and at the best of IOU_THRESHOLDS (MB's README searches it)."""
    by_threshold = {t: iou(soft, truth, t) for t in IOU_THRESHOLDS}
    best = max(by_threshold, key=by_threshold.get)
    return {"iou": iou(soft, truth, threshold), "threshold": threshold,
            "best_iou": by_threshold[best], "best_threshold": best}


@torch.no_grad()
def ground_truth_mask_scores(model, x_a, x_b, masks_a, transfer_masks, threshold=MASK_THRESHOLD):
    """Mask IoU against the demo's true masks: each A's own mask (segmentation) vs masks_A, and
    the mask of A_i's attribute on B_j vs transfer_masks[i, j]. True masks are bool tensors
    (N, 1, R, R) and (N, N, 1, R, R)."""
    soft_a = own_mask(model, x_a)[0].float().cpu()
    common_b, separate_a = model.common_encoder(x_b), model.separate_encoder(x_a)
    soft_t = torch.stack([model.mask_of(common_b, s.expand(len(x_b), -1, -1, -1)).float().cpu()
                          for s in separate_a.split(1)])                  # (N_A, N_B, 1, R, R)
    return {"segmentation": iou_scores(soft_a, masks_a, threshold),
            "transfer": iou_scores(soft_t, transfer_masks, threshold)}
