"""Train content disentanglement (default) or OverLORD (--method overlord).

Content disentanglement (Press et al., ICLR 2019; kozistr's IN+ILN variant), A = images with the
attribute, B = without:
    python train.py --out ./result                              # built-in synthetic demo, CPU ok
    python train.py --root ./bald --out ./bald_result           # list files or trainA/... folders
    python train.py --load ./bald_result                        # resume where it stopped
    python train.py --root ./glasses --out ./mask_run --mask     # mask-based transfer (README)
Every --progress_iter a line goes to OUT/metrics.jsonl, every --display_iter a grid
OUT/experiments_XXXXXX.png, every --save_iter OUT/checkpoint.

OverLORD (Gabbay & Hoshen, ICCV 2021), images labelled by an attribute (see data.py to prepare):
    python train.py --method overlord --out ./ol                # synthetic demo, all three stages
    python train.py --method overlord --config ffhq --root ./prepared/ffhq --out ./ol_ffhq
    python train.py --method overlord --load ./ol_ffhq          # resume
    python train.py --method overlord --help                    # its own flags
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import (INTERPOLATIONS, EndlessBatches, LabelledImages, domain_paths, endless_loader,
                  load_prepared, make_demo, make_demo_labeled, open_image_set)
from mask_transfer import save_mask_grids
from models import (VGG16_WEIGHTS_FILE, VGG_MIN_SIDE, CDConfig, L1Distance, Lap1Distance,
                    VGGDistance, build_cd, build_overlord, composite, find_vgg_weights)
from utils import (RunningMeans, StopRequest, TensorBoard, UserError, any_process, append_jsonl,
                   average_gradients, average_values, checkpoint_path, close_distributed,
                   init_distributed, load_checkpoint, load_weights, main_process_first,
                   make_output_dir, restore_rng, rng_entries, run_cli, save_checkpoint,
                   save_tiles, seed_everything, strip_prefixes, write_json)

AE_CLIP_NORM = 5.0  # joint gradient-norm clip of both encoders and the decoder (as the seeds)

# Used when no --root is given: small synthetic faces, A = with glasses. Flags given explicitly
# still win. Sized so that a 2-core CPU shows the transfer in the grid within about 10 minutes.
DEMO_PRESET = dict(resize=32, crop=0, bs=16, iters=1500, sep=32, n_tot_feats=256, n_blocks=2,
                   display_iter=250, save_iter=250, progress_iter=50, num_display=8, n_threads=2,
                   lr=5e-4, d_lr=5e-4)

CD_DISTANCES = ("l2", "lap1", "vgg")        # --perceptual of CD (l2 = the seeds' MSE)
OVERLORD_DISTANCES = ("vgg", "lap1", "l1")  # --perceptual of OverLORD; its presets may say "auto"

# Fields that define the networks or their input: a resumed run must keep them.
ARCHITECTURE_KEYS = tuple(CDConfig.__dataclass_fields__) + ("crop", "interpolation")

# --reproduce kozistr: every behaviour of the seed's train.py at once (README, "Differences").
# The seed's loop comes with it: one call per encoder use, D unfrozen in the autoencoder step,
# the D step's codes recomputed with gradients, plain Adam, and its layer arithmetic (ILN as
# two normalised copies, nearest upsampling before the 3x3 conv). bench.py's seed row is this.
REPRODUCE = {"kozistr": dict(perceptual="l2", e2_feats=512, d_codes="recompute", d_clip=0.0,
                             sampler="epochs", interpolation="bilinear", amp="off",
                             channels_last=False, compile=False)}

# --mask: the loss weights of Mokady et al.'s README presets (eyewear = their code's defaults).
# Keys are this project's flags; MB's names: alpha1, alpha2, beta1 (cycle_common), beta2
# (cycle_separate), gama (gamma), delta, discweight (adv_weight, the seeds' name for it).
MASK_PRESETS = {
    "eyewear": {"alpha1": 0.7, "alpha2": 0.7, "cycle_common": 0.0, "cycle_separate": 0.001,
                "gamma": 7.0, "delta": 5.0, "adv_weight": 0.005},
    "smile": {"alpha1": 1.0, "alpha2": 1.0, "cycle_common": 0.0, "cycle_separate": 1e-4,
              "gamma": 7.0, "delta": 5.0, "adv_weight": 0.005},
    "blond_women": {"alpha1": 0.1, "alpha2": 0.1, "cycle_common": 0.0, "cycle_separate": 0.04,
                    "gamma": 1.0, "delta": 1.0, "adv_weight": 1.0},
    "bald_men": {"alpha1": 0.5, "alpha2": 0.5, "cycle_common": 0.0, "cycle_separate": 0.5,
                 "gamma": 5.0, "delta": 5.0, "adv_weight": 1.0}}

# --mask: each loss term and the flag that weights it.
MASK_LOSS_WEIGHTS = {"recon1_a": "gamma", "recon1_b": "delta", "cycle_common": "cycle_common",
                     "cycle_separate": "cycle_separate", "recon2_a": "alpha1",
                     "recon2_b": "alpha2", "adv": "adv_weight"}

# A run whose loss is not finite stops without saving. Under --amp fp16 the grad scaler skips
# the steps whose gradients overflow (normal), so only this many non-finite steps in a row count.
NONFINITE_STEPS = {"fp16": 20}


def build_parser():
    """Flags of kozistr's train.py (same names and defaults), plus device, seed, workers, fixes."""
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--root", default="", help="folder with trainA.txt trainB.txt testA.txt testB.txt or "
      "trainA/ trainB/ testA/ testB/; empty = the built-in synthetic demo (seed: ./bald/)")
    a("--out", default="./bald_result/", help="output folder for grids, metrics and checkpoint")
    a("--load", default="", help="resume from this run folder or checkpoint file (seed's default "
      "was the out folder, which crashed fresh runs)")
    a("--lr", type=float, default=1e-4, help="Adam learning rate of encoders + decoder")
    a("--d_lr", type=float, default=4e-4, help="Adam learning rate of the latent discriminator")
    a("--bs", type=int, default=4, help="batch size per domain")
    a("--iters", type=int, default=1_000_000, help="training iterations (stops exactly there)")
    a("--resize", type=int, default=CDConfig.resize, help="image side after the crop")
    a("--crop", type=int, default=178, help="central square crop before resizing; 0 = largest")
    a("--beta1", type=float, default=0.5, help="Adam beta1 (both optimisers)")
    a("--beta2", type=float, default=0.999, help="Adam beta2 (both optimisers)")
    a("--eps", type=float, default=1e-6, help="Adam eps (both optimisers)")
    a("--sep", type=int, default=CDConfig.sep, help="channels of the separate (attribute) code")
    a("--n_tot_feats", type=int, default=CDConfig.n_tot_feats, help="channels of the whole code")
    a("--n_blocks", type=int, default=CDConfig.n_blocks,
      help="encoder stride-2 blocks before the last (code side = resize / 2**(n_blocks+1))")
    a("--n_res_blocks", type=int, default=CDConfig.n_res_blocks, help="decoder residual blocks")
    a("--n_enc_res_blocks", type=int, default=CDConfig.n_enc_res_blocks,
      help="residual blocks of each encoder")
    a("--e2_feats", type=int, default=CDConfig.e2_feats,
      help="separate encoder base width; 512 reproduces kozistr's train.py exactly")
    a("--adv_weight", type=float, default=1e-3, help="weight of the adversarial term (with "
      "--mask: the preset's, MB's --discweight)")
    a("--perceptual", choices=CD_DISTANCES, default="l2", help="reconstruction distance: l2 "
      "(the seeds' MSE), lap1 (GLO's Laplacian-pyramid L1) or vgg (pixel + frozen VGG16 "
      "feature L1, as OverLORD; needs the weights)")
    a("--vgg_weights", default="", help=f"--perceptual vgg: path of {VGG16_WEIGHTS_FILE} "
      "(ImageNet VGG16); default: the torch hub cache. Never downloaded")
    mask_flags(a)
    a("--d_clip", type=float, default=5.0, help="gradient-norm clip of the discriminator; "
      "0 = none (the seeds' clip never ran)")
    a("--d_codes", choices=("reuse", "recompute"), default="reuse",
      help="discriminator step on the autoencoder step's common codes (reuse) or on codes of "
      "the just-updated encoder (recompute, the seeds' way: one more encoder pass)")
    a("--amp", choices=("off", "bf16", "fp16"), default="off",
      help="mixed precision: bf16 autocast, or fp16 with a gradient scaler (GPU)")
    a("--channels_last", action="store_true", help="NHWC memory format (faster on some GPUs)")
    a("--compile", action="store_true", help="torch.compile the networks (slow first steps)")
    a("--sampler", choices=("cycle", "epochs"), default="cycle", help="cycle: each domain runs "
      "through its own shuffled order, every image used; epochs: the seeds' zip of two shuffled "
      "loaders, each epoch as long as the smaller domain")
    a("--interpolation", choices=INTERPOLATIONS, default="area", help="resize: area to shrink, "
      "bicubic to enlarge (ours); bilinear: PIL's antialiased bilinear, as the seeds")
    a("--reproduce", choices=("", *REPRODUCE), default="", help="kozistr: the seed's train.py "
      "exactly, every setting at once (the README lists them); flags it sets must not differ")
    a("--cache_gb", type=float, default=8.0, help="keep decoded, resized images in a uint8 "
      "memory-mapped cache under OUT/cache when it needs at most this many GB; 0 = decode "
      "every time")
    a("--progress_iter", type=int, default=100, help="iterations between metrics lines")
    a("--display_iter", type=int, default=5000, help="iterations between sample grids")
    a("--save_iter", type=int, default=5000, help="iterations between checkpoints")
    a("--num_display", type=int, default=12, help="A and B test images in the sample grid")
    a("--tensorboard", action=argparse.BooleanOptionalAction, default=False, help="also log the "
      "metrics lines and grids to OUT/tensorboard (needs requirements-tensorboard.txt)")
    a("--n_threads", "--workers", dest="n_threads", type=int, default=6,
      help="DataLoader worker processes (0 = load in the main process)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--seed", type=int, default=0, help="seed of weights, data order and flips")
    a("--skip_bad", action="store_true", help="drop unreadable or too-small images with a warning")
    a("--image_root", default="", help="folder to find listed images in when their absolute "
      "paths do not exist (e.g. the seed's bald/*.txt)")
    return p


