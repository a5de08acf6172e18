"""Train a content-disentanglement model (Press et al., ICLR 2019; kozistr's IN+ILN variant).

    python train.py --out ./result                              # built-in synthetic demo, CPU ok
    python train.py --root ./bald --out ./bald_result           # list files or trainA/... folders
    python train.py --root ./bald --out ./bald_result --load ./bald_result   # resume

A = images with the attribute, B = without. Every --progress_iter a line goes to OUT/metrics.jsonl,
every --display_iter a grid OUT/experiments_XXXXXX.png, every --save_iter OUT/checkpoint.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import ImageFiles, check_images, domain_paths, endless_loader, make_demo
from models import CDConfig, build_cd
from utils import (RunningMeans, UserError, append_jsonl, load_checkpoint, load_weights,
                   make_output_dir, pick_device, rng_state, run_cli, save_checkpoint, save_tiles,
                   seed_everything, set_rng_state, StopRequest, write_json)

AE_CLIP_NORM = 5.0  # joint gradient-norm clip of both encoders and the decoder (as the seeds)

# Used when no --root is given: small synthetic faces, A = with glasses. Flags given explicitly
# still win. Sized so that a 2-core CPU shows the transfer in the grid within about 10 minutes.
DEMO_PRESET = dict(resize=32, crop=0, bs=16, iters=2000, sep=32, n_tot_feats=256, n_blocks=2,
                   display_iter=250, save_iter=250, progress_iter=50, num_display=8, n_threads=2,
                   lr=5e-4, d_lr=5e-4)

# Fields that define the networks or their input: a resumed run must keep them.
ARCHITECTURE_KEYS = tuple(CDConfig.__dataclass_fields__) + ("crop",)


def build_parser():
    """Flags of kozistr's train.py (same names and defaults) plus device, seed, workers and fixes."""
    p = argparse.ArgumentParser(description=__doc__,
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
    a("--adv_weight", type=float, default=1e-3, help="weight of the adversarial term")
    a("--d_clip", type=float, default=5.0, help="gradient-norm clip of the discriminator; "
      "0 = none (the seeds' clip never ran)")
    a("--progress_iter", type=int, default=100, help="iterations between metrics lines")
    a("--display_iter", type=int, default=5000, help="iterations between sample grids")
    a("--save_iter", type=int, default=5000, help="iterations between checkpoints")
    a("--num_display", type=int, default=12, help="A and B test images in the sample grid")
    a("--n_threads", "--workers", dest="n_threads", type=int, default=6,
      help="DataLoader worker processes (0 = load in the main process)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--seed", type=int, default=0, help="seed of weights, data order and flips")
    a("--skip_bad", action="store_true", help="drop unreadable or too-small images with a warning")
    a("--image_root", default="", help="folder to find listed images in when their absolute "
      "paths do not exist (e.g. the seed's bald/*.txt)")
    return p


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
    elif not args.root:
        cfg.update({k: v for k, v in DEMO_PRESET.items() if k not in explicit})
    cfg["method"] = "cd"
    CDConfig.from_dict(cfg).validate()
    for key in ("bs", "iters", "progress_iter", "display_iter", "save_iter", "num_display"):
        if cfg[key] <= 0:
            raise UserError(f"--{key} must be positive")
    if cfg["n_threads"] < 0:
        raise UserError("--n_threads/--workers must be >= 0")
    return cfg, ckpt


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


def autoencoder_losses(model, x_a, x_b, adv_weight):
    """Reconstruction of A and B plus the term that pushes both common codes towards 'B'."""
    n = x_a.shape[0]
    common = model.common_encoder(torch.cat([x_a, x_b]))  # (2N, T-S, r, r); IN is per sample
    separate_a = model.separate_encoder(x_a)               # (N, S, r, r)
    separate = torch.cat([separate_a, model.zero_separate(common[n:])])
    recon = model.decode(common, separate)
    logits = model.latent_disc(common)
    losses = {"recon_a": F.mse_loss(recon[:n], x_a), "recon_b": F.mse_loss(recon[n:], x_b),
              "adv": adversarial_loss(logits[:n], 0) + adversarial_loss(logits[n:], 0)}
    losses["ae"] = losses["recon_a"] + losses["recon_b"] + adv_weight * losses["adv"]
    return losses


def discriminator_loss(model, x_a, x_b):
    """The latent discriminator's A-vs-B loss on common codes of the just-updated encoder."""
    n = x_a.shape[0]
    with torch.no_grad():
        common = model.common_encoder(torch.cat([x_a, x_b]))
    logits = model.latent_disc(common)
    return adversarial_loss(logits[:n], 1) + adversarial_loss(logits[n:], 0)


def train_step(model, x_a, x_b, ae_opt, d_opt, cfg):
    """One iteration: autoencoder step, discriminator step, ILN rho clamp. Returns float losses."""
    model.latent_disc.requires_grad_(False)
    losses = autoencoder_losses(model, x_a, x_b, cfg["adv_weight"])
    ae_opt.zero_grad(set_to_none=True)
    losses["ae"].backward()
    torch.nn.utils.clip_grad_norm_(model.autoencoder_parameters(), AE_CLIP_NORM)
    ae_opt.step()

    model.latent_disc.requires_grad_(True)
    losses["disc"] = discriminator_loss(model, x_a, x_b)
    d_opt.zero_grad(set_to_none=True)
    losses["disc"].backward()
    if cfg["d_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(model.latent_disc.parameters(), cfg["d_clip"])
    d_opt.step()
    model.clamp_rho()
    return {name: value.item() for name, value in losses.items()}


# ------------------------------------------------------------------------------------------------
# Grids

@torch.no_grad()
def transfer_tiles(model, x_a, x_b):
    """Tiles of the seeds' grid: a blank corner, B along the top, then per row A_i followed by
    decode(common of B_j, separate of A_i) for every j. Returns ((n+1)^2, 3, R, R)."""
    was_training = model.training
    model.eval()
    common_b, separate_a = model.common_encoder(x_b), model.separate_encoder(x_a)
    rows = [torch.cat([torch.zeros_like(x_b[:1]), x_b])]
    for i in range(x_a.shape[0]):
        separate = separate_a[i:i + 1].expand(x_b.shape[0], -1, -1, -1)
        rows.append(torch.cat([x_a[i:i + 1], model.decode(common_b, separate)]))
    model.train(was_training)
    return torch.cat(rows)


def save_transfer_grid(model, x_a, x_b, path):
    """Write the transfer grid of `transfer_tiles` as a PNG."""
    save_tiles(transfer_tiles(model, x_a, x_b), path, nrow=x_b.shape[0] + 1)


# ------------------------------------------------------------------------------------------------
# Main

def load_domains(cfg):
    """Datasets of the four splits, every image checked once."""
    paths = domain_paths(cfg["root"], cfg["image_root"])
    workers = max(2, cfg["n_threads"])
    sets = {s: ImageFiles(check_images(p, cfg["crop"], s, cfg["skip_bad"], workers),
                          cfg["crop"], cfg["resize"]) for s, p in paths.items()}
    for split in ("trainA", "trainB"):
        if len(sets[split]) < cfg["bs"]:
            raise UserError(f"{split} has {len(sets[split])} images, fewer than --bs {cfg['bs']}")
    for split in ("testA", "testB"):
        if len(sets[split]) < cfg["num_display"]:
            raise UserError(f"--num_display {cfg['num_display']} is more than the "
                            f"{len(sets[split])} images of {split}")
    return sets


def checkpoint_state(model, ae_opt, d_opt, step, cfg):
    """Everything a resumed run needs, in weights_only-loadable types."""
    return {"config": cfg, "step": step, "rng": rng_state(),
            "models": {"model": model.state_dict()},
            "optimizers": {"ae": ae_opt.state_dict(), "disc": d_opt.state_dict()}}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, ckpt = resolve_config(argv)
    out = make_output_dir(cfg["out"])
    device = pick_device(cfg["device"])
    seed_everything(cfg["seed"])
    if not cfg["root"]:
        cfg["root"] = make_demo(os.path.join(out, "demo_data"))
        print(f"no --root: training on the synthetic demo set in {cfg['root']}")

    # data
    sets = load_domains(cfg)
    fixed_a = sets["testA"].batch(range(cfg["num_display"])).to(device)
    fixed_b = sets["testB"].batch(range(cfg["num_display"])).to(device)

    # networks and optimisers
    model = build_cd(cfg).to(device)
    betas = (cfg["beta1"], cfg["beta2"])
    ae_opt = torch.optim.Adam(model.autoencoder_parameters(), cfg["lr"], betas, eps=cfg["eps"])
    d_opt = torch.optim.Adam(model.latent_disc.parameters(), cfg["d_lr"], betas, eps=cfg["eps"])

    # resume
    step = 0
    if ckpt is not None:
        load_weights(model, ckpt["models"]["model"], f"--load {cfg['load']}")
        ae_opt.load_state_dict(ckpt["optimizers"]["ae"])
        d_opt.load_state_dict(ckpt["optimizers"]["disc"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"])
        print(f"resumed from {cfg['load']} at iteration {step}")
    write_json(os.path.join(out, "config.json"), cfg)

    pin = device.type == "cuda"
    batches_a = endless_loader(sets["trainA"], cfg["bs"], cfg["seed"] * 2, step, cfg["n_threads"],
                               pin)
    batches_b = endless_loader(sets["trainB"], cfg["bs"], cfg["seed"] * 2 + 1, step,
                               cfg["n_threads"], pin)
    save = lambda: save_checkpoint(os.path.join(out, "checkpoint"),  # noqa: E731
                                   checkpoint_state(model, ae_opt, d_opt, step, cfg))

    # loop
    model.train()
    means, tick, tick_step = RunningMeans(), time.time(), step
    bar = tqdm(total=cfg["iters"], initial=step, desc="cd", dynamic_ncols=True)
    with StopRequest() as stop:
        while step < cfg["iters"] and not stop.requested:
            try:
                x_a = next(batches_a).to(device, non_blocking=True)
                x_b = next(batches_b).to(device, non_blocking=True)
            except RuntimeError:
                if stop.requested:  # Ctrl-C also ended the loader's workers
                    break
                raise
            losses = train_step(model, x_a, x_b, ae_opt, d_opt, cfg)
            step += 1
            means.update(losses)
            bar.update(1)
            last = step == cfg["iters"]
            if step % cfg["progress_iter"] == 0 or last:
                seconds = time.time() - tick
                img_per_s = 2 * cfg["bs"] * (step - tick_step) / max(seconds, 1e-9)
                record = {"step": step, **means.means(), "img_per_s": img_per_s,
                          "s_per_iter": seconds / max(step - tick_step, 1)}
                append_jsonl(os.path.join(out, "metrics.jsonl"), record)
                bar.set_postfix(ae=f"{record['ae']:.4f}", disc=f"{record['disc']:.4f}",
                                img_s=f"{img_per_s:.1f}")
                means.reset()
                tick, tick_step = time.time(), step
            if step % cfg["display_iter"] == 0 or last:
                save_transfer_grid(model, fixed_a, fixed_b,
                                   os.path.join(out, f"experiments_{step:06d}.png"))
            if step % cfg["save_iter"] == 0 or last:
                save()
    bar.close()
    if stop.requested:
        save()
        print(f"stopped: checkpoint of iteration {step} saved in {out}; resume with "
              f"--load {out}", file=sys.stderr)
        sys.exit(130)
    print(f"done: {step} iterations; grids, metrics.jsonl and checkpoint in {out}")


if __name__ == "__main__":
    run_cli(main)
