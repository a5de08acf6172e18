"""Ground truth for the synthetic demos of both methods, and a model's outputs scored against it.

The demo drawer makes every face from parameters (data.face_parameters), so it can also draw
what a perfect model would output: test B_j wearing test A_i's glasses (A_i's colour and lens
size, placed on B_j's eyes and fitted to its face width), and A_i without its glasses (the
perfect removal). `python data.py demo --dest DIR --ground_truth` writes, into
DIR/ground_truth/, for the first N test images of each domain at the demo's side S:
    transfers.npy       uint8 (N, N, S, S, 3)  [i, j] = B_j wearing A_i's glasses
    transfer_masks.npy  uint8 (N, N, S, S)     1 where [i, j] differs from B_j
    removals.npy        uint8 (N, S, S, 3)     A_i without its glasses
    masks_A.npy         uint8 (N, S, S)        1 where A_i differs from its removal
    meta.json           count, size, seed, n_train, n_test, colours (A_i's colour index)
`python eval.py --load RUN --ground_truth DIR` scores the run's model on DIR's test images
(a --mask model also by the IoU of its masks with masks_A and transfer_masks).
"""
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import data
from mask_transfer import MASK_THRESHOLD, ground_truth_mask_scores, masked_removal
from utils import UserError, save_tiles, write_json

GROUND_TRUTH_DIR = data.GROUND_TRUTH_DIR
GROUND_TRUTH_IMAGES = 32   # test images of each domain with ground truth (N x N transfers)
CHANGED_LEVEL = 8          # a pixel is in the changed region when a channel moves this much (/255)
CORE_LEVEL = 40            # a truth pixel within this of the glasses colour is lens, for colour
MONTAGE_PAIRS = 8          # rows of (A, B, prediction, truth) in the montage


# ------------------------------------------------------------------------------------------------
# Writing the ground truth

def demo_test_parameters(n_train, n_test, seed):
    """(face, glasses) parameters of every testA and testB image, replayed in make_demo's order
    (the same random stream, nothing rendered)."""
    rng = np.random.default_rng(seed)
    params = {}
    for split in data.SPLITS:
        count = n_train if split.startswith("train") else n_test
        drawn = [data.draw_face_parameters(rng, glasses=split.endswith("A")) for _ in range(count)]
        if split.startswith("test"):
            params[split] = drawn
    return params


def changed(a, b):
    """uint8 mask of the pixels where two renders differ visibly."""
    return (np.abs(a.astype(np.int16) - b).max(axis=2) >= CHANGED_LEVEL).astype(np.uint8)


def write_ground_truth(dest, n_train=2000, n_test=64, size=64, seed=0, count=GROUND_TRUTH_IMAGES):
    """Draw the ground truth of make_demo(dest, n_train, n_test, size, seed) into
    dest/ground_truth (layout in the module docstring); returns that folder."""
    count = min(count, n_test)
    params = demo_test_parameters(n_train, n_test, seed)
    faces_a, faces_b = params["testA"][:count], params["testB"][:count]
    folder = os.path.join(dest, GROUND_TRUTH_DIR)
    os.makedirs(folder, exist_ok=True)
    transfers = np.zeros((count, count, size, size, 3), np.uint8)
    transfer_masks = np.zeros((count, count, size, size), np.uint8)
    plain_b = [data.render_face(face, None, size) for face, _ in faces_b]
    for i, (_, glasses) in enumerate(tqdm(faces_a, desc="drawing ground truth", leave=False)):
        for j, (face, _) in enumerate(faces_b):
            transfers[i, j] = data.render_face(face, glasses, size)
            transfer_masks[i, j] = changed(transfers[i, j], plain_b[j])
    removals = np.stack([data.render_face(face, None, size) for face, _ in faces_a])
    with_glasses = [data.render_face(face, glasses, size) for face, glasses in faces_a]
    masks_a = np.stack([changed(a, r) for a, r in zip(with_glasses, removals)])
    for name, array in (("transfers", transfers), ("transfer_masks", transfer_masks),
                        ("removals", removals), ("masks_A", masks_a)):
        np.save(os.path.join(folder, f"{name}.npy"), array)
    write_json(os.path.join(folder, "meta.json"), dict(
        count=count, size=size, seed=seed, n_train=n_train, n_test=n_test,
        colours=[glasses["colour"] for _, glasses in faces_a]))
    return folder


# method -> (the arrays of its ground truth, the data.py command that draws it)
GROUND_TRUTH_KINDS = {"cd": (("transfers", "transfer_masks", "removals", "masks_A"), "demo"),
                      "overlord": (("faces", "labels", "translations", "changed_masks"),
                                   "demo_labeled")}