def mask_flags(a):
    """The --mask flags; each loss weight's default is the eyewear preset's."""
    eyewear = MASK_PRESETS["eyewear"]
    a("--mask", action="store_true", help="mask-based transfer (Mokady et al., ICLR 2020): a "
      "second decoder D_B adds the attribute only inside the mask it predicts (README)")
    a("--mask_preset", choices=tuple(MASK_PRESETS), default="eyewear", help="--mask: the loss "
      "weights of MB's README for eyewear (their defaults), smile, blond_women or bald_men; "
      "loss-weight flags given explicitly override it")
    for flag, mb_name, term in (
            ("gamma", "gama", "Recon1 of A: L1(D_B([cA,sA], D_A([cA,0])), A)"),
            ("delta", "delta", "Recon1 of B: L1(D_A([cB,0]), B)"),
            ("cycle_common", "beta1", "cycle: MSE(E1(transfer onto B), cB)"),
            ("cycle_separate", "beta2", "cycle: MSE(E2(transfer onto B), sA)"),
            ("alpha1", "alpha1", "Recon2 of A: L1(D_B([cA,sA], A), A)"),
            ("alpha2", "alpha2", "Recon2 of B: L1(D_B([cB,0], B), B)")):
        a(f"--{flag}", type=float, default=eyewear[flag],
          help=f"--mask: weight of {term} (MB's --{mb_name})")
    a("--mask_warmup", type=int, default=0, help="--mask: raise the two Recon2 weights from 0 "
      "over this many iterations (0 = from the start, as MB), so that D_B learns to draw the "
      "attribute before Recon2 closes its mask")


def explicit_flags(parser, argv):
    """dests of the flags written on the command line (so presets never override them)."""
    given = {arg.split("=")[0] for arg in argv if arg.startswith("-")}
    return {action.dest for action in parser._actions if given & set(action.option_strings)}


def resolve_config(argv):
    """Flags -> config dict: defaults, then the demo preset or the resumed run's config, then the
    flags written out. Returns (config, checkpoint or None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    cfg = vars(args)
    ckpt = None
    if args.load:
        ckpt = load_checkpoint(args.load, method="cd")
        for key, value in ckpt["config"].items():
            if key in cfg and key not in explicit and key != "load":
                cfg[key] = value
        for key in ARCHITECTURE_KEYS:
            if key in explicit and cfg[key] != ckpt["config"].get(key, cfg[key]):
                raise UserError(f"--load {args.load}: the checkpoint was trained with --{key} "
                                f"{ckpt['config'][key]}, not {cfg[key]} (drop the flag)")
        if ckpt.get("imported_from") and not cfg["root"]:
            raise UserError(f"--load {args.load}: a seed's checkpoint, which does not say where "
                            f"its data is: give --root")
    elif not args.root:
        cfg.update({k: v for k, v in DEMO_PRESET.items() if k not in explicit})
    if cfg["mask"] and cfg["reproduce"]:
        raise UserError(f"--reproduce {cfg['reproduce']} is the seed's loop, which has no mask "
                        f"decoder: drop --mask or --reproduce")
    if cfg["mask"] and cfg.get("perceptual", "l2") != "l2":
        raise UserError(f"--perceptual {cfg['perceptual']} is plain CD's reconstruction distance; "
                        f"--mask trains with Mokady et al.'s L1 and MSE terms: drop one of them")
    for key, value in REPRODUCE.get(cfg["reproduce"], {}).items():
        if key in explicit and cfg[key] != value:
            raise UserError(f"--reproduce {cfg['reproduce']} sets --{key} {value}; drop "
                            f"--{key} {cfg[key]}, or --reproduce")
        cfg[key] = value
    cfg["method"] = "cd"
    resolve_mask_flags(cfg, explicit, resumed=ckpt is not None)
    CDConfig.from_dict(cfg).validate()
    for key in ("bs", "iters", "progress_iter", "display_iter", "save_iter", "num_display"):
        if cfg[key] <= 0:
            raise UserError(f"--{key} must be positive")
    if cfg["n_threads"] < 0:
        raise UserError("--n_threads/--workers must be >= 0")
    return cfg, ckpt


def resolve_mask_flags(cfg, explicit, resumed):
    """Apply the --mask_preset to the loss weights not given explicitly (a resumed run keeps its
    own unless --mask_preset is given again); reject mask flags without --mask and bad values."""
    weights = [*MASK_PRESETS["eyewear"], "mask_preset", "mask_warmup"]
    if not cfg["mask"]:
        given = [k for k in weights if k in explicit and k != "adv_weight"]
        if given:
            raise UserError(f"--{given[0]} is a --mask setting: add --mask")
        return
    if not resumed or "mask_preset" in explicit:
        cfg.update({k: v for k, v in MASK_PRESETS[cfg["mask_preset"]].items()
                    if k not in explicit})
    for key in MASK_PRESETS["eyewear"]:
        if not (math.isfinite(cfg[key]) and cfg[key] >= 0):
            raise UserError(f"--{key} {cfg[key]} must be a finite number >= 0")
    if cfg["mask_warmup"] < 0:
        raise UserError(f"--mask_warmup {cfg['mask_warmup']} must be >= 0 (iterations)")


# ------------------------------------------------------------------------------------------------
# Losses and the training step

def adversarial_loss(logits, real):
    """Binary cross-entropy of logits against the constant label `real` (A = 1, B = 0)."""
    target = torch.full_like(logits, float(real))
    return F.binary_cross_entropy_with_logits(logits, target)


def r1_penalty(real_logits, real_images):
    """R1 = 0.5 * mean over the batch of |grad of D at the real images|^2 (graph kept)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return 0.5 * grad.pow(2).flatten(1).sum(1).mean()


