"""Time the training steps of both methods on random in-memory batches, or CD end to end on a
dataset folder (--data: loading included).

Each row: images/s and seconds per iteration (median after warm-up; the mean for --data), model
FLOPs of one step (forward + backward, counted once with FlopCounterMode), the FLOP/s achieved as
a share of this machine's fp32 3x3-convolution peak, and peak memory.
    OMP_NUM_THREADS=2 python bench.py --device cpu --resize 32 --bs 4 --iters 5    # CPU, all
    python bench.py --method cd --resize 256 --bs 4 --reference     # GPU: ours vs the seed's loop
    python bench.py --method cd --resize 256 --bs 4 --reference --e2_feats 512  # seed's wide E2
    python bench.py --method cd --amp bf16 --channels_last --compile --json cd.json
    python bench.py --method cd --data ./bald --resize 64 --bs 8 --iters 200 --reference
    python bench.py --method overlord --overlord_config ffhq --resize 256 --bs 16
--amp, --channels_last, --compile, --d_codes and --data apply to the CD step only.
"""
import argparse
import contextlib
import functools
import json
import os
import platform
import random
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import data
import train
from models import CDConfig, L1Distance, build_cd, build_overlord, find_vgg_weights
from utils import UserError, pick_device, run_cli, write_json

SEED_E2_FEATS = train.REPRODUCE["kozistr"]["e2_feats"]  # kozistr's train.py's E2 width
DISTANCE_NAMES = {"vgg": "VGG16", "lap1": "Lap1", "l1": "L1"}  # OverLORD's, for the notes
N_LABELS = 10        # OverLORD label-table rows for the bench (they barely change the cost)


def build_parser():
    """The bench's flags; CD defaults are train.py's, OverLORD's come from its PRESETS."""
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--method", choices=("cd", "overlord", "all"), default="all", help="steps to time")
    a("--resize", type=int, default=64, help="image side")
    a("--bs", type=int, default=8, help="batch size (CD: per domain, so 2*bs images a step)")
    a("--iters", type=int, default=20, help="timed iterations per step (the median is reported)")
    a("--warmup", type=int, default=3, help="untimed iterations before timing")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--reference", action="store_true",
      help="also time kozistr's CD loop as written (SPEC A5) and print our/seed ratios")
    a("--e2_feats", type=int, default=CDConfig.e2_feats,
      help=f"CD separate-encoder base width ({SEED_E2_FEATS} = the seed's train.py)")
    a("--cd_flags", default="", help="more train.py CD flags, e.g. '--sep 64 --n_blocks 2'")
    a("--data", default="", metavar="ROOT",
      help="CD end to end: time --iters iterations of train.py's data pipeline and step on this "
      "dataset (a train.py --root), data loading included; with --reference also the seeds' "
      "pipeline (every image decoded in every epoch, new loaders each epoch, their loop)")
    a("--d_codes", choices=("reuse", "recompute"), default="reuse",
      help="CD discriminator step: reuse the autoencoder step's detached common codes, or "
      "recompute them (the seed)")
    a("--amp", choices=("off", "bf16", "fp16"), default="off", help="CD autocast precision")
    a("--channels_last", action="store_true", help="CD model and inputs in channels_last")
    a("--compile", action="store_true", help="torch.compile the CD networks")
    a("--overlord_config", choices=sorted(train.PRESETS), default="demo",
      help="OverLORD preset (network widths, loss weights)")
    a("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
      help="override an OverLORD config field, as train.py --set (repeatable)")
    a("--n_imgs", type=int, default=1000, help="OverLORD per-image code table size")
    a("--breakdown", action="store_true",
      help="also profile each step: the convolutions' share of its time and their FLOP/s "
      "against the peak, forward and backward apart")
    a("--quality", action="store_true", help="CD time-to-quality instead: train.py on a demo set "
      "with ground truth (--data, else one drawn at --resize) for --minutes of wall time, then "
      "score it as eval.py --ground_truth does; --cd_flags adds training flags")
    a("--minutes", type=float, default=5.0, help="--quality: wall time of the training run")
    a("--distances", action="store_true", help="also time the steps with each reconstruction "
      "distance (CD: --perceptual l2, lap1, vgg; OverLORD stage 1: l1, lap1, vgg), interleaved "
      "in one process, and print their cost relative to the first; VGG16 from random weights "
      "when ImageNet's are absent (the same cost)")
    a("--json", default="", help="also write the report as JSON to this path")
    return p