def read_ground_truth(root, method="cd"):
    """The arrays and meta.json of root/ground_truth (or of `root` itself, if it is that
    folder) drawn for `method`'s demo; UserError when they are not there or are another's."""
    names, command = GROUND_TRUTH_KINDS[method]
    folder = os.path.join(root, GROUND_TRUTH_DIR)
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        folder = root  # a prepared OverLORD set has a meta.json of its own, so look inside first
    draw = f"draw it with `python data.py {command} --dest {root} --ground_truth`"
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        raise UserError(f"--ground_truth {root!r}: no ground truth there; {draw}")
    with open(os.path.join(folder, "meta.json")) as f:
        truth = {"meta": json.load(f)}
    drawn_for = truth["meta"].get("method", "cd")  # the CD writer predates the field
    if drawn_for != method:
        raise UserError(f"--ground_truth {root!r} is the ground truth of the {drawn_for} demo, "
                        f"not of a {method} model's; {draw}")
    for name in names:
        truth[name] = np.load(os.path.join(folder, f"{name}.npy"))
    return truth


# ------------------------------------------------------------------------------------------------
# Scoring: region MSEs against the baselines, colour share, removal

def to_unit(images, side):
    """uint8 (..., S, S, 3) -> float tensor (..., 3, side, side) in [0, 1], area-resized."""
    flat = images.reshape(-1, *images.shape[-3:])
    resized = np.stack([data.resize_square(img, side) for img in flat])
    t = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255
    return t.reshape(*images.shape[:-3], 3, side, side)


def mask_at(masks, side):
    """uint8 (..., S, S) masks -> bool tensor (..., 1, side, side): any covered pixel counts."""
    flat = masks.reshape(-1, *masks.shape[-2:]).astype(np.float32)
    resized = np.stack([data.resize_square(m[..., None].repeat(3, 2), side)[..., 0]
                        for m in flat])
    return torch.from_numpy(resized > 0).reshape(*masks.shape[:-2], 1, side, side)


def region_mse(pred, truth, mask):
    """Mean squared error over the pixels of `mask` (broadcast over the channels)."""
    mask = mask.expand_as(truth).float()
    return float(((pred - truth) ** 2 * mask).sum() / mask.sum().clamp_min(1))


def nearest_colour(rgb, palette=data.GLASSES_COLOURS):
    """Index of the palette entry (default: GLASSES_COLOURS) nearest to an RGB triple (0-255)."""
    palette = torch.tensor(palette, dtype=torch.float32)
    return int(((palette - rgb) ** 2).sum(1).argmin())


def colour_share(pred, truth, colours):
    """Share of transfers [i, j] whose mean colour over the truth's lens pixels is nearest to
    A_i's glasses colour."""
    palette = torch.tensor(data.GLASSES_COLOURS, dtype=torch.float32) / 255
    hits, total = 0, 0
    for i, colour in enumerate(colours):
        core = ((truth[i] - palette[colour][:, None, None]).abs().amax(1)
                < CORE_LEVEL / 255)                                          # (N, R, R)
        for j in range(truth.shape[1]):
            if core[j].any():
                mean = pred[i, j][:, core[j]].mean(1) * 255
                hits += nearest_colour(mean) == colour
                total += 1
    return hits / max(total, 1)


@torch.no_grad()
def predictions(model, x_a, x_b, threshold=MASK_THRESHOLD):
    """(N_A, N_B, 3, R, R) in [0, 1]: pred[i, j] = B_j with A_i's separate code (a mask model
    composites onto B_j); and the removals of A, (N_A, 3, R, R) (a mask model's: inside its
    mask at `threshold`)."""
    common_b = model.common_encoder(x_b)
    separate_a = model.separate_encoder(x_a)
    pred = torch.stack([model.add(common_b, separate_a[i:i + 1].expand(len(x_b), -1, -1, -1),
                                  x_b) for i in range(len(x_a))])
    if model.cfg.mask:
        removed = masked_removal(model, x_a, threshold)[0]
    else:
        removed = model.decode(model.common_encoder(x_a))
    return (pred.clamp(-1, 1) + 1) / 2, (removed.clamp(-1, 1) + 1) / 2


def test_images(root, count, cfg):
    """The first `count` testA and testB images of `root` as the run's pipeline gives them."""
    paths = data.domain_paths(root, splits=("testA", "testB"))
    sets = [data.ImageFiles(paths[s][:count], cfg["crop"], cfg["resize"],
                            cfg.get("interpolation", "area")) for s in ("testA", "testB")]
    return [s.batch(range(count)) for s in sets]