def autoencoder_losses(model, x_a, x_b, adv_weight, distance=F.mse_loss):
    """Reconstruction of A and B (by `distance`, see reconstruction_distance) plus the term that
    pushes both common codes towards 'B'. Returns (losses, common codes of [A, B])."""
    n = x_a.shape[0]
    common = model.common_encoder(torch.cat([x_a, x_b]))  # (2N, T-S, r, r); IN is per sample
    separate_a = model.separate_encoder(x_a)               # (N, S, r, r)
    separate = torch.cat([separate_a, model.zero_separate(common[n:])])
    recon = model.decode(common, separate)
    logits = model.latent_disc(common)
    losses = {"recon_a": distance(recon[:n].float(), x_a),
              "recon_b": distance(recon[n:].float(), x_b),
              "adv": adversarial_loss(logits[:n].float(), 0)
              + adversarial_loss(logits[n:].float(), 0)}
    losses["ae"] = losses["recon_a"] + losses["recon_b"] + adv_weight * losses["adv"]
    return losses, common


def mask_autoencoder_losses(model, x_a, x_b, cfg, step=None):
    """Mokady et al.'s terms (SPEC D, README): D_A = model.decoder renders [common, 0], D_B =
    model.mask_decoder composites its content onto a base. Returns (losses, common codes of
    [A, B]); losses also holds the mean mask area of A (logged, not trained)."""
    n = x_a.shape[0]
    common = model.common_encoder(torch.cat([x_a, x_b]))  # (2N, T-S, r, r)
    common_a, common_b = common[:n], common[n:]
    separate_a = model.separate_encoder(x_a)
    plain = model.decode(common)                          # D_A([c, 0]) of A and B
    codes = torch.cat([torch.cat([common_a, separate_a], 1),
                       torch.cat([common_b, model.zero_separate(common_b)], 1),
                       torch.cat([common_b, separate_a], 1)])  # A, B, A's attribute on B
    masks, contents = model.mask_decoder(codes)
    (m_a, m_b, m_t), (y_a, y_b, y_t) = masks.chunk(3), contents.chunk(3)
    transferred = composite(m_t, y_t, x_b)
    # E1 of the transfer only feeds the cycle_common term; at weight 0 (every preset) it needs
    # no graph, and the column still shows its value
    cycle_grad = torch.enable_grad() if cfg["cycle_common"] else torch.no_grad()
    with cycle_grad:
        cycle_common = F.mse_loss(model.common_encoder(transferred).float(), common_b.float())
    logits = model.latent_disc(common)
    losses = {
        "recon1_a": F.l1_loss(composite(m_a, y_a, plain[:n]).float(), x_a),
        "recon1_b": F.l1_loss(plain[n:].float(), x_b),
        "cycle_common": cycle_common,
        "cycle_separate": F.mse_loss(model.separate_encoder(transferred).float(),
                                     separate_a.float()),
        "recon2_a": F.l1_loss(composite(m_a, y_a, x_a).float(), x_a),
        "recon2_b": F.l1_loss(composite(m_b, y_b, x_b).float(), x_b),
        "adv": adversarial_loss(logits[:n].float(), 0) + adversarial_loss(logits[n:].float(), 0)}
    ramp = recon2_ramp(cfg, step)
    losses["ae"] = sum(cfg[weight] * (ramp if term.startswith("recon2") else 1) * losses[term]
                       for term, weight in MASK_LOSS_WEIGHTS.items())
    losses["mask_area"] = m_a.detach().float().mean()
    return losses, common


def recon2_ramp(cfg, step):
    """The Recon2 terms' share of their weight: rising from 0 to 1 over --mask_warmup
    iterations (1 without a warm-up, or without a step: tests and eval)."""
    warmup = cfg.get("mask_warmup", 0)
    return 1.0 if not warmup or step is None else min(1.0, step / warmup)


def discriminator_loss(model, common, n):
    """The latent discriminator's loss on (detached) common codes: the first n are A."""
    logits = model.latent_disc(common).float()
    return adversarial_loss(logits[:n], 1) + adversarial_loss(logits[n:], 0)


class SignedToUnit(torch.nn.Module):
    """A distance of [0, 1] images applied to CD's [-1, 1] images."""

    def __init__(self, distance):
        super().__init__()
        self.distance = distance

    def forward(self, a, b):
        return self.distance((a + 1) / 2, (b + 1) / 2)


def reconstruction_distance(cfg, device):
    """CD's reconstruction distance of --perceptual: MSE (the seeds'; F.mse_loss itself, so the
    default is bit-identical), GLO's Lap1, or OverLORD's VGG16 distance on [0, 1] images."""
    if cfg["perceptual"] == "l2":
        return F.mse_loss
    if cfg["perceptual"] == "lap1":
        return Lap1Distance().to(device)
    if cfg["resize"] < VGG_MIN_SIDE:
        raise UserError(f"--perceptual vgg needs --resize {VGG_MIN_SIDE} or more (VGG16 halves "
                        f"the side five times), not {cfg['resize']}")
    offline = [kind for kind in CD_DISTANCES if kind != "vgg"]
    return SignedToUnit(vgg_distance(offline, weights_path=cfg["vgg_weights"])).to(device)


def to_floats(losses):
    """{name: float} of a step's scalar losses in one device transfer (one GPU sync, not one
    per loss)."""
    values = torch.stack([v.detach().float() for v in losses.values()]).tolist()
    return dict(zip(losses, values))


def optimise(optimizer, loss, clip=0.0, scaler=None):
    """Backward, gradients averaged over processes, optional norm clip, step; through the
    float16 grad scaler if given."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    average_gradients(params)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)


def autocast(device, amp):
    """The mixed-precision context of --amp (off, bf16, fp16) on `device`."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def seed_train_step(model, x_a, x_b, ae_opt, d_opt, cfg):
    """kozistr's iteration as written (SPEC A5), for --reproduce kozistr, in fp32. One call per
    encoder, decoder and D use. D is not frozen in the autoencoder step: the gradients it gets
    there are dropped by the D step's zero_grad, as in the seed. The D step recomputes both
    common codes with gradients (through E1, also as the seed) and clips at cfg["d_clip"]."""
    common_a, separate_a = model.common_encoder(x_a), model.separate_encoder(x_a)
    common_b = model.common_encoder(x_b)
    losses = {"recon_a": F.mse_loss(model.decode(common_a, separate_a), x_a),
              "recon_b": F.mse_loss(model.decode(common_b), x_b),
              "adv": adversarial_loss(model.latent_disc(common_a), 0)
              + adversarial_loss(model.latent_disc(common_b), 0)}
    losses["ae"] = losses["recon_a"] + losses["recon_b"] + cfg["adv_weight"] * losses["adv"]
    optimise(ae_opt, losses["ae"], AE_CLIP_NORM)

    common_a, common_b = model.common_encoder(x_a), model.common_encoder(x_b)
    losses["disc"] = (adversarial_loss(model.latent_disc(common_a), 1)
                      + adversarial_loss(model.latent_disc(common_b), 0))
    optimise(d_opt, losses["disc"], cfg["d_clip"])
    model.clamp_rho()
    return losses  # tensors (train_step turns them into floats)


