"""What makes long runs safe where users run them: process groups of any size and backend,
fp16 statistics, strict flags, signals to a whole process group, diverging losses, many
labels, the per-process batch, per-rank random streams, and the prepared data's framing."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import bench
import data
import eval as evaluate
import train
import utils
from conftest import ROOT, TINY_CD
from models import ILN
from utils import UserError


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# 1. Collectives on every device: the backend map, and a group of one takes the collective path

def test_a_gpu_process_group_carries_cpu_tensors_too():
    # NCCL alone has no CPU backend: the logged values (a CPU tensor) would fail to all-reduce
    assert utils.process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert utils.process_group_backend(torch.device("cpu")) == "gloo"


def test_torchrun_group_of_one_runs_every_collective(monkeypatch):
    import torch.distributed as dist
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    rank, world, device = utils.init_distributed("cpu")
    try:
        assert (rank, world, device.type) == (0, 1, "cpu")
        assert dist.is_initialized() and utils.distributed()
        assert utils.average_values({"ae": 1.5, "disc": 0.25}) == {"ae": 1.5, "disc": 0.25}
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.full((3,), 2.0)
        utils.average_gradients([p])
        assert torch.equal(p.grad, torch.full((3,), 2.0))
        assert utils.any_process(True, False) == [True, False]
        assert utils.gather_objects({"a": 1}) == [{"a": 1}]
        entries = utils.rng_entries()
        assert set(entries) == {"rng"}  # one process: no per-rank list
    finally:
        utils.close_distributed()
    assert not dist.is_initialized()


def test_without_torchrun_no_group_is_made(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert utils.init_distributed("cpu") == (0, 1, torch.device("cpu"))
    assert not utils.distributed()


# ------------------------------------------------------------------------------------------------
# 2. ILN's statistics in fp32 whatever the input's dtype

def test_iln_fp16_input_at_256_px_matches_fp32():
    torch.manual_seed(0)
    norm = ILN(4)
    with torch.no_grad():
        norm.rho.zero_()  # its start value: the layer statistics alone
    x = torch.randn(2, 4, 256, 256) * 2 + 0.5  # variance 4: (65,536 - 1) * 4 overflows fp16
    reference = norm(x)
    out = norm(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), reference, atol=1e-2, rtol=1e-2)
    assert out.float().std() > 0.5  # not the constant beta


# ------------------------------------------------------------------------------------------------
# 3. Version floors that hold the features the code uses

def test_requirements_floor_torch_at_2_4():
    floors = {}
    for line in open(os.path.join(ROOT, "requirements.txt")):
        name, _, version = line.strip().partition(">=")
        floors[name] = tuple(int(v) for v in version.split("."))
    assert floors["torch"] >= (2, 4)          # fused Adam on the CPU, autocast with spectral norm
    assert floors["torchvision"] >= (0, 19)   # the torchvision of torch 2.4
    installed = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert installed >= floors["torch"][:2]


# ------------------------------------------------------------------------------------------------
# 4. No abbreviated flags: a prefix is an error, never another flag's value

@pytest.mark.parametrize("parser, argv", [
    (train.build_parser, ["--iter", "10"]),
    (train.build_overlord_parser, ["--vgg", "x"]),
    (evaluate.build_parser, ["--load", "x", "--metric"]),
    (data.make_parser, ["demo", "--des", "x"]),
    (bench.build_parser, ["--iter", "3"]),
])
def test_abbreviated_flags_are_refused(parser, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_an_abbreviation_never_trains_the_presets_iterations(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "run"), "--iter", "10"])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# 5. A signal to the whole process group (workers included): saved, resume line, no traceback

def start_in_own_group(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(path, proc, limit_s=300):
    """Until `path` exists (training has run steps) or the process ended."""
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.path.exists(path), proc.communicate()[1][-3000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("method", ["cd", "overlord"])
def test_signal_to_the_process_group_saves_and_says_how_to_resume(method, signum, two_domains,
                                                                  tmp_path):
    run = tmp_path / "run"
    if method == "cd":
        args = ["--root", two_domains, "--iters", "100000", "--progress_iter", "1",
                "--save_iter", "100000", "--display_iter", "100000", "--out", run,
                *TINY_CD, "--n_threads", "2"]  # the later --n_threads wins: two workers
    else:
        prepared = data.make_demo_labeled(str(tmp_path / "prepared"), n=16, size=32, masks=False)
        sets = ["label_dim=4", "uncorrelated_dim=4", "generator.max_width=8", "encoder.base=4",
                "encoder.max_width=8", "disentanglement.batch_size=8",
                "disentanglement.n_epochs=100000"]
        args = ["--method", "overlord", "--config", "demo", "--root", prepared, "--perceptual",
                "l1", "--workers", "2", "--device", "cpu", "--out", run,
                *[x for s in sets for x in ("--set", s)]]
    proc = start_in_own_group(args, tmp_path)
    try:
        wait_for(run / "metrics.jsonl", proc)
        os.killpg(proc.pid, signum)  # as scancel, timeout, systemd or Ctrl-C in a terminal
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    assert f"resume with --load {run}" in err
    ckpt = torch.load(run / "checkpoint", weights_only=True)
    assert ckpt["step"] >= 1


# ------------------------------------------------------------------------------------------------
# 6. Many labels: the by-label modes render a capped or chosen set

def test_chosen_labels_cap_pick_and_refuse(capsys):
    cfg = {"n_labels": 10_000, "root": "/nowhere"}
    labels = evaluate.chosen_labels("", cfg)
    assert len(labels) == evaluate.MAX_TARGET_LABELS == len(set(labels))
    assert labels == evaluate.chosen_labels("", cfg)  # a fixed-seed choice
    assert "--labels" in capsys.readouterr().err
    assert evaluate.chosen_labels("3, 17,42", cfg) == [3, 17, 42]
    assert evaluate.chosen_labels("", {"n_labels": 3, "root": ""}) == [0, 1, 2]
    for bad in ("10000", "blonde", "-1"):
        with pytest.raises(UserError, match="--labels"):
            evaluate.chosen_labels(bad, cfg)


def test_chosen_labels_by_name(tmp_path):
    prepared = data.make_demo_labeled(str(tmp_path / "demo"), n=12, size=16, masks=False)
    names = data.load_prepared(prepared).label_names
    cfg = {"n_labels": len(names), "root": prepared}
    assert evaluate.chosen_labels(f"{names[2]},0", cfg) == [2, 0]


# ------------------------------------------------------------------------------------------------
# 7. The minibatch-stddev check on each process's share, before any stage runs

def test_synthesis_batch_is_checked_per_process():
    cfg = train.resolve_overlord_config(["--config", "ffhq", "--root", "x",
                                         "--set", "synthesis.batch_size=12"])[0]
    train.check_batch_sizes(cfg, world=1)  # 12 on one process: three groups of 4
    with pytest.raises(UserError, match=r"12 \(6 on each of 2 processes\).*multiple of 4"):
        train.check_batch_sizes(cfg, world=2)
    train.check_batch_sizes(dict(cfg, synthesis=dict(cfg["synthesis"], batch_size=16)), world=2)
    with pytest.raises(UserError, match="disentanglement.batch_size 32.*3 processes"):
        train.check_batch_sizes(cfg, world=3)


# ------------------------------------------------------------------------------------------------
# 8. Each process keeps its own random stream across a resume

def test_restore_rng_takes_each_ranks_own_state():
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(utils.rng_state())
    ckpt = {"rng": states[0], "rng_by_rank": states, "step": 7}
    draws = {}
    for rank in (0, 1):
        utils.restore_rng(ckpt, rank, 2, seed=0)
        draws[rank] = torch.rand(4)
    torch.manual_seed(2)
    assert torch.equal(draws[1], torch.rand(4)) and not torch.equal(draws[0], draws[1])
    # another world size: rank 0 continues the saved stream, the others get streams of their own
    fresh = {}
    for rank in (0, 1, 2):
        utils.restore_rng(ckpt, rank, 3, seed=0)
        fresh[rank] = torch.rand(4)
    assert torch.equal(fresh[0], draws[0])
    assert len({tuple(v.tolist()) for v in fresh.values()}) == 3


# ------------------------------------------------------------------------------------------------
# 9. Manipulation frames a photo as the preparation framed the training images

def test_celeba_crop_is_recorded_and_applied(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "img_align_celeba"
    root.mkdir()
    frame = (rng.random((218, 178, 3)) * 255).astype(np.uint8)  # CelebA's aligned frame
    for i in range(4):
        data.write_image(str(root / f"{i:06d}.png"), frame)
    ids = tmp_path / "identity_CelebA.txt"
    ids.write_text("".join(f"{i:06d}.jpg {i % 2}\n" for i in range(4)))
    dest = data.prepare_celeba_identities(str(root), str(ids), str(tmp_path / "prep"),
                                          crop_size=128, img_size=64)
    prepared = data.load_prepared(dest)
    assert prepared.meta["crop"] == 128 and prepared.meta["crop_of"] == 178
    fields = prepared.config_fields()
    assert (fields["input_crop"], fields["input_crop_of"]) == (128, 178)
    cfg = {**fields, "img_shape": [64, 64, 3]}
    expected = data.preprocess(frame[45:173, 25:153], 0, 64, signed=False)
    assert torch.allclose(evaluate.overlord_input(str(root / "000000.png"), cfg, "image")[0],
                          expected)
    # the same framing at twice the size: 256 px of a 356 px shorter side
    big = tmp_path / "big.png"
    data.write_image(str(big), frame.repeat(2, 0).repeat(2, 1))
    x = evaluate.overlord_input(str(big), cfg, "image")[0]
    assert (x - expected).abs().mean() < 0.02
    # a run prepared before the framing was recorded keeps the largest central square
    old = {"img_shape": [64, 64, 3]}
    centred = data.preprocess(frame, 0, 64, signed=False)
    assert torch.allclose(evaluate.overlord_input(str(root / "000000.png"), old, "image")[0],
                          centred)


# ------------------------------------------------------------------------------------------------
# 10. A diverging run stops with one line, a non-zero exit, and no NaN saved

def nan_after(step_fn, good_steps, calls):
    def step(*args, **kwargs):
        calls.append(1)
        losses = step_fn(*args, **kwargs)
        if len(calls) <= good_steps:
            return losses
        if "recon_a" in losses:  # CD's train_step: floats
            return {**losses, "recon_a": float("nan")}
        return {**losses, "reconstruction": torch.tensor(float("nan"))}  # OverLORD: tensors
    return step


def test_cd_nan_loss_stops_and_keeps_the_last_good_checkpoint(two_domains, tmp_path, capsys,
                                                              monkeypatch):
    run = tmp_path / "run"
    args = ["--root", two_domains, "--iters", "10", "--save_iter", "2", "--progress_iter", "1",
            "--display_iter", "100", "--out", str(run), "--lr", "0.001", *TINY_CD]
    monkeypatch.setattr(train, "train_step", nan_after(train.train_step, 3, []))
    with pytest.raises(SystemExit) as e:
        utils.run_cli(lambda: train.main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "Traceback" not in err
    for needle in ("recon_a loss is nan", "iteration 4", "last good checkpoint (iteration 2)",
                   f"python train.py --load {run} --lr 0.0001"):
        assert needle in line[0], line[0]
    ckpt = torch.load(run / "checkpoint", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["models"]["model"].values()
               if t.is_floating_point())


def test_overlord_nan_loss_stops_the_stage(tmp_path, capsys, monkeypatch):
    prepared = data.make_demo_labeled(str(tmp_path / "prepared"), n=16, size=32, masks=False)
    sets = ["label_dim=4", "uncorrelated_dim=4", "generator.max_width=8", "encoder.base=4",
            "encoder.max_width=8", "disentanglement.batch_size=8",
            "disentanglement.n_epochs=5"]
    monkeypatch.setitem(train.STAGE_STEPS, "disentanglement",
                        nan_after(train.STAGE_STEPS["disentanglement"], 4, []))
    args = ["--method", "overlord", "--config", "demo", "--root", prepared, "--perceptual", "l1",
            "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run"),
            *[x for s in sets for x in ("--set", s)]]
    with pytest.raises(SystemExit) as e:
        utils.run_cli(lambda: train.main(args))
    assert e.value.code == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")][0]
    for needle in ("reconstruction loss is nan", "disentanglement batch 5",
                   "last good checkpoint (disentanglement batch 4)",
                   "--set disentanglement.learning_rate.latent=0.001"):
        assert needle in line, line
    ckpt = torch.load(tmp_path / "run" / "checkpoint", weights_only=True)
    assert (ckpt["stage"], ckpt["step"]) == ("disentanglement", 4)


def test_fp16_tolerates_a_few_skipped_steps():
    watch = train.DivergenceWatch("fp16")
    nan = {"ae": float("nan")}
    assert not any(watch.update(nan) for _ in range(train.NONFINITE_STEPS["fp16"] - 1))
    assert not watch.update({"ae": 1.0})  # a finite step resets the count
    assert not any(watch.update(nan) for _ in range(train.NONFINITE_STEPS["fp16"] - 1))
    assert watch.update(nan)
    assert "20 steps in a row" in watch.what()
    assert train.DivergenceWatch("off").update({"ae": float("inf")})