def score_transfers(pred, removed, truth, b, side):
    """The scores of predictions (see predictions) against the ground truth at `side` px."""
    true_t, masks = to_unit(truth["transfers"], side), mask_at(truth["transfer_masks"], side)
    plain_b = b[None].expand_as(true_t)                    # the identity: B left unchanged
    blind = true_t.mean(0, keepdim=True).expand_as(true_t)  # the best guess that ignores A
    inside = {name: region_mse(p, true_t, masks) for name, p in
              (("prediction", pred), ("B", plain_b), ("blind", blind))}
    removals, masks_a = to_unit(truth["removals"], side), mask_at(truth["masks_A"], side)
    return {
        "region_mse": inside["prediction"], "outside_mse": region_mse(pred, true_t, ~masks),
        "transfer_gain": 1 - inside["prediction"] / inside["B"],
        "specific_gain": 1 - inside["prediction"] / inside["blind"],
        "colour_share": colour_share(pred, true_t, truth["meta"]["colours"]),
        "baselines": {"B": {"region_mse": inside["B"]}, "blind": {"region_mse": inside["blind"]}},
        "removal": {"mse": float(((removed - removals) ** 2).mean()),
                    "region_mse": region_mse(removed, removals, masks_a)}}


def montage_tiles(a, b, pred, truth_t, n=MONTAGE_PAIRS):
    """Rows of (A_i, B_j, prediction, truth) for n pairs spread over the set, in [0, 1]."""
    count = len(a)
    rows = []
    for k in range(min(n, count)):
        i, j = k, (3 * k + 1) % count
        rows += [a[i], b[j], pred[i, j], truth_t[i, j]]
    return torch.stack(rows)


def score_cd(model, cfg, root, out, threshold=MASK_THRESHOLD):
    """Score a CD model on root's ground truth: the dict of scores (written by the caller into
    metrics_eval.json) and the montage out/ground_truth_montage.png."""
    truth = read_ground_truth(root)
    count, side = truth["meta"]["count"], cfg["resize"]
    device = next(model.parameters()).device
    x_a, x_b = (x.to(device) for x in test_images(root, count, cfg))
    pred, removed = (t.float().cpu() for t in predictions(model, x_a, x_b, threshold))
    a, b = ((x.float().cpu() + 1) / 2 for x in (x_a, x_b))
    scores = {"images": count, "side": side, **score_transfers(pred, removed, truth, b, side)}
    if model.cfg.mask:
        scores["mask"] = ground_truth_mask_scores(
            model, x_a, x_b, mask_at(truth["masks_A"], side),
            mask_at(truth["transfer_masks"], side), threshold)
    path = os.path.join(out, "ground_truth_montage.png")
    save_tiles(montage_tiles(a, b, pred, to_unit(truth["transfers"], side)), path, nrow=4,
               value_range=(0.0, 1.0))
    return scores, path


# ------------------------------------------------------------------------------------------------
# OverLORD: held-out faces of the labelled demo, each drawn with every label's hair colour
#
# The labelled demo (data.make_demo_labeled) draws face i from the random stream [seed, i] with
# its label's hair colour forced, so the same stream with another colour is that face's perfect
# translation. `python data.py demo_labeled --dest DIR --size S --ground_truth` writes, into
# DIR/ground_truth/, for N faces that no demo set trains on (stream indices from HELD_OUT_INDEX)
# and the K labels of the demo (label k = the k-th of its hair colours, data.demo_hair):
#     faces.npy          uint8 (N, S, S, 3)     face n with its own hair colour
#     labels.npy         int64 (N,)             face n's own label
#     translations.npy   uint8 (N, K, S, S, 3)  [n, k] = face n with label k's hair colour
#     changed_masks.npy  uint8 (N, K, S, S)     1 where [n, k] differs from face n
#     meta.json          method "overlord", count, size, seed, first_index, labels (names),
#                        hair_rgb (each label's colour), glasses (per face)

OVERLORD_GROUND_TRUTH_FACES = 60  # at least; rounded up to whole blocks of every (label, glasses)
HELD_OUT_INDEX = 1_000_000        # stream index of the first held-out face; demo sets are smaller