def train_step(model, x_a, x_b, ae_opt, d_opt, cfg, scaler=None, distance=F.mse_loss,
               step=None):
    """One iteration: autoencoder step, discriminator step, ILN rho clamp. Returns float losses.

    cfg["d_codes"] = "reuse" trains the discriminator on the autoencoder step's common codes
    (detached); "recompute" runs the just-updated encoder again, as the seeds did.
    cfg["reproduce"] = "kozistr" runs the seed's loop instead (seed_train_step)."""
    if cfg.get("reproduce") == "kozistr":
        return to_floats(seed_train_step(model, x_a, x_b, ae_opt, d_opt, cfg))
    amp = autocast(x_a.device, cfg.get("amp", "off"))
    model.latent_disc.requires_grad_(False)
    with amp:
        if cfg.get("mask"):
            losses, common = mask_autoencoder_losses(model, x_a, x_b, cfg, step)
        else:
            losses, common = autoencoder_losses(model, x_a, x_b, cfg["adv_weight"],
                                                 distance)
    optimise(ae_opt, losses["ae"], AE_CLIP_NORM, scaler)

    model.latent_disc.requires_grad_(True)
    with amp:
        if cfg.get("d_codes", "reuse") == "recompute":
            with torch.no_grad():
                common = model.common_encoder(torch.cat([x_a, x_b]))
        losses["disc"] = discriminator_loss(model, common.detach(), x_a.shape[0])
    optimise(d_opt, losses["disc"], cfg["d_clip"], scaler)
    if scaler is not None:
        scaler.update()
    model.clamp_rho()
    return to_floats(losses)


def adam(params, lr, betas=(0.9, 0.999), eps=1e-8, fused=True):
    """Adam, fused into one kernel per step (the same update, less memory traffic)."""
    return torch.optim.Adam(params, lr, betas, eps=eps, fused=fused)


def cd_optimizers(model, cfg):
    """(encoders + decoder optimiser, discriminator optimiser), as kozistr's (and, under
    --reproduce kozistr, its plain Adam)."""
    betas, fused = (cfg["beta1"], cfg["beta2"]), cfg.get("reproduce") != "kozistr"
    return (adam(model.autoencoder_parameters(), cfg["lr"], betas, cfg["eps"], fused),
            adam(model.latent_disc.parameters(), cfg["d_lr"], betas, cfg["eps"], fused))


def save_and_exit(save, main, message):
    """After Ctrl-C or SIGTERM: save the clean checkpoint, say how to resume, exit 130."""
    save()
    if main:
        print(message, file=sys.stderr)
    sys.exit(130)


def first_nonfinite(losses):
    """(name, value) of the first loss that is NaN or infinite, else None."""
    return next(((k, v) for k, v in losses.items() if not math.isfinite(v)), None)