# ------------------------------------------------------------------------------------------------
# Measuring

def sync(device):
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds(fn, device):
    """Wall-clock seconds of one fn() call, its GPU work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# (channels, side) of the 3x3 convolutions the peak is probed with: one shape alone can sit far
# below the machine's best (90 against 145-158 GFLOP/s measured on one 2-core CPU)
PEAK_SHAPES = ((256, 64), (512, 32), (128, 128), (512, 16))


def conv_peak_flops(device, shapes=PEAK_SHAPES, target_s=0.1, runs=5):
    """(FLOP/s, input shape) of the fastest fp32 3x3 conv, channels -> channels, over `shapes`;
    for each, the batch doubles until one forward takes about target_s / 2, then the best of
    `runs` counts."""
    best = (0.0, None)
    for channels, side in shapes:
        weight = torch.randn(channels, channels, 3, 3, device=device)
        batch = 1
        while True:
            x = torch.randn(batch, channels, side, side, device=device)
            conv = functools.partial(F.conv2d, x, weight, padding=1)
            conv()  # warm-up: algorithm choice, allocator
            if seconds(conv, device) >= target_s / 2 or batch >= 256:
                break
            batch *= 2
        fastest = min(seconds(conv, device) for _ in range(runs))
        flops = 2 * batch * channels * side * side * channels * 9 / fastest
        best = max(best, (flops, list(x.shape)), key=lambda pair: pair[0])
    return best


class TotalsOnly(contextlib.nullcontext):
    """FlopCounterMode's per-module tracker without its autograd hooks, which fail on R1's
    autograd.grad and on no-grad views of parameters; every FLOP is booked to the total."""
    parents = ("Global",)


def flops_by_op(step):
    """{aten op: FLOPs} of one step() call, forward and backward (matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = TotalsOnly()
    with counter:
        step()
    return counter.get_flop_counts()["Global"]


def count_flops(step):
    """Model FLOPs of one step() call, forward and backward."""
    return sum(flops_by_op(step).values())


def reset_peak_memory(device):
    """Start a row's CUDA peak from what is allocated now (its model and optimiser included)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """(bytes, what): CUDA's peak allocation since the reset, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"


def measure(name, step, n_images, flops, device, args, peak, mean=False):
    """Time `step` after --warmup, the median of --iters steps (or with `mean` the mean over one
    run of --iters, so that a data loader's stalls count in full), and make its table row."""
    for _ in range(args.warmup):
        step()
    if mean:
        s = seconds(lambda: [step() for _ in range(args.iters)], device) / args.iters
    else:  # synchronising after each step stands in for the loops' per-step loss.item()
        s = statistics.median(seconds(step, device) for _ in range(args.iters))
    row = make_row(name, s, n_images, flops, device, peak)
    if args.breakdown:
        row["convolutions"] = conv_breakdown(step, s, device, peak)
    return row


def conv_breakdown(step, s, device, peak, n=3):
    """The convolutions' share of a step's `s` seconds and their FLOP/s against `peak`, forward
    and backward apart: from the FLOP counter and the profiler over `n` steps."""
    flops = flops_by_op(step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync(device)
    # CPU total of the op and what it calls; on a GPU, the kernels it launched
    times = {e.key: (e.device_time_total if device.type == "cuda" else e.cpu_time_total) / 1e6 / n
             for e in prof.key_averages()}
    parts = {"forward": ("aten::convolution", torch.ops.aten.convolution),
             "backward": ("aten::convolution_backward", torch.ops.aten.convolution_backward)}
    report = {}
    for part, (key, op) in parts.items():
        t = times.get(key, 0.0)
        report[part] = {"s_per_iter": t, "share_of_step": t / s,
                        "peak_pct": 100 * flops.get(op, 0) / t / peak if t else 0.0}
    return report


def interleaved_seconds(steps, device, args):
    """Median seconds per call of each step, timed in turns (one call of each per round, after
    --warmup of each), so that a change of machine load falls on all of them alike."""
    for step in steps:
        for _ in range(args.warmup):
            step()
    rounds = [[seconds(step, device) for step in steps] for _ in range(args.iters)]
    return [statistics.median(times) for times in zip(*rounds)]


def distance_rows(name, kinds, make_step, n_images, device, args, peak):
    """(rows, {kind: cost relative to the first kind}) of the step make_step(kind) builds for
    each reconstruction distance, timed in turns."""
    steps = [make_step(kind) for kind in kinds]
    flops = [count_flops(step) for step in steps]
    times = interleaved_seconds(steps, device, args)
    rows = [make_row(f"{name} --perceptual {kind}", s, n_images, f, device, peak)
            for kind, s, f in zip(kinds, times, flops)]
    return rows, {kind: s / times[0] for kind, s in zip(kinds, times)}


def vgg_weights_or_random():
    """The VGG16 ImageNet weights on disk, else 'random' (the same network, the same cost)."""
    return find_vgg_weights() or "random"


def make_row(name, s, n_images, flops, device, peak):
    """A table row from seconds per step."""
    memory, memory_kind = peak_memory(device)
    return {"name": name, "images_per_s": n_images / s, "s_per_iter": s,
            "flops_per_iter": flops, "flops_per_s": flops / s, "peak_pct": 100 * flops / s / peak,
            "peak_memory_bytes": memory, "memory_kind": memory_kind}


# ------------------------------------------------------------------------------------------------
# Content disentanglement

def cd_config(args):
    """train.py's CD flags (its defaults, the bench's size and --cd_flags) plus step options."""
    argv = ["--resize", str(args.resize), "--bs", str(args.bs), "--e2_feats", str(args.e2_feats),
            *shlex.split(args.cd_flags)]
    cfg = vars(train.build_parser().parse_args(argv))
    cfg.update(method="cd", d_codes=args.d_codes, amp=args.amp,
               channels_last=args.channels_last, compile=args.compile)
    return cfg


def seed_config(cfg):
    """The seed loop: train.py's --reproduce kozistr (fp32, eager, plain Adam, the seed's layer
    arithmetic and step), at the bench's E2 width so that both rows time the same networks."""
    return {**cfg, **train.REPRODUCE["kozistr"], "reproduce": "kozistr",
            "e2_feats": cfg["e2_feats"]}


def cd_setup(cfg, device):
    """A seeded CD model and optimisers as train.py's main_cd builds them for `cfg` (the seed's
    layer arithmetic and plain Adam under --reproduce kozistr), random A and B batches in
    [-1, 1]."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_cd(cfg).train()
        x_a, x_b = [torch.rand(cfg["bs"], 3, cfg["resize"], cfg["resize"]) * 2 - 1 for _ in "ab"]
    if cfg["channels_last"]:  # before the optimisers see the parameters
        model = model.to(memory_format=torch.channels_last)
        x_a, x_b = [x.contiguous(memory_format=torch.channels_last) for x in (x_a, x_b)]
    return (model, x_a, x_b, *train.cd_optimizers(model, cfg))


def compile_cd(model):
    """train.compile_model(model) where train.py has one, else torch.compile each net in place."""
    if hasattr(train, "compile_model"):
        return train.compile_model(model) or model  # it may compile in place or return a model
    for net in (model.common_encoder, model.separate_encoder, model.decoder, model.latent_disc):
        net.compile()
    return model


def reference_flops(cfg):
    """FLOPs of one seed-loop step, counted on the meta device (shapes only, no arithmetic)."""
    step = functools.partial(train.seed_train_step, *cd_setup(cfg, torch.device("meta")), cfg)
    return count_flops(step)


def cd_row(cfg, device, args, peak):
    """Row of train.train_step with the bench's step options."""
    model, x_a, x_b, ae_opt, d_opt = cd_setup(cfg, device)
    # float16 needs train.py's gradient scaler, as main_cd makes it
    scaler = {"scaler": torch.amp.GradScaler(device.type)} if cfg["amp"] == "fp16" else {}
    reset_peak_memory(device)
    eager = dict(cfg, compile=False)  # counted before compiling: FLOPs are the model's
    flops = count_flops(lambda: train.train_step(model, x_a, x_b, ae_opt, d_opt, eager, **scaler))
    if cfg["compile"]:
        model = compile_cd(model)
    step = functools.partial(train.train_step, model, x_a, x_b, ae_opt, d_opt, cfg, **scaler)
    return measure(f"cd ({step_options(cfg)})", step, 2 * cfg["bs"], flops, device, args, peak)


def step_options(cfg):
    """The CD step's options, for a row's name."""
    flags = [cfg["d_codes"], "fp32" if cfg["amp"] == "off" else cfg["amp"]]
    return " ".join(flags + [key for key in ("channels_last", "compile") if cfg[key]])


def reference_row(cfg, device, args, peak):
    """Row of the seed's loop (a seed_config): train.py's step under --reproduce kozistr."""
    model, x_a, x_b, ae_opt, d_opt = cd_setup(cfg, device)
    step = functools.partial(train.train_step, model, x_a, x_b, ae_opt, d_opt, cfg)
    reset_peak_memory(device)
    flops = count_flops(step)
    return measure(f"cd seed loop (e2_feats {cfg['e2_feats']})", step, 2 * cfg["bs"], flops,
                   device, args, peak)


def bench_cd(args, device, peak):
    """Rows of our CD step (and the seed's loop), plus the seed loop's FLOPs at each E2 width."""
    cfg = cd_config(args)
    if args.data:
        return end_to_end_rows(cfg, device, args, peak)
    rows, extra = [cd_row(cfg, device, args, peak)], {}
    if args.distances:
        def make_step(kind):
            distance = train.reconstruction_distance(
                {**cfg, "perceptual": kind, "vgg_weights": vgg_weights_or_random()}, device)
            model, x_a, x_b, ae_opt, d_opt = cd_setup(cfg, device)
            return functools.partial(train.train_step, model, x_a, x_b, ae_opt, d_opt, cfg,
                                     distance=distance)
        more, ratios = distance_rows("cd", train.CD_DISTANCES, make_step, 2 * cfg["bs"], device,
                                     args, peak)
        rows += more
        extra["distance_cost"] = {"cd": ratios}
    if args.reference:
        seed_cfg = seed_config(cfg)
        widths = sorted({CDConfig.e2_feats, SEED_E2_FEATS, cfg["e2_feats"]})
        extra["reference_flops"] = {str(w): reference_flops(dict(seed_cfg, e2_feats=w))
                                    for w in widths}
        rows.append(reference_row(seed_cfg, device, args, peak))
        extra["ratio"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    return rows, extra


# ------------------------------------------------------------------------------------------------
# CD end to end: data loading included

class SeedImages:
    """The seeds' dataset: every access decodes, crops and resizes the file, flipped at random
    by the worker (as their RandomHorizontalFlip)."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self.files[(index, random.random() < 0.5)]


def seed_batches(files, cfg):
    """The seeds' loader, forever: a new shuffled DataLoader, with new workers, every epoch."""
    from torch.utils.data import DataLoader
    while True:
        yield from DataLoader(SeedImages(files), cfg["bs"], shuffle=True, drop_last=True,
                              num_workers=cfg["n_threads"])


def loop_step(step, loaders, device):
    """step(x_a, x_b) on the next batch of each loader, as a training loop runs it."""
    x_a, x_b = (next(batches).to(device) for batches in loaders)
    return step(x_a, x_b)


def end_to_end_rows(cfg, device, args, peak):
    """Rows of train.py's pipeline (checked images, uint8 cache, one persistent loader per
    domain) and, with --reference, of the seeds' pipeline, on the images under --data."""
    timed = functools.partial(measure, device=device, args=args, peak=peak, mean=True)
    extra = {}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        sets = train.load_domains(dict(cfg, root=args.data, out=out))
        extra["notes"] = [f"end to end: mean of {args.iters} iterations after {args.warmup}, data "
                          f"loading included; train.py's start (image check and cache) took "
                          f"{time.perf_counter() - start:.1f} s, not included"]
        model, _, _, ae_opt, d_opt = cd_setup(cfg, device)
        loaders = [data.endless_loader(sets[s], cfg["bs"], i, 0, cfg["n_threads"])
                   for i, s in enumerate(("trainA", "trainB"))]
        scaler = {"scaler": torch.amp.GradScaler(device.type)} if cfg["amp"] == "fp16" else {}
        step = functools.partial(loop_step, functools.partial(
            train.train_step, model, ae_opt=ae_opt, d_opt=d_opt, cfg=cfg, **scaler), loaders,
            device)
        flops = count_flops(step)
        if cfg["compile"]:
            compile_cd(model)
        rows = [timed(f"cd end to end (train.py, {step_options(cfg)})", step, 2 * cfg["bs"],
                      flops)]
        del loaders  # ends their workers before the cache goes
    if args.reference:
        seed_cfg = seed_config(cfg)
        model, _, _, ae_opt, d_opt = cd_setup(seed_cfg, device)
        paths = data.domain_paths(args.data, cfg["image_root"])
        loaders = [seed_batches(data.ImageFiles(paths[s], cfg["crop"], cfg["resize"],
                                                seed_cfg["interpolation"]), cfg)
                   for s in ("trainA", "trainB")]
        step = functools.partial(loop_step, functools.partial(
            train.train_step, model, ae_opt=ae_opt, d_opt=d_opt, cfg=seed_cfg), loaders, device)
        rows.append(timed("cd end to end (seeds' pipeline)", step, 2 * cfg["bs"],
                          count_flops(step)))
        extra["ratio"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    return rows, extra


# ------------------------------------------------------------------------------------------------
# OverLORD

def overlord_config(args):
    """The preset with --set overrides and the bench's data fields (img_shape, n_imgs, ...)."""
    if args.resize < 8 or args.resize & (args.resize - 1):
        raise UserError(f"--resize {args.resize}: OverLORD needs a power of two >= 8")
    if args.bs % min(args.bs, 4):
        raise UserError(f"--bs {args.bs}: OverLORD's discriminator needs a multiple of 4 "
                        f"(or fewer than 4)")
    cfg = json.loads(json.dumps(train.PRESETS[args.overlord_config]))
    for assignment in args.overrides:
        train.apply_override(cfg, assignment)
    cfg.update(preset=args.overlord_config, method="overlord", n_imgs=args.n_imgs,
               img_shape=[args.resize, args.resize, 3], n_labels=N_LABELS)
    return cfg


def overlord_perceptual(cfg, weights_path=""):
    """(distance, description) as train.py builds it for the preset's kind ("auto": VGG16 when
    its weights are on disk, else the offline fallback); a preset's VGG16 without its weights
    is timed as L1."""
    kind = cfg["perceptual"]["kind"]
    if kind == "vgg" and not find_vgg_weights(weights_path or None):
        return L1Distance(), "L1 (no VGG16 weights found)"
    distance = train.build_perceptual(cfg, weights_path)  # resolves "auto" in cfg
    resolved = cfg["perceptual"]["kind"]
    source = f" ({distance.source})" if resolved == "vgg" else " fallback" if kind == "auto" else ""
    return distance, DISTANCE_NAMES[resolved] + source


def overlord_batch(cfg, bs, device):
    """A random batch shaped like LabelledImages' (images in [0, 1])."""
    side = cfg["img_shape"][0]
    batch = {"img": torch.rand(bs, 3, side, side, device=device),
             "index": torch.randint(cfg["n_imgs"], (bs,), device=device),
             "label": torch.randint(cfg["n_labels"], (bs,), device=device)}
    if cfg["correlation"]:
        batch["img_augmented"] = torch.rand_like(batch["img"])
    return batch


def bench_overlord(args, device, peak):
    """One row per stage: train.py's step functions with a ctx built as run_stage builds it."""
    cfg = overlord_config(args)
    perceptual, perceptual_name = overlord_perceptual(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_overlord(cfg).train()
    ctx = {"cfg": cfg, "perceptual": perceptual.to(device)}
    batch, rows = overlord_batch(cfg, args.bs, device), []
    for stage in train.STAGES:
        ctx.update(stage=stage, optimizers=train.stage_optimizers(stage, model, cfg[stage])[0])
        step = functools.partial(train.STAGE_STEPS[stage], model, batch, ctx)
        reset_peak_memory(device)
        flops = count_flops(step)
        rows.append(measure(f"overlord {stage}", step, args.bs, flops, device, args, peak))
    extra = {"notes": [f"overlord {args.overlord_config} preset, perceptual distance: "
                       f"{perceptual_name}"]}
    if args.distances:
        stage = "disentanglement"

        def make_step(kind):
            dcfg = json.loads(json.dumps(cfg))
            dcfg["perceptual"]["kind"] = kind
            own = {**ctx, "cfg": dcfg, "stage": stage,
                   "perceptual": train.build_perceptual(dcfg, vgg_weights_or_random()).to(device),
                   "optimizers": train.stage_optimizers(stage, model, cfg[stage])[0]}
            return functools.partial(train.STAGE_STEPS[stage], model, batch, own)
        more, ratios = distance_rows(f"overlord {stage}", train.OVERLORD_DISTANCES[::-1],
                                     make_step, args.bs, device, args, peak)
        rows += more
        extra["distance_cost"] = {f"overlord {stage}": ratios}
    return rows, extra


# ------------------------------------------------------------------------------------------------
# Report

def run_bench(args):
    """Measure the conv peak, then every requested step; returns the report as a dict."""
    if args.iters < 1 or args.warmup < 0 or args.bs < 1:
        raise UserError("--iters and --bs must be positive, --warmup >= 0")
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    peak, peak_shape = conv_peak_flops(device)
    report = {"device": f"{device} ({name or 'unknown'}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "settings": vars(args), "conv_peak_flops": peak,
              "conv_peak_shape": peak_shape, "rows": [], "notes": []}
    if device.type == "cuda":
        report["notes"].append(f"cuDNN may use TF32 for fp32 convolutions: "
                               f"{torch.backends.cudnn.allow_tf32} (peak and steps alike)")
    methods = ("cd", "overlord") if args.method == "all" else (args.method,)
    for method in methods:
        rows, extra = (bench_cd if method == "cd" else bench_overlord)(args, device, peak)
        report["rows"] += rows
        report["notes"] += extra.pop("notes", [])
        for step, ratios in extra.pop("distance_cost", {}).items():
            report.setdefault("distance_cost", {})[step] = ratios
        report.update(extra)
    if args.distances:
        report["notes"].append(f"--distances: VGG16 weights {vgg_weights_or_random()}")
    if device.type != "cuda":
        report["notes"].append("peak memory is the process's peak RSS so far, earlier rows too")
    if args.amp != "off":
        report["notes"].append("% peak is against the fp32 peak, so autocast rows may pass 100")
    return report


def print_report(report):
    """The report as a table with notes."""
    s = report["settings"]
    print(f"{report['device']}, torch {report['torch']}; {s['resize']} px, batch {s['bs']} "
          f"(CD: per domain); {'mean' if s['data'] else 'median'} of {s['iters']} after "
          f"{s['warmup']} warm-up")
    n, c, h, _ = report["conv_peak_shape"]
    print(f"fp32 conv peak (3x3, {c}->{c} channels, {h}x{h}, batch {n}): "
          f"{report['conv_peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"{'step':<42}{'img/s':>9}{'s/iter':>9}{'GFLOP/iter':>12}{'GFLOP/s':>10}"
          f"{'% peak':>8}{'peak MiB':>10}")
    for r in report["rows"]:
        print(f"{r['name']:<42}{r['images_per_s']:9.1f}{r['s_per_iter']:9.4f}"
              f"{r['flops_per_iter'] / 1e9:12.2f}{r['flops_per_s'] / 1e9:10.1f}"
              f"{r['peak_pct']:8.1f}{r['peak_memory_bytes'] / 2**20:10.0f}")
    for r in report["rows"]:
        if "convolutions" in r:
            fwd, bwd = r["convolutions"]["forward"], r["convolutions"]["backward"]
            print(f"{r['name']}: convolutions take {100 * fwd['share_of_step']:.0f}% (forward) + "
                  f"{100 * bwd['share_of_step']:.0f}% (backward) of the step, at "
                  f"{fwd['peak_pct']:.0f}% and {bwd['peak_pct']:.0f}% of the peak")
    for width, flops in report.get("reference_flops", {}).items():
        print(f"seed loop FLOPs at e2_feats {width}: {flops / 1e9:.2f} GFLOP per iteration")
    if "ratio" in report:
        print(f"ours / seed loop (images/s): {report['ratio']:.2f}x")
    for step, ratios in report.get("distance_cost", {}).items():
        print(f"{step}, time per iteration relative to --perceptual {next(iter(ratios))}: "
              + ", ".join(f"{kind} {ratio:.2f}x" for kind, ratio in ratios.items()))
    for note in report["notes"]:
        print(f"note: {note}")


# ------------------------------------------------------------------------------------------------
# Time to quality (--quality): a real training run for a fixed wall time, scored on ground truth

QUALITY_DEMO_TRAIN = 2000  # training images per domain of the demo set --quality draws


def quality_data(args, folder):
    """--data if given (it must hold ground truth), else a demo set drawn into `folder`."""
    import ground_truth
    if args.data:
        ground_truth.read_ground_truth(args.data)
        return args.data
    root = data.make_demo(os.path.join(folder, "demo"), QUALITY_DEMO_TRAIN, size=args.resize)
    ground_truth.write_ground_truth(root, QUALITY_DEMO_TRAIN, size=args.resize)
    return root


def train_for(minutes, cmd):
    """Run train.py (`cmd`) for `minutes` of wall time, then SIGTERM its process group: it
    finishes its step and saves. Returns its stderr's last lines when it failed."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate()
    if proc.returncode not in (0, 130):
        raise UserError(f"--quality: train.py failed: {err.strip().splitlines()[-1:]}")


def quality_report(args):
    """Train for --minutes, then the ground-truth scores of the saved model."""
    import eval as evaluate
    import ground_truth
    if args.minutes <= 0:
        raise UserError("--minutes must be positive")
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        root, run = quality_data(args, folder), os.path.join(folder, "run")
        flags = ["--root", root, "--out", run, "--resize", str(args.resize), "--bs",
                 str(args.bs), "--crop", "0", "--iters", str(10**9), "--save_iter", str(10**9),
                 "--display_iter", str(10**9), "--progress_iter", "50", "--device", str(device),
                 *shlex.split(args.cd_flags)]
        start = time.perf_counter()
        train_for(args.minutes, [sys.executable, os.path.join(os.path.dirname(
            os.path.abspath(__file__)), "train.py"), *flags])
        seconds = time.perf_counter() - start
        model, ckpt = evaluate.load_model(run, device)
        scores, _ = ground_truth.score_cd(model, ckpt["config"], root, folder)
    return {"device": f"{device} ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "settings": vars(args), "train_flags": flags[4:],
            "minutes": seconds / 60, "iterations": ckpt["step"], "ground_truth": scores}


def print_quality(report):
    """The time-to-quality report as lines."""
    g = report["ground_truth"]
    print(f"{report['device']}, torch {report['torch']}: {report['iterations']} iterations in "
          f"{report['minutes']:.1f} min ({' '.join(report['train_flags'])})")
    for key in ("specific_gain", "transfer_gain", "colour_share", "region_mse", "outside_mse"):
        print(f"{key:<16}{g[key]:10.4f}")
    print(f"{'removal mse':<16}{g['removal']['mse']:10.4f}")


def main(argv=None):
    """Parse the flags, run the bench, print the table and write the JSON."""
    args = build_parser().parse_args(argv)
    if args.quality:
        report = quality_report(args)
        print_quality(report)
    else:
        report = run_bench(args)
        print_report(report)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    run_cli(main)
