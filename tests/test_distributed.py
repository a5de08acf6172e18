"""torchrun with 2 CPU processes (gloo) trains to the same place as 1 process with the same
global batch: batches are split across processes and gradients averaged before each step."""
import os
import subprocess
import sys

import torch

import train
from conftest import ROOT, TINY_CD
from data import make_demo_labeled


def torchrun(*args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "train.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def weights(run):
    return torch.load(os.path.join(run, "checkpoint"), weights_only=True)["models"]["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5), key


def test_cd_two_processes_match_one(two_domains, tmp_path):
    tiny = [a for a in TINY_CD if a not in ("--bs", "2")] + ["--bs", "4"]
    args = ["--root", two_domains, "--iters", "3", "--progress_iter", "1", *tiny]
    train.main([*args, "--out", str(tmp_path / "one")])
    r = torchrun(*args, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # rank 0 alone writes


def test_overlord_two_processes_match_one(tmp_path):
    data = make_demo_labeled(str(tmp_path / "data"), n=16, size=32, masks=False)
    sets = ["label_dim=4", "uncorrelated_dim=4", "uncorrelated_std=0.0",
            "generator.max_width=8", "encoder.base=4", "encoder.max_width=8",
            "disentanglement.batch_size=8", "disentanglement.n_epochs=1",
            "amortization.batch_size=8", "amortization.n_epochs=1"]
    args = ["--method", "overlord", "--config", "demo", "--root", data, "--perceptual", "l1",
            "--workers", "0", "--device", "cpu", *[x for s in sets for x in ("--set", s)]]
    for stage in ("disentanglement", "amortization"):
        load = ["--load", str(tmp_path / "one")] if stage == "amortization" else []
        train.main([*args, "--stage", stage, "--out", str(tmp_path / "one"), *load])
        load = ["--load", tmp_path / "two"] if stage == "amortization" else []
        r = torchrun(*args, "--stage", stage, "--out", tmp_path / "two", *load)
        assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    # each process saved its own random stream and, resumed for stage 2, kept it (not rank 0's)
    states = torch.load(tmp_path / "two" / "checkpoint", weights_only=True)["rng_by_rank"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


def test_global_batch_must_split_evenly(two_domains, tmp_path):
    tiny = [a for a in TINY_CD if a not in ("--bs", "2")] + ["--bs", "3"]
    r = torchrun("--root", two_domains, "--iters", "1", *tiny, "--out", tmp_path / "x")
    assert r.returncode != 0 and "must be divisible by the 2 processes" in r.stderr