def finite_weights(model):
    """True when every parameter and buffer of `model` is finite (checked before each save)."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


class DivergenceWatch:
    """Counts non-finite steps in a row; `diverged` once there were `patience` of them."""

    def __init__(self, amp="off"):
        self.patience, self.run, self.last = NONFINITE_STEPS.get(amp, 1), 0, None

    def update(self, losses):
        bad = first_nonfinite(losses)
        self.run, self.last = (self.run + 1, bad) if bad else (0, self.last)
        return self.run >= self.patience

    def what(self):
        """What went wrong, for divergence_error."""
        if self.last is None:
            return "a loss on another process is not finite"
        run = f" for {self.patience} steps in a row" if self.patience > 1 else ""
        return f"the {self.last[0]} loss is {self.last[1]}{run}"


def divergence_error(what, where, saved, resume_hint):
    """The one line a diverged run stops with: which loss, when, what is kept, how to go on."""
    kept = (f"the last good checkpoint ({saved}) is kept" if saved
            else "no checkpoint had been saved yet")
    return UserError(f"training diverged: {what} at {where}; nothing was saved, {kept}; "
                     f"resume with a lower learning rate: {resume_hint}")


def compile_model(model):
    """torch.compile each CD network in place (checkpoints stay loadable: the '_orig_mod.'
    prefix is stripped on load)."""
    names = ["common_encoder", "separate_encoder", "decoder", "latent_disc"]
    for name in names + (["mask_decoder"] if model.cfg.mask else []):
        setattr(model, name, torch.compile(getattr(model, name)))
    return model


# ------------------------------------------------------------------------------------------------
# Grids

@torch.no_grad()
def transfer_tiles(model, x_a, x_b):
    """Tiles of the seeds' grid: a blank corner, B along the top, then per row A_i followed by
    decode(common of B_j, separate of A_i) for every j (mask model: composited onto B_j).
    Returns ((n+1)^2, 3, R, R)."""
    was_training = model.training
    model.eval()
    common_b, separate_a = model.common_encoder(x_b), model.separate_encoder(x_a)
    rows = [torch.cat([torch.zeros_like(x_b[:1]), x_b])]
    for i in range(x_a.shape[0]):
        separate = separate_a[i:i + 1].expand(x_b.shape[0], -1, -1, -1)
        rows.append(torch.cat([x_a[i:i + 1], model.add(common_b, separate, x_b)]))
    model.train(was_training)
    return torch.cat(rows)


def save_transfer_grid(model, x_a, x_b, path):
    """Write the transfer grid of `transfer_tiles` as a PNG."""
    save_tiles(transfer_tiles(model, x_a, x_b), path, nrow=x_b.shape[0] + 1)


# ------------------------------------------------------------------------------------------------
# Main

def load_domains(cfg):
    """Datasets of the four splits, every image checked once (and cached, see --cache_gb)."""
    paths = domain_paths(cfg["root"], cfg["image_root"])
    workers, cache_dir = max(2, cfg["n_threads"]), os.path.join(cfg["out"], "cache")
    sets = {s: open_image_set(p, cfg["crop"], cfg["resize"], s, cfg["skip_bad"], workers,
                              cache_dir, cfg["cache_gb"], cfg.get("interpolation", "area"))
            for s, p in paths.items()}
    for split in ("trainA", "trainB"):
        if len(sets[split]) < cfg["bs"]:
            raise UserError(f"{split} has {len(sets[split])} images, fewer than --bs {cfg['bs']}")
    for split in ("testA", "testB"):
        if len(sets[split]) < cfg["num_display"]:
            raise UserError(f"--num_display {cfg['num_display']} is more than the "
                            f"{len(sets[split])} images of {split}")
    return sets


def checkpoint_state(model, ae_opt, d_opt, step, cfg, scaler=None):
    """Everything a resumed run needs, in weights_only-loadable types (every process calls it:
    it gathers each one's random state)."""
    state = {"config": cfg, "step": step, **rng_entries(),
             "models": {"model": strip_prefixes(model.state_dict())},
             "optimizers": {"ae": ae_opt.state_dict(), "disc": d_opt.state_dict()}}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def shown_losses(cfg):
    """The losses on the progress bar: the total and D's, or (--mask) every term and the area."""
    if cfg["mask"]:
        return (*MASK_LOSS_WEIGHTS, "mask_area", "disc")
    return ("ae", "disc")


def lower_lr_hint(out, lr):
    """The command that resumes a diverged CD run at a tenth of its learning rate."""
    return f"python train.py --load {out} --lr {lr / 10:g}"


def main_cd(argv):
    """Train the content-disentanglement model."""
    cfg, ckpt = resolve_config(argv)
    rank, world, device = init_distributed(cfg["device"])
    main = rank == 0
    if cfg["bs"] % world:
        raise UserError(f"--bs {cfg['bs']} (the global batch) must be divisible by the "
                        f"{world} processes")
    out = make_output_dir(cfg["out"])
    board = TensorBoard(out, cfg["tensorboard"], main)
    seed_everything(cfg["seed"])

    # data (rank 0 draws the demo set and fills the cache first)
    with main_process_first(rank):
        if not cfg["root"]:
            cfg["root"] = make_demo(os.path.join(out, "demo_data"))
            if main:
                print(f"no --root: training on the synthetic demo set in {cfg['root']}")
        sets = load_domains(cfg)
    fixed_a = sets["testA"].batch(range(cfg["num_display"])).to(device)
    fixed_b = sets["testB"].batch(range(cfg["num_display"])).to(device)

    # networks and optimisers
    model = build_cd(cfg).to(device)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    scaler = torch.amp.GradScaler(device.type) if cfg["amp"] == "fp16" else None
    ae_opt, d_opt = cd_optimizers(model, cfg)
    distance = reconstruction_distance(cfg, device)

    # resume
    step = 0
    if ckpt is not None:
        load_weights(model, ckpt["models"]["model"], f"--load {cfg['load']}")
        ae_opt.load_state_dict(ckpt["optimizers"]["ae"])
        d_opt.load_state_dict(ckpt["optimizers"]["disc"])
        step = ckpt["step"]
        restore_rng(ckpt, rank, world, cfg["seed"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if main:
            print(f"resumed from {cfg['load']} at iteration {step}")
    if main:
        write_json(os.path.join(out, "config.json"), cfg)
    if cfg["compile"]:
        compile_model(model)

    per_epoch = None  # the seeds' epochs: both domains cut to the smaller one's full batches
    if cfg["sampler"] == "epochs":
        per_epoch = min(len(sets["trainA"]), len(sets["trainB"])) // cfg["bs"]
    shard = dict(workers=cfg["n_threads"], pin_memory=device.type == "cuda", rank=rank,
                 world=world, per_epoch=per_epoch)
    batches_a = endless_loader(sets["trainA"], cfg["bs"], cfg["seed"] * 2, step, **shard)
    batches_b = endless_loader(sets["trainB"], cfg["bs"], cfg["seed"] * 2 + 1, step, **shard)
    saved = f"iteration {step}" if ckpt is not None else ""

    def save():
        nonlocal saved
        if not any_process(not finite_weights(model))[0]:
            state = checkpoint_state(model, ae_opt, d_opt, step, cfg, scaler)
            if main:
                save_checkpoint(os.path.join(out, "checkpoint"), state)
            saved = f"iteration {step}"
            return
        raise divergence_error("the weights are not finite", f"iteration {step}", saved,
                               lower_lr_hint(out, cfg["lr"]))

    # loop
    model.train()
    means, tick, tick_step = RunningMeans(), time.time(), step
    watch, stopping = DivergenceWatch(cfg["amp"]), False
    bar = tqdm(total=cfg["iters"], initial=step, desc="cd", dynamic_ncols=True, disable=not main)
    with StopRequest() as stop:
        while step < cfg["iters"] and not stopping:
            try:
                x_a = next(batches_a).to(device, non_blocking=True, memory_format=memory_format)
                x_b = next(batches_b).to(device, non_blocking=True, memory_format=memory_format)
            except RuntimeError:
                if stop.requested:  # a loader worker ended by a signal (not one of ours)
                    stopping = True
                    break
                raise
            losses = train_step(model, x_a, x_b, ae_opt, d_opt, cfg, scaler, distance, step)
            step += 1
            stopping, diverged = any_process(stop.requested, watch.update(losses))
            if diverged:
                bar.close()
                raise divergence_error(watch.what(), f"iteration {step}", saved,
                                       lower_lr_hint(out, cfg["lr"]))
            means.update(losses)
            bar.update(1)
            last = step == cfg["iters"]
            if step % cfg["progress_iter"] == 0 or last:
                seconds = time.time() - tick
                img_per_s = 2 * cfg["bs"] * (step - tick_step) / max(seconds, 1e-9)
                record = {"step": step, **average_values(means.means()), "img_per_s": img_per_s,
                          "s_per_iter": seconds / max(step - tick_step, 1)}
                if main:
                    append_jsonl(os.path.join(out, "metrics.jsonl"), record)
                    board.scalars(record, step)
                bar.set_postfix({**{k: f"{record[k]:.4f}" for k in shown_losses(cfg)},
                                 "img_s": f"{img_per_s:.1f}"})
                means.reset()
                tick, tick_step = time.time(), step
            if (step % cfg["display_iter"] == 0 or last) and main:
                grid = os.path.join(out, f"experiments_{step:06d}.png")
                save_transfer_grid(model, fixed_a, fixed_b, grid)
                board.image_file("experiments", grid, step)
                if cfg["mask"]:
                    for name, path in save_mask_grids(model, fixed_a, fixed_b, out, step):
                        board.image_file(name, path, step)
            if step % cfg["save_iter"] == 0 or last:
                save()
    bar.close()
    if stopping:
        save_and_exit(save, main, f"stopped: checkpoint of iteration {step} saved in {out}; "
                                  f"resume with --load {out}")
    if main:
        print(f"done: {step} iterations; grids, metrics.jsonl and checkpoint in {out}")


# ================================================================================================
# OverLORD

STAGES = ("disentanglement", "amortization", "synthesis")

# The original's five configs (avivga/overlord config/*.yaml) and a small demo, as one nested dict
# each; data-derived fields (img_shape, n_imgs, n_labels) are added at train time.
_FFHQ = {
    "labeled_attribute": "age",
    "correlation": None,            # None, "pose-invariant" or "localized"
    "label_dim": 256, "uncorrelated_dim": 256, "correlated_dim": 0,
    "uncorrelated_std": 0.01,       # noise added to the per-image code in stage 1
    "augmentation": {"scale": [0.6, 1.0], "rotation": 0, "flip_horizontal": True},
    "perceptual": {"kind": "vgg", "layer_ids": [2, 7, 12, 21, 30], "normalize": True},
    "generator": {"channel_multiplier": 2, "max_width": 512},
    "encoder": {"base": 64, "max_width": 256},
    "discriminator": {"channel_multiplier": 2, "max_width": 512},
    "disentanglement": {
        "batch_size": 32, "n_epochs": 100, "n_epochs_between_visualizations": 1,
        "learning_rate": {"latent": 0.01, "encoder": 1e-4, "generator": 1e-3, "min": 1e-5},
        "loss_weights": {"reconstruction": 1.0, "uncorrelated_decay": 1e-4}},
    "amortization": {
        "batch_size": 64, "n_epochs": 50, "n_epochs_between_visualizations": 5,
        "learning_rate": {"max": 1e-4, "min": 1e-5}},
    "synthesis": {
        "batch_size": 16, "n_epochs": 100, "n_epochs_between_visualizations": 1,
        "learning_rate": {"generator": 1e-4, "discriminator": 1e-4},
        "loss_weights": {"reconstruction": 1.0, "latent": 10.0, "adversarial": 1.0}},
}


def _preset(**changes):
    """_FFHQ with nested changes, given as 'a.b' keys."""
    cfg = json.loads(json.dumps(_FFHQ))
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        node = cfg
        for part in path:
            node = node[part]
        node[key] = value
    return cfg


PRESETS = {
    "ffhq": _preset(),
    "celeba": _preset(labeled_attribute="identity", label_dim=512, uncorrelated_dim=64,
                      uncorrelated_std=0.1, disentanglement__n_epochs=50, synthesis__n_epochs=50),
    "afhq": _preset(labeled_attribute="domain", correlation="pose-invariant", label_dim=512,
                    uncorrelated_dim=64, correlated_dim=64, uncorrelated_std=0.1,
                    perceptual__normalize=False, disentanglement__batch_size=8,
                    disentanglement__n_epochs=200,
                    disentanglement__loss_weights={"reconstruction": 1.0,
                                                   "uncorrelated_decay": 0.1},
                    amortization__n_epochs=100),
    "celebahq": _preset(labeled_attribute="gender", uncorrelated_std=0.1,
                        disentanglement__loss_weights={"reconstruction": 1.0,
                                                       "uncorrelated_decay": 1e-5},
                        amortization__n_epochs=100),
    "celebahq_hair": _preset(labeled_attribute="gender", correlation="localized",
                             correlated_dim=64, uncorrelated_std=0.1,
                             augmentation={"scale": [0.8, 1.0], "rotation": 0,
                                           "flip_horizontal": True},
                             disentanglement__batch_size=16,
                             disentanglement__loss_weights={"reconstruction": 1.0,
                                                            "uncorrelated_decay": 0.1},
                             amortization__n_epochs=100),
    # small widths and few epochs: the three stages on a 2-core CPU in about 10 minutes;
    # "auto" perceptual = VGG16 if its weights are on disk, else the Lap1 fallback (with a note;
    # on the 64-px demo's ground truth Lap1 beat L1, README "Against ground truth")
    "demo": _preset(labeled_attribute="hair_colour", label_dim=32, uncorrelated_dim=32,
                    uncorrelated_std=0.1, perceptual__kind="auto",
                    generator={"channel_multiplier": 2, "max_width": 64},
                    encoder={"base": 16, "max_width": 64},
                    discriminator={"channel_multiplier": 2, "max_width": 64},
                    disentanglement__batch_size=16, disentanglement__n_epochs=80,
                    disentanglement__n_epochs_between_visualizations=20,
                    disentanglement__loss_weights={"reconstruction": 1.0,
                                                   "uncorrelated_decay": 1e-3},
                    amortization__batch_size=32, amortization__n_epochs=10,
                    amortization__n_epochs_between_visualizations=5,
                    amortization__learning_rate={"max": 1e-3, "min": 1e-5},
                    synthesis__n_epochs=4, synthesis__n_epochs_between_visualizations=2),
}
DEMO_SIZE = 32  # side of the synthetic demo images (the demo preset's networks are sized for it)


def apply_override(cfg, assignment):
    """Apply one --set a.b.c=value in place: the key must exist and the type must match."""
    import ast
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. "
                        f"disentanglement.batch_size=8")
    dotted, text = assignment.split("=", 1)
    *path, key = dotted.strip().split(".")
    node = cfg
    for part in path:
        if not isinstance(node.get(part) if isinstance(node, dict) else None, dict):
            raise UserError(f"--set {dotted}: unknown key {part!r}")
        node = node[part]
    if key not in node or isinstance(node[key], dict):
        known = ", ".join(k for k in node if not isinstance(node[k], dict))
        raise UserError(f"--set {dotted}: unknown key {key!r} (known here: {known})")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    old = node[key]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if text.strip() == "null":
        value = None
    nullable = old is None or key == "correlation"
    if value is None and not nullable:
        raise UserError(f"--set {dotted}={text}: expected a {type(old).__name__} like {old!r}")
    if old is not None and value is not None and type(value) is not type(old):
        raise UserError(f"--set {dotted}={text}: expected a {type(old).__name__} like {old!r}")
    node[key] = value


def build_overlord_parser():
    """Flags of OverLORD training: I/O and run control; the method's knobs live in PRESETS."""
    p = argparse.ArgumentParser(prog="train.py --method overlord", allow_abbrev=False,
                                description="Train OverLORD: latent optimisation, amortisation, "
                                "synthesis. Knobs come from --config and --set.")
    a = p.add_argument
    a("--config", choices=sorted(PRESETS), default=None,
      help="named preset (default: demo without --root)")
    a("--root", default="", help="prepared labelled data (python data.py ...); empty = demo set")
    a("--out", default=None, help="run folder: grids, metrics.jsonl, config.json, checkpoint "
      "(default: the --load run's folder, else ./ol)")
    a("--load", default="", help="resume from this run folder or checkpoint file")
    a("--stage", choices=STAGES, default=None,
      help="run only this stage (from --load for the later stages); default: all remaining")
    a("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
      help="override a config field, e.g. --set disentanglement.batch_size=8 (repeatable)")
    a("--vgg_weights", default="", help=f"path of {VGG16_WEIGHTS_FILE} (ImageNet VGG16); "
      "default: the torch hub cache. Never downloaded")
    a("--perceptual", choices=OVERLORD_DISTANCES, default=None,
      help="reconstruction distance: vgg (the original), lap1 (GLO's Laplacian-pyramid L1) or "
      "l1 (pixel L1); lap1 and l1 need no weights")
    a("--workers", type=int, default=2, help="DataLoader worker processes")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--seed", type=int, default=0, help="seed of codes, weights, data order and augmentation")
    a("--tensorboard", action=argparse.BooleanOptionalAction, default=None, help="also log the "
      "metrics lines and grids to OUT/tensorboard (needs requirements-tensorboard.txt; default: "
      "as the --load run, else off)")
    return p


def resolve_overlord_config(argv):
    """(config, run flags, checkpoint or None) from the flags: preset or resumed config, then
    --set overrides, then the prepared data's fields."""
    args = build_overlord_parser().parse_args(argv)
    ckpt = None
    if args.out is None:
        args.out = os.path.dirname(os.path.abspath(checkpoint_path(args.load))) if args.load \
            else "./ol"
    if args.load:
        ckpt = load_checkpoint(args.load, method="overlord")
        cfg = ckpt["config"]
        if args.config and args.config != cfg["preset"]:
            raise UserError(f"--load {args.load}: that run used --config {cfg['preset']}")
        args.root = args.root or cfg["root"]
        if ckpt.get("imported_from") and not args.root:
            raise UserError(f"--load {args.load}: an original OverLORD model, which does not say "
                            f"where its data is: give --root (a prepared set)")
    else:
        name = args.config or ("demo" if not args.root else None)
        if name is None:
            raise UserError(f"--root given without --config; choose one of {', '.join(PRESETS)}")
        cfg = json.loads(json.dumps(PRESETS[name]))
        cfg["preset"] = name
    for assignment in args.overrides:
        apply_override(cfg, assignment)
    if args.perceptual:
        cfg["perceptual"]["kind"] = args.perceptual
    if args.tensorboard is not None:
        cfg["tensorboard"] = args.tensorboard
    cfg.setdefault("tensorboard", False)
    if cfg["correlation"] not in (None, "pose-invariant", "localized"):
        raise UserError(f"correlation {cfg['correlation']!r}: use null, pose-invariant or "
                        f"localized")
    if cfg["correlation"] and cfg["correlated_dim"] <= 0:
        raise UserError("a correlated config needs correlated_dim > 0")
    check_batch_sizes(cfg, world=1)
    cfg.update(method="overlord", out=args.out, seed=cfg.get("seed", args.seed))
    return cfg, args, ckpt


def check_batch_sizes(cfg, world):
    """Before any stage runs: every stage's global batch splits evenly over the `world`
    processes, and each process's share of the synthesis batch suits the discriminator's
    minibatch-stddev (groups of min(batch, 4) images)."""
    for stage in STAGES:
        bs = cfg[stage]["batch_size"]
        if bs <= 0 or bs % world:
            raise UserError(f"{stage}.batch_size {bs} (the global batch) must be a positive "
                            f"multiple of the {world} processes")
    share = cfg["synthesis"]["batch_size"] // world
    if share % min(share, 4):
        each = f" ({share} on each of {world} processes)" if world > 1 else ""
        raise UserError(f"synthesis.batch_size {cfg['synthesis']['batch_size']}{each}: the "
                        f"discriminator's minibatch-stddev needs a multiple of 4 (or fewer "
                        f"than 4) images per process")


def vgg_distance(offline, layer_ids=None, normalize=True, weights_path=""):
    """VGGDistance (its default layers unless given) from weights_path or the torch hub cache;
    UserError with the ways out (--vgg_weights, or the method's `offline` distances) when the
    weights are absent or wrong."""
    layers = {} if layer_ids is None else {"layer_ids": layer_ids}
    try:
        return VGGDistance(normalize=normalize, weights=weights_path or None, **layers)
    except FileNotFoundError as e:
        ways = " or ".join(f"--perceptual {kind}" for kind in offline)
        raise UserError(f"{e} The path goes in --vgg_weights PATH; without the weights, train "
                        f"with {ways}.") from None
    except RuntimeError as e:
        raise UserError(f"--vgg_weights: {e}") from None


def build_perceptual(cfg, weights_path):
    """The reconstruction distance: frozen VGG16 features, or the offline Lap1 or L1."""
    kind = cfg["perceptual"]["kind"]
    if kind == "auto":
        kind = "vgg" if find_vgg_weights(weights_path or None) else "lap1"
        if kind == "lap1":
            print(f"note: no VGG16 weights ({VGG16_WEIGHTS_FILE}) found; the demo uses the "
                  f"Lap1 fallback (pass --vgg_weights PATH for the perceptual loss)")
        cfg["perceptual"]["kind"] = kind
    if kind == "l1":
        return L1Distance()
    if kind == "lap1":
        return Lap1Distance()
    if kind != "vgg":
        raise UserError(f"perceptual.kind {kind!r}: use auto or one of "
                        f"{', '.join(OVERLORD_DISTANCES)}")
    offline = [kind for kind in OVERLORD_DISTANCES[::-1] if kind != "vgg"]
    return vgg_distance(offline, cfg["perceptual"]["layer_ids"], cfg["perceptual"]["normalize"],
                        weights_path)


def view_for_correlated(batch, cfg):
    """What the correlated encoder sees: the augmented (for 'localized': masked, then augmented)
    image; None for uncorrelated configs."""
    return batch["img_augmented"] if cfg["correlation"] else None


# --- the three steps: each takes (model, batch, ctx) and returns a dict of scalar tensors ---

def disentanglement_step(model, batch, ctx):
    """Latent optimisation: tables and generator reconstruct the image from [u + noise, l(, c)]."""
    cfg, weights = ctx["cfg"], ctx["cfg"]["disentanglement"]["loss_weights"]
    u, l, c = model.table_codes(batch["index"], batch["label"], view_for_correlated(batch, cfg))
    noisy_u = u + cfg["uncorrelated_std"] * torch.randn_like(u) if cfg["uncorrelated_std"] else u
    reconstruction = ctx["perceptual"](model.generator(model.latent(noisy_u, l, c)), batch["img"])
    decay = u.pow(2).mean()
    loss = weights["reconstruction"] * reconstruction + weights["uncorrelated_decay"] * decay
    optimise(ctx["optimizers"]["main"], loss)
    return {"loss": loss, "reconstruction": reconstruction, "uncorrelated_decay": decay}


def latent_targets(model, batch, cfg):
    """Stage-1 codes the encoders must regress (no gradient)."""
    with torch.no_grad():
        return model.table_codes(batch["index"], batch["label"], view_for_correlated(batch, cfg))


def latent_regression(predicted, targets):
    """{name: MSE} of the amortised codes against the stage-1 codes."""
    names = ("uncorrelated", "label", "correlated")
    return {n: F.mse_loss(p, t) for n, p, t in zip(names, predicted, targets) if p is not None}


def amortization_step(model, batch, ctx):
    """Encoders regress the stage-1 codes from clean images."""
    losses = latent_regression(model.amortized_codes(batch["img"]),
                               latent_targets(model, batch, ctx["cfg"]))
    loss = sum(losses.values())
    optimise(ctx["optimizers"]["main"], loss)
    return {"loss": loss, **losses}


def synthesis_step(model, batch, ctx):
    """Adversarial tuning: discriminator step with R1, then encoders + generator step."""
    cfg, weights = ctx["cfg"], ctx["cfg"]["synthesis"]["loss_weights"]
    x, opt = batch["img"], ctx["optimizers"]
    disc, generator = model.discriminator, model.amortized_generator

    disc.requires_grad_(True)
    with torch.no_grad():
        fake = generator(model.latent(*model.amortized_codes(x)))
    real = x.detach().requires_grad_(True)  # a copy, so the gradient flag cannot leak onward
    real_logits = disc(real)
    d_loss = (adversarial_loss(disc(fake), 0) + adversarial_loss(real_logits, 1)
              + r1_penalty(real_logits, real))
    optimise(opt["discriminator"], d_loss)

    disc.requires_grad_(False)
    codes = model.amortized_codes(x)
    latent = latent_regression(codes, latent_targets(model, batch, cfg))
    fake = generator(model.latent(*codes))
    losses = {"reconstruction": ctx["perceptual"](fake, x), "latent": sum(latent.values()),
              "adversarial": adversarial_loss(disc(fake), 1)}
    g_loss = sum(weights[name] * value for name, value in losses.items())
    optimise(opt["generator"], g_loss)
    return {"discriminator": d_loss, "generator": g_loss, **losses}


def stage_optimizers(stage, model, stage_cfg):
    """(optimizers, cosine-annealed optimizer names) of a stage, as in the original."""
    lr = stage_cfg["learning_rate"]
    if stage == "disentanglement":
        groups = [{"params": [*model.label_embedding.parameters(),
                              *model.uncorrelated_embedding.parameters()], "lr": lr["latent"]},
                  {"params": model.generator.parameters(), "lr": lr["generator"]}]
        if model.correlated:
            groups.append({"params": model.correlated_encoder.parameters(), "lr": lr["encoder"]})
        return {"main": adam(groups, lr["latent"], betas=(0.5, 0.999))}, ("main",)
    encoder_params = [p for m in model.amortized_encoders() for p in m.parameters()]
    if stage == "amortization":
        return {"main": adam(encoder_params, lr["max"])}, ("main",)
    return {"generator": adam([*encoder_params, *model.amortized_generator.parameters()],
                              lr["generator"], betas=(0.5, 0.999)),
            "discriminator": adam(model.discriminator.parameters(), lr["discriminator"],
                                  betas=(0.5, 0.999))}, ()


STAGE_STEPS = {"disentanglement": disentanglement_step, "amortization": amortization_step,
               "synthesis": synthesis_step}


# --- translation grids ---

GRID_IMAGES = 10


def collate_items(dataset, indices, device):
    """A batch dict of dataset items (augmentation seeded by the index), on `device`."""
    items = [dataset[(int(i), int(i))] for i in indices]
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]).to(device)
            for k in items[0]}


