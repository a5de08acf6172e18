"""Evaluate or apply a trained model of either method. No architecture flags: the checkpoint
carries its config, and its method decides what the flags mean.

Content disentanglement:
    python eval.py --load ./result                           # grids on the run's own test data
    python eval.py --data ./bald --load ./result --out ./eval
    python eval.py --load ./result --img person.png --reference glasses.png --output out.png
    python eval.py --load ./result --img person.png --remove --output plain.png
    python eval.py --load ./result --pairs pairs.csv         # rows: img,reference,output

OverLORD (after the amortisation stage):
    python eval.py --load ./ol --img face.png --output all.png        # every label, side by side
    python eval.py --load ./ol --img face.png --reference ref.png --output out.png
    python eval.py --load ./ol --pairs pairs.csv             # reference may be empty: all labels
    python eval.py --load ./ol                               # translation grids on its data
"""
import argparse
import csv
import os
import sys

import numpy as np
import torch

from data import (ImageFiles, LabelledImages, center_crop, check_images, domain_paths,
                  load_prepared, preprocess, read_image, resize_square, write_image)
from models import build_cd, build_overlord
from train import save_transfer_grid
from utils import (UserError, checkpoint_path, load_checkpoint, load_weights, make_output_dir,
                   pick_device, run_cli, save_tiles)

INTERPOLATION_STEPS = 6   # blend weights 0, 0.2, ..., 1
INTERPOLATION_B_IMAGES = 5


def build_parser():
    """I/O flags only: everything about the model comes from the checkpoint."""
    p = argparse.ArgumentParser(description=__doc__,
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
    a("--remove", action="store_true", help="apply mode: remove the attribute instead")
    a("--output", default="", help="apply mode: where to write the result (PNG or JPEG)")
    a("--pairs", default="", help="CSV of img,reference,output rows (reference may be empty "
      "with --remove); relative paths are taken from the CSV's folder")
    a("--bs", type=int, default=16, help="batch size of --pairs")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--image_root", default="", help="folder to find listed images in when their absolute "
      "paths do not exist")
    a("--skip_bad", action="store_true", help="drop unreadable or too-small test images")
    return p


BUILDERS = {"cd": build_cd, "overlord": build_overlord}


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
        rows.append(torch.cat([x_a[j:j + 1], model.decode(common, blends), x_a[i:i + 1]]))
    return torch.cat(rows)


@torch.no_grad()
def reconstruction_tiles(model, x, has_attribute):
    """Inputs, reconstructions and (for A) the same with the attribute removed, one row each."""
    common = model.common_encoder(x)
    rows = [x, model.decode(common, model.separate_encoder(x) if has_attribute else None)]
    if has_attribute:
        rows.append(model.decode(common))
    return torch.cat(rows)


def write_grids(model, step, sets, n, out):
    """Transfer grid, interpolation grids and reconstructions of the first n test images."""
    device = next(model.parameters()).device
    x_a, x_b = sets["testA"].batch(range(n)).to(device), sets["testB"].batch(range(n)).to(device)
    written = [os.path.join(out, f"experiments_{step:06d}.png")]
    save_transfer_grid(model, x_a, x_b, written[-1])
    for i in range(min(INTERPOLATION_B_IMAGES, n)):
        written.append(os.path.join(out, f"interpolation_{i}.png"))
        save_tiles(interpolation_tiles(model, x_a, x_b, i), written[-1], INTERPOLATION_STEPS + 2)
    for name, x, has_attribute in (("A", x_a, True), ("B", x_b, False)):
        written.append(os.path.join(out, f"reconstruction_{name}.png"))
        save_tiles(reconstruction_tiles(model, x, has_attribute), written[-1], nrow=n)
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
        sets[split] = ImageFiles(usable, cfg["crop"], cfg["resize"])
    run_folder = os.path.dirname(os.path.abspath(checkpoint_path(args.load)))
    out = make_output_dir(args.out or os.path.join(run_folder, "eval"))
    for path in write_grids(model, step, sets, n, out):
        print(path)


# ------------------------------------------------------------------------------------------------
# Apply to the user's own images

def load_input(path, cfg, what):
    """One image file as a model input tensor (1, 3, R, R), with clear errors."""
    img = read_image(path)
    if img is None:
        raise UserError(f"{what} {path!r}: missing or not a decodable image")
    if cfg["crop"] and min(img.shape[:2]) < cfg["crop"]:
        raise UserError(f"{what} {path!r} is {img.shape[1]}x{img.shape[0]}, smaller than the "
                        f"model's crop of {cfg['crop']} px")
    return preprocess(img, cfg["crop"], cfg["resize"])[None]


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
def apply(model, cfg, jobs, remove, bs, device):
    """Transfer (or remove) the attribute for every (img, reference, output) job, in batches."""
    for start in range(0, len(jobs), bs):
        chunk = jobs[start:start + bs]
        x = torch.cat([load_input(img, cfg, "image") for img, _, _ in chunk]).to(device)
        if remove:
            y = model.remove(x)
        else:
            ref = torch.cat([load_input(r, cfg, "reference") for _, r, _ in chunk]).to(device)
            y = model.transfer(x, ref)
        for (_, _, output), image in zip(chunk, y):
            folder = os.path.dirname(os.path.abspath(output))
            make_output_dir(folder, "output")
            write_image(output, to_uint8(image))
            print(output)


# ------------------------------------------------------------------------------------------------
# OverLORD: manipulation by label or by reference, translation grids