def write_overlord_ground_truth(dest, size, seed, count=OVERLORD_GROUND_TRUTH_FACES, hair=None):
    """Draw the ground truth of the labelled demo of (size, seed, hair) into dest/ground_truth
    (layout above); returns that folder."""
    colours = data.demo_hair(hair)
    names = list(colours)
    block = 2 * len(names)                    # every label without glasses, then with them
    count = -(-count // block) * block
    own = np.arange(count) % len(names)
    glasses = np.arange(count) // len(names) % 2 == 1
    translations = np.zeros((count, len(names), size, size, 3), np.uint8)
    for n in tqdm(range(count), desc="drawing ground truth", leave=False):
        for k, name in enumerate(names):
            translations[n, k] = data.draw_demo_face(seed, HELD_OUT_INDEX + n, size,
                                                     bool(glasses[n]), colours[name],
                                                     with_mask=False)[0]
    faces = translations[np.arange(count), own]
    changed_masks = np.stack([[changed(t, face) for t in row]
                              for row, face in zip(translations, faces)])
    folder = os.path.join(dest, GROUND_TRUTH_DIR)
    os.makedirs(folder, exist_ok=True)
    for name, array in (("faces", faces), ("labels", own.astype(np.int64)),
                        ("translations", translations), ("changed_masks", changed_masks)):
        np.save(os.path.join(folder, f"{name}.npy"), array)
    write_json(os.path.join(folder, "meta.json"), dict(
        method="overlord", count=count, size=size, seed=seed, first_index=HELD_OUT_INDEX,
        labels=names, hair_rgb=[data.HAIR_COLOURS[colours[n]] for n in names],
        glasses=glasses.tolist()))
    return folder


def palette_share(pred, truth, targets, palette, within):
    """Share of images pred[m] whose mean colour over the truth's pixels near palette[targets[m]]
    (and inside `within`, (M, 1, R, R)) is nearest to that entry among the palette."""
    unit = torch.tensor(palette, dtype=torch.float32) / 255
    hits, total = 0, 0
    for m, target in enumerate(torch.as_tensor(targets).tolist()):
        core = within[m, 0] & ((truth[m] - unit[target][:, None, None]).abs().amax(0)
                               < CORE_LEVEL / 255)                                  # (R, R)
        if core.any():
            hits += nearest_colour(pred[m][:, core].mean(1) * 255, palette) == target
            total += 1
    return hits / max(total, 1)


def score_translations(pred, faces, truth, side):
    """The scores of translations pred (N, K, 3, R, R) of faces (N, 3, R, R), all in [0, 1],
    against the OverLORD ground truth at `side` px; the untranslated face is the baseline."""
    true_t = to_unit(truth["translations"], side)
    masks = mask_at(truth["changed_masks"], side)
    n, k = true_t.shape[:2]
    targets = torch.arange(k).expand(n, k)
    changes = targets != torch.from_numpy(truth["labels"])[:, None]         # (N, K) label moves
    identity = faces[:, None].expand_as(true_t)
    palette = truth["meta"]["hair_rgb"]

    def scores_of(p):
        region = region_mse(p[changes], true_t[changes], masks[changes])
        share = palette_share(p[changes], true_t[changes], targets[changes], palette,
                              masks[changes])
        return region, share

    region, share = scores_of(pred)
    identity_region, identity_share = scores_of(identity)
    return {"translations": int(changes.sum()), "region_mse": region,
            "outside_mse": region_mse(pred[changes], true_t[changes], ~masks[changes]),
            "transfer_gain": 1 - region / identity_region, "colour_share": share,
            "reconstruction_mse": float(((pred[~changes] - faces) ** 2).mean()),
            "baselines": {"identity": {"region_mse": identity_region,
                                       "colour_share": identity_share}}}


def translation_montage(faces, pred, truth_t, n=MONTAGE_PAIRS):
    """Rows of (face, then prediction and truth for each label) for the first n faces."""
    rows = []
    for face, p, t in zip(faces[:n], pred[:n], truth_t[:n]):
        rows += [face, *[tile for pair in zip(p, t) for tile in pair]]
    return torch.stack(rows)


def score_overlord(model, cfg, root, out):
    """Score an uncorrelated OverLORD model (amortised encoders) on root's ground truth by
    translating every held-out face to every label: the dict of scores and the montage
    out/ground_truth_montage.png."""
    from eval import label_names, translate_to_labels  # eval imports this module lazily too
    truth = read_ground_truth(root, "overlord")
    labels = truth["meta"]["labels"]
    if cfg["correlation"]:
        raise UserError(f"--ground_truth scores uncorrelated OverLORD models (translation by "
                        f"label); config {cfg['preset']} is {cfg['correlation']}")
    names = label_names(cfg)  # None when the run's data folder is gone
    if cfg["n_labels"] != len(labels) or names not in (None, labels):
        raise UserError(f"--ground_truth {root!r} is drawn for the labels {', '.join(labels)}; "
                        f"the model has {', '.join(names) if names else cfg['n_labels']}")
    side = cfg["img_shape"][0]
    device = next(model.parameters()).device
    faces = to_unit(truth["faces"], side)
    pred = translate_to_labels(model, faces.to(device), range(len(labels))).float().cpu()
    scores = {"images": len(faces), "side": side,
              **score_translations(pred, faces, truth, side)}
    path = os.path.join(out, "ground_truth_montage.png")
    save_tiles(translation_montage(faces, pred, to_unit(truth["translations"], side)), path,
               nrow=1 + 2 * len(labels), value_range=(0.0, 1.0))
    return scores, path