@torch.no_grad()
def translation_tiles(model, batch, stage, cfg):
    """11x11 tiles: a white corner, the images along the top, then row i = image i followed by
    G([u_j, l_i, c_i]) for every column j (the diagonal reconstructs). Clamped to [0, 1]."""
    if stage == "disentanglement":
        u, l, c = model.table_codes(batch["index"], batch["label"], view_for_correlated(batch, cfg))
        generator = model.generator
    else:
        u, l, c = model.amortized_codes(batch["img"])
        generator = model.amortized_generator
    x, n = batch["img"], batch["img"].shape[0]
    rows = [torch.cat([torch.ones_like(x[:1]), x])]
    for i in range(n):
        ci = None if c is None else c[i:i + 1].expand(n, -1)
        rows.append(torch.cat([x[i:i + 1], generator(model.latent(u, l[i:i + 1].expand(n, -1),
                                                                    ci))]))
    return torch.cat(rows).clamp(0, 1)


def save_translation_grids(model, dataset, stage, epoch, ctx):
    """The original's two grids: a fixed image sample and a fresh random one."""
    was_training = model.training
    model.eval()
    n = min(GRID_IMAGES, len(dataset))
    samples = {"fixed": np.random.RandomState(0).choice(len(dataset), n, replace=False),
               "random": ctx["grid_rng"].choice(len(dataset), n, replace=False)}
    for kind, indices in samples.items():
        batch = collate_items(dataset, indices, ctx["device"])
        path = os.path.join(ctx["out"], f"{stage}_{kind}_{epoch:04d}.png")
        save_tiles(translation_tiles(model, batch, stage, ctx["cfg"]), path, nrow=n + 1,
                   value_range=(0.0, 1.0))
        ctx["board"].image_file(f"{stage}/{kind}", path, epoch)
    model.train(was_training)