def overlord_input(path, size, what):
    """An image file as a (1, 3, S, S) tensor in [0, 1]: RGB, central square, resized to S."""
    img = read_image(path)
    if img is None:
        raise UserError(f"{what} {path!r}: missing or not a decodable image")
    img = resize_square(center_crop(img, 0), size)
    return torch.from_numpy(img.transpose(2, 0, 1).copy()).float()[None] / 255


@torch.no_grad()
def translate_to_every_label(model, x):
    """(N, K+1, 3, S, S): each image followed by G([E_u(x), L[k]]) for every label k, with the
    stage-1 label table (as the original)."""
    u = model.uncorrelated_encoder(x)
    labels = model.label_embedding.weight                                       # (K, label_dim)
    out = [x]
    for k in range(labels.shape[0]):
        out.append(model.amortized_generator(model.latent(u, labels[k].expand(len(x), -1))))
    return torch.stack(out, 1).clamp(0, 1)


@torch.no_grad()
def translate_by_reference(model, x, ref):
    """G([E_u(x), E_l(ref)(, E_c(ref))]): x with the label (and correlated) codes of ref."""
    _, label, correlated = model.amortized_codes(ref)
    return model.amortized_generator(model.latent(model.uncorrelated_encoder(x), label,
                                                  correlated)).clamp(0, 1)


def manipulate(model, cfg, jobs, bs, device):
    """Run (img, reference or '', output) jobs in batches; no reference = every label."""
    size = cfg["img_shape"][0]
    if any(not ref for _, ref, _ in jobs) and cfg["correlation"]:
        raise UserError(f"config {cfg['preset']} is correlated ({cfg['correlation']}): "
                        f"manipulation needs --reference (the by-label mode is for uncorrelated "
                        f"configs, as in the original)")
    for by_label in (True, False):
        group = [job for job in jobs if (not job[1]) == by_label]
        for start in range(0, len(group), bs):
            chunk = group[start:start + bs]
            x = torch.cat([overlord_input(img, size, "image") for img, _, _ in chunk]).to(device)
            if by_label:
                rows = translate_to_every_label(model, x)                  # (N, K+1, 3, S, S)
                images = [torch.cat(list(row), 2) for row in rows]          # side by side
            else:
                ref = torch.cat([overlord_input(r, size, "reference") for _, r, _ in chunk])
                images = translate_by_reference(model, x, ref.to(device))
            for (_, _, output), image in zip(chunk, images):
                make_output_dir(os.path.dirname(os.path.abspath(output)), "output")
                write_image(output, to_uint8(image, low=0.0))
                print(output)


def overlord_grids(model, cfg, args, device):
    """Translation grids (fixed image sample) and, for uncorrelated configs, all-label rows."""
    from train import GRID_IMAGES, collate_items, translation_tiles
    prepared = load_prepared(args.data or cfg["root"])
    if prepared.config_fields()["img_shape"] != cfg["img_shape"]:
        raise UserError(f"--data {args.data}: images of another size than the model's")
    dataset = LabelledImages(prepared, augment=cfg["augmentation"] if cfg["correlation"] else None,
                             with_masks=cfg["correlation"] == "localized")
    n = min(args.num_display or GRID_IMAGES, len(dataset))
    batch = collate_items(dataset, np.random.RandomState(0).choice(len(dataset), n, False), device)
    out = make_output_dir(args.out or os.path.join(
        os.path.dirname(os.path.abspath(checkpoint_path(args.load))), "eval"))
    written = [os.path.join(out, "translation.png")]
    save_tiles(translation_tiles(model, batch, "synthesis", cfg), written[-1], nrow=n + 1,
               value_range=(0.0, 1.0))
    if not cfg["correlation"]:
        rows = translate_to_every_label(model, batch["img"])
        written.append(os.path.join(out, "all_labels.png"))
        save_tiles(rows.flatten(0, 1), written[-1], nrow=rows.shape[1], value_range=(0.0, 1.0))
    for path in written:
        print(path)


def main_overlord(args, device):
    model, ckpt = load_model(args.load, device, "overlord")
    cfg, done = ckpt["config"], ckpt["done"]
    if "amortization" not in done:
        raise UserError(f"--load {args.load}: finished stages {done or 'none'}; manipulation "
                        f"needs the amortisation stage (train on, then try again)")
    if args.remove:
        raise UserError("--remove is for content-disentanglement models")
    if args.pairs:
        manipulate(model, cfg, read_pairs(args.pairs, remove=True), args.bs, device)
    elif args.img:
        if not args.output:
            raise UserError("--img needs --output (where to write the result)")
        manipulate(model, cfg, [(args.img, args.reference, args.output)], 1, device)
    else:
        overlord_grids(model, cfg, args, device)


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    device = pick_device(args.device)
    method = load_checkpoint(args.load)["config"].get("method")
    if args.method and args.method != method:
        raise UserError(f"--load {args.load} holds a {method} model, not {args.method}")
    if method == "overlord":
        return main_overlord(args, device)
    model, ckpt = load_model(args.load, device)
    cfg, step = ckpt["config"], ckpt["step"]
    if args.pairs:
        apply(model, cfg, read_pairs(args.pairs, args.remove), args.remove, args.bs, device)
    elif args.img:
        if not args.output:
            raise UserError("--img needs --output (where to write the result)")
        if not (args.reference or args.remove):
            raise UserError("--img needs --reference (an A image) or --remove")
        apply(model, cfg, [(args.img, args.reference, args.output)], args.remove, 1, device)
    else:
        evaluate_on_data(args, model, cfg, step)


if __name__ == "__main__":
    run_cli(main)
