"""Checks that need a CUDA GPU (skipped without one, so CI stays green). On a GPU machine:
    python -m pytest -q tests/test_cuda.py
Both methods (and CD's --mask) train and resume on cuda in fp32, --amp bf16, --amp fp16,
--channels_last and --compile, with finite losses close to the CPU's first step (--mask: finite,
and its removal and masks run there); eval.py's grids, apply mode and
--metrics run there; the collective helpers run on an NCCL process group (torchrun, one process
per GPU, a group of one on a single GPU) with CUDA tensors and with the values they log."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import eval as evaluate
import train
from conftest import ROOT, TINY_CD, make_two_domains
from models import ILN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = ["--device", "cuda"]  # given after TINY_CD's --device cpu, so it wins
MODES = {"fp32": [], "bf16": ["--amp", "bf16"], "fp16": ["--amp", "fp16"],
         "channels_last": ["--channels_last"], "compile": ["--compile"]}
# first-step losses on the GPU against the CPU: TF32 convolutions and reduced precision differ
TOLERANCE = {"fp32": 2e-2, "channels_last": 2e-2, "compile": 2e-2, "bf16": 1e-1, "fp16": 5e-2}


def first_record(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return json.loads(f.readline())


def finite(record, names):
    return all(torch.isfinite(torch.tensor(record[n])) for n in names)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return make_two_domains(tmp_path_factory.mktemp("cuda_data") / "data")


@pytest.fixture(scope="module")
def cpu_first_step(domains, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("cpu") / "run")
    train.main(["--root", domains, "--iters", "1", "--progress_iter", "1", "--out", run,
                *TINY_CD])
    return first_record(run)


@pytest.mark.parametrize("mode", list(MODES))
def test_cd_trains_and_resumes_on_cuda(mode, domains, cpu_first_step, tmp_path):
    run = str(tmp_path / "run")
    args = ["--root", domains, "--progress_iter", "1", "--out", run, *TINY_CD, *CUDA,
            *MODES[mode]]
    train.main([*args, "--iters", "2"])
    train.main(["--load", run, "--iters", "3"])
    ckpt = torch.load(os.path.join(run, "checkpoint"), weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["device"] == CUDA[1]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3]
    names = ("recon_a", "recon_b", "adv", "ae", "disc")
    assert all(finite(r, names) for r in records)
    for name in names:
        assert records[0][name] == pytest.approx(cpu_first_step[name], rel=TOLERANCE[mode],
                                                 abs=1e-3), name


def test_cd_eval_grids_apply_and_metrics_on_cuda(domains, tmp_path):
    run = str(tmp_path / "run")
    train.main(["--root", domains, "--iters", "2", "--out", run, *TINY_CD, *CUDA])
    evaluate.main(["--load", run, "--out", str(tmp_path / "eval"), *CUDA])
    assert (tmp_path / "eval" / "experiments_000002.png").exists()
    a = os.path.join(domains, "testA", "0.png")
    b = os.path.join(domains, "testB", "0.png")
    evaluate.main(["--load", run, "--img", b, "--reference", a, "--output",
                   str(tmp_path / "out.png"), *CUDA])
    evaluate.main(["--load", run, "--img", a, "--remove", "--output",
                   str(tmp_path / "plain.png"), *CUDA])
    assert data.read_image(str(tmp_path / "out.png")).shape == (16, 16, 3)
    evaluate.main(["--load", run, "--metrics", "--metrics_images", "4", *CUDA])
    report = json.loads(open(os.path.join(run, "metrics_eval.json")).read())
    assert report["metrics"]["reconstruction"]["A"]["psnr"] > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_cd_mask_trains_resumes_and_removes_on_cuda(mode, domains, tmp_path):
    run = str(tmp_path / "run")
    args = ["--root", domains, "--progress_iter", "1", "--display_iter", "2", "--out", run,
            "--mask", *TINY_CD, *CUDA, *MODES[mode]]
    train.main([*args, "--iters", "2"])
    train.main(["--load", run, "--iters", "3"])
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(finite(r, (*train.MASK_LOSS_WEIGHTS, "mask_area", "ae", "disc")) for r in records)
    assert os.path.exists(os.path.join(run, "segmentation_000002.png"))
    a = os.path.join(domains, "testA", "0.png")
    evaluate.main(["--load", run, "--img", a, "--remove", "--output",
                   str(tmp_path / "plain.png"), *CUDA])
    evaluate.main(["--load", run, "--masks", str(tmp_path / "masks"), "--img", a, *CUDA])
    assert len(os.listdir(tmp_path / "masks")) == 2


def overlord_args(prepared, run):
    sets = ["label_dim=4", "uncorrelated_dim=4", "uncorrelated_std=0.0",
            "generator.max_width=8", "encoder.base=4", "encoder.max_width=8",
            "discriminator.max_width=8", "disentanglement.batch_size=8",
            "disentanglement.n_epochs=1", "amortization.batch_size=8",
            "amortization.n_epochs=1", "synthesis.batch_size=8", "synthesis.n_epochs=1"]
    return ["--method", "overlord", "--config", "demo", "--root", prepared, "--perceptual", "l1",
            "--workers", "0", "--out", run, *[x for s in sets for x in ("--set", s)]]


def test_overlord_trains_resumes_manipulates_and_measures_on_cuda(tmp_path):
    prepared = data.make_demo_labeled(str(tmp_path / "prepared"), n=16, size=32, masks=False)
    cpu, gpu = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    train.main([*overlord_args(prepared, cpu), "--device", "cpu", "--stage", "disentanglement"])
    train.main([*overlord_args(prepared, gpu), *CUDA, "--stage", "disentanglement"])
    assert first_record(gpu)["loss"] == pytest.approx(first_record(cpu)["loss"], rel=2e-2)
    train.main(["--method", "overlord", "--load", gpu, *CUDA])  # the later stages, resumed
    ckpt = torch.load(os.path.join(gpu, "checkpoint"), weights_only=True)
    assert ckpt["done"] == ["disentanglement", "amortization", "synthesis"]
    with open(os.path.join(gpu, "metrics.jsonl")) as f:
        assert all(all(torch.isfinite(torch.tensor(v)) for k, v in json.loads(line).items()
                       if isinstance(v, float)) for line in f)
    face = str(tmp_path / "face.png")
    data.write_image(face, np.array(data.load_prepared(prepared).images[0]))
    evaluate.main(["--load", gpu, "--img", face, "--output", str(tmp_path / "all.png"), *CUDA])
    evaluate.main(["--load", gpu, "--img", face, "--reference", face, "--output",
                   str(tmp_path / "ref.png"), *CUDA])
    evaluate.main(["--load", gpu, "--out", str(tmp_path / "grids"), *CUDA])
    evaluate.main(["--load", gpu, "--metrics", "--metrics_images", "8", *CUDA])
    assert os.path.exists(os.path.join(gpu, "metrics_eval.json"))


def test_iln_under_fp16_autocast_at_256_px():
    norm = ILN(8).cuda()
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).cuda()
    x = torch.randn(2, 3, 256, 256, device="cuda") * 4
    with torch.autocast("cuda", dtype=torch.float16):
        y = norm(conv(x))
    reference = norm(conv(x))
    assert torch.isfinite(y).all()
    assert torch.allclose(y.float(), reference, atol=5e-2, rtol=5e-2)


COLLECTIVES = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
import utils
rank, world, device = utils.init_distributed("cuda")
assert utils.distributed() and device.type == "cuda"
values = utils.average_values({"loss": float(rank)})           # a CPU tensor: the gloo part
p = torch.nn.Parameter(torch.ones(3, device=device))
p.grad = torch.full((3,), float(rank + 1), device=device)
utils.average_gradients([p])                                   # CUDA tensors: NCCL
flags = utils.any_process(rank == 0, False)
ranks = utils.gather_objects(rank)
entries = utils.rng_entries()
assert values == {"loss": (world - 1) / 2}, values
assert p.grad.tolist() == [(world + 1) / 2] * 3, p.grad
assert flags == [True, False] and ranks == list(range(world))
assert ("rng_by_rank" in entries) == (world > 1)
utils.close_distributed()
print("collectives ok", world)
"""


def torchrun(*args, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_collectives_on_an_nccl_group(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    nproc = min(torch.cuda.device_count(), 2)
    r = torchrun(script, ROOT, nproc=nproc)
    assert r.returncode == 0 and f"collectives ok {nproc}" in r.stdout, r.stderr[-3000:]


def test_torchrun_training_logs_on_nccl(domains, tmp_path):
    nproc = min(torch.cuda.device_count(), 2)
    run = tmp_path / "run"
    r = torchrun(os.path.join(ROOT, "train.py"), "--root", domains, "--iters", "3",
                 "--progress_iter", "1", "--out", run, *TINY_CD, *CUDA, nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