# --- one stage: loader, optimisers, schedule, epochs, logs, grids, checkpoints ---

def overlord_checkpoint(model, ctx, stage, step, optimizers, schedulers):
    """Everything needed to resume inside `stage` at batch `step` (every process calls it: it
    gathers each one's random state)."""
    return {"config": ctx["cfg"], "stage": stage, "step": step, **rng_entries(),
            "done": list(ctx["done"]), "models": {"model": model.state_dict()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "grid_rng": numpy_rng_state(ctx["grid_rng"])}


def numpy_rng_state(rng):
    """A RandomState's state as plain lists and numbers (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = rng.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def numpy_rng_from_state(state):
    """The inverse of numpy_rng_state, for RandomState.set_state."""
    name, keys, pos, has_gauss, cached = state
    return name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached


def stage_lr_hint(out, stage, stage_cfg):
    """The command that resumes a diverged stage with its first learning rate a tenth as big."""
    name, value = next((k, v) for k, v in stage_cfg["learning_rate"].items() if k != "min")
    return (f"python train.py --method overlord --load {out} "
            f"--set {stage}.learning_rate.{name}={value / 10:g}")


def run_stage(stage, model, dataset, ctx, resume=None):
    """Train one stage for its epochs; writes metrics, grids and a checkpoint every epoch."""
    scfg = ctx["cfg"][stage]
    bs, drop_last = scfg["batch_size"], stage != "disentanglement"
    if len(dataset) < bs and drop_last:
        raise UserError(f"{stage}.batch_size {bs} is larger than the {len(dataset)} images")
    shard = dict(rank=ctx["rank"], world=ctx["world"])
    per_epoch = EndlessBatches(len(dataset), bs, 0, 0, drop_last, **shard).batches_per_epoch()
    total = scfg["n_epochs"] * per_epoch
    optimizers, annealed = stage_optimizers(stage, model, scfg)
    schedulers = {k: torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizers[k], T_max=max(total, 1), eta_min=scfg["learning_rate"]["min"])
        for k in annealed}
    step = 0
    if resume is not None:
        for k, o in optimizers.items():
            o.load_state_dict(resume["optimizers"][k])
        for k, s in schedulers.items():
            s.load_state_dict(resume["schedulers"][k])
        step = resume["step"]
    ctx["stage"], ctx["optimizers"] = stage, optimizers
    main = ctx["rank"] == 0

    def save():
        if any_process(not finite_weights(model))[0]:
            raise divergence_error("the weights are not finite", f"{stage} batch {step}",
                                   ctx["saved"], stage_lr_hint(ctx["out"], stage, scfg))
        state = overlord_checkpoint(model, ctx, stage, step, optimizers, schedulers)
        if main:
            save_checkpoint(os.path.join(ctx["out"], "checkpoint"), state)
        ctx["saved"] = f"{stage} batch {step}"

    batches = endless_loader(dataset, bs, ctx["cfg"]["seed"] * 3 + STAGES.index(stage), step,
                             ctx["workers"], ctx["device"].type == "cuda", drop_last, **shard)
    step_fn, device = STAGE_STEPS[stage], ctx["device"]
    model.train()
    means, tick, tick_step = RunningMeans(), time.time(), step
    watch, stopping = DivergenceWatch(), False
    bar = tqdm(total=total, initial=step, desc=stage, dynamic_ncols=True, disable=not main)
    with StopRequest() as stop:
        while step < total and not stopping:
            try:
                batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            except RuntimeError:
                if stop.requested:
                    stopping = True
                    break
                raise
            losses = to_floats(step_fn(model, batch, ctx))
            for scheduler in schedulers.values():
                scheduler.step()
            step += 1
            stopping, diverged = any_process(stop.requested, watch.update(losses))
            if diverged:
                bar.close()
                raise divergence_error(watch.what(), f"{stage} batch {step}", ctx["saved"],
                                       stage_lr_hint(ctx["out"], stage, scfg))
            means.update(losses)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in list(losses.items())[:3]})
            if step % per_epoch == 0:
                epoch = step // per_epoch
                seconds = time.time() - tick
                record = {"stage": stage, "epoch": epoch, "step": step,
                          **average_values(means.means()),
                          "img_per_s": bs * (step - tick_step) / seconds,
                          "s_per_iter": seconds / (step - tick_step)}
                means.reset()
                tick, tick_step = time.time(), step
                if main:
                    append_jsonl(os.path.join(ctx["out"], "metrics.jsonl"), record)
                    ctx["board"].scalars(record, epoch, prefix=f"{stage}/")
                    if epoch % scfg["n_epochs_between_visualizations"] == 0 or step == total:
                        save_translation_grids(model, dataset, stage, epoch, ctx)
                save()
    bar.close()
    if stopping:
        save_and_exit(save, main, f"stopped in {stage} at batch {step}/{total}; resume with "
                                  f"--load {ctx['out']}")


def main_overlord(argv):
    """Train OverLORD's stages in order, or the one --stage names; resume with --load."""
    cfg, args, ckpt = resolve_overlord_config(argv)
    rank, world, device = init_distributed(args.device)
    main = rank == 0
    check_batch_sizes(cfg, world)
    out = make_output_dir(args.out)
    board = TensorBoard(out, cfg["tensorboard"], main)
    seed_everything(cfg["seed"])
    perceptual = build_perceptual(cfg, args.vgg_weights).to(device)

    # data (rank 0 draws the demo set first)
    with main_process_first(rank):
        if not args.root:
            args.root = make_demo_labeled(os.path.join(out, "demo_data"), size=DEMO_SIZE)
            if main:
                print(f"no --root: training on the synthetic labelled demo set in {args.root}")
    prepared = load_prepared(args.root)
    data_fields = prepared.config_fields()
    if ckpt is not None:
        changed = [k for k in ("img_shape", "n_imgs", "n_labels")
                   if list(np.atleast_1d(cfg[k])) != list(np.atleast_1d(data_fields[k]))]
        if changed:
            raise UserError(f"--root {args.root} does not match the run being resumed "
                            f"({', '.join(f'{k}: {cfg[k]} vs {data_fields[k]}' for k in changed)})")
    cfg.update(data_fields, root=os.path.abspath(args.root))
    if cfg["correlation"] == "localized" and prepared.masks is None:
        raise UserError(f"config {cfg['preset']} is 'localized' but {args.root} has no masks.npy")
    dataset = LabelledImages(prepared, augment=cfg["augmentation"] if cfg["correlation"] else None,
                             with_masks=cfg["correlation"] == "localized")

    # networks
    model = build_overlord(cfg).to(device)
    if world > 1:  # same initial weights everywhere, then each process its own noise
        torch.manual_seed(cfg["seed"] * 1000 + rank)
    ctx = {"cfg": cfg, "out": out, "device": device, "perceptual": perceptual, "rank": rank,
           "world": world, "workers": args.workers, "done": [], "saved": "",
           "grid_rng": np.random.RandomState(1337)}
    ctx["board"] = board
    resume_stage = None
    if ckpt is not None:
        load_weights(model, ckpt["models"]["model"], f"--load {args.load}")
        restore_rng(ckpt, rank, world, cfg["seed"])
        ctx["done"] = list(ckpt["done"])
        ctx["saved"] = f"{ckpt['stage']} batch {ckpt['step']}"
        ctx["grid_rng"].set_state(numpy_rng_from_state(ckpt["grid_rng"]))
        resume_stage = ckpt["stage"]
        if main:
            print(f"resumed from {args.load}: {ckpt['stage']} at batch {ckpt['step']}")
    if main:
        write_json(os.path.join(out, "config.json"), cfg)

    # stages
    todo = [args.stage] if args.stage else [s for s in STAGES if s not in ctx["done"]]
    for stage in todo:
        needed = STAGES[:STAGES.index(stage)]
        missing = [s for s in needed if s not in ctx["done"]]
        if missing:
            raise UserError(f"stage {stage} needs {', '.join(missing)} first (--load a run "
                            f"that finished it)")
        if stage == "amortization" and resume_stage != stage:
            model.amortized_generator.load_state_dict(model.generator.state_dict())
        resume = ckpt if (ckpt is not None and resume_stage == stage
                          and stage not in ctx["done"]) else None
        run_stage(stage, model, dataset, ctx, resume)
        ctx["done"] = [s for s in STAGES if s in ctx["done"] or s == stage]
        state = overlord_checkpoint(model, ctx, stage, 0, {}, {})
        if main:
            save_checkpoint(os.path.join(out, "checkpoint"), state)
    if main:
        print(f"done: {', '.join(ctx['done'])}; grids, metrics.jsonl and checkpoint in {out}")


def main(argv=None):
    """Dispatch on --method (cd, the default, or overlord)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method", choices=("cd", "overlord"), default="cd")
    known, rest = pre.parse_known_args(argv)
    (main_overlord if known.method == "overlord" else main_cd)(rest)
    close_distributed()


if __name__ == "__main__":
    run_cli(main)
