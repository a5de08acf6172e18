"""train.py --tensorboard, both methods: every metrics line as scalars and every grid as an image
in RUN/tensorboard; kept by --load; one clear line when TensorBoard is missing."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, TINY_CD
from data import make_demo_labeled, read_image
from utils import TENSORBOARD_INSTALL

OL_TINY = ["label_dim=8", "uncorrelated_dim=8", "generator.max_width=16", "encoder.base=8",
           "encoder.max_width=16", "discriminator.max_width=16", "disentanglement.batch_size=8",
           "disentanglement.n_epochs=2"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def board(run):
    """{tag: [(step, value)]} of the scalars and {tag: [(step, height, width)]} of the images."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(os.path.join(run, "tensorboard"),
                                          size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]}
    images = {t: [(e.step, e.height, e.width) for e in events.Images(t)] for t in tags["images"]}
    return scalars, images


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cd_logs_every_metrics_line_and_grid_and_resume_keeps_it(two_domains, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    run = str(tmp_path / "run")
    common = ["--root", two_domains, "--out", run, "--progress_iter", "1", "--display_iter", "2",
              *TINY_CD]
    train.main([*common, "--iters", "2", "--tensorboard"])
    train.main([*common, "--iters", "4", "--load", run])  # the flag comes from the run's config
    scalars, images = board(run)
    lines = metrics(run)
    for name in ("recon_a", "recon_b", "adv", "ae", "disc", "img_per_s"):
        assert scalars[name] == [(m["step"], pytest.approx(m[name], rel=1e-5)) for m in lines]
    grid = read_image(os.path.join(run, "experiments_000004.png"))
    assert images["experiments"] == [(2, *grid.shape[:2]), (4, *grid.shape[:2])]

    train.main([*common, "--iters", "5", "--load", run, "--no-tensorboard"])
    assert board(run)[0]["ae"][-1][0] == 4  # switched off: nothing more was logged


def test_overlord_logs_each_stage_by_epoch(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    data = make_demo_labeled(str(tmp_path / "demo"), n=16, size=32)
    run = str(tmp_path / "ol")
    sets = [flag for s in OL_TINY for flag in ("--set", s)]
    train.main(["--method", "overlord", "--config", "ffhq", "--root", data, "--perceptual", "l1",
                "--out", run, "--workers", "0", "--device", "cpu", "--stage",
                "disentanglement", "--tensorboard", *sets])
    scalars, images = board(run)
    lines = metrics(run)
    assert scalars["disentanglement/reconstruction"] == [
        (m["epoch"], pytest.approx(m["reconstruction"], rel=1e-5)) for m in lines]
    grid = read_image(os.path.join(run, "disentanglement_fixed_0002.png"))
    for kind in ("fixed", "random"):
        assert images[f"disentanglement/{kind}"] == [(1, *grid.shape[:2]), (2, *grid.shape[:2])]
    assert json.load(open(os.path.join(run, "config.json")))["tensorboard"] is True


def test_without_tensorboard_one_line_names_the_install(two_domains, tmp_path):
    blocker = tmp_path / "blocker" / "tensorboard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--root", two_domains,
                        "--out", str(tmp_path / "run"), "--iters", "1", "--tensorboard",
                        *TINY_CD], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(blocker.parent)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --tensorboard needs") and TENSORBOARD_INSTALL in line
    assert not os.path.exists(tmp_path / "run" / "checkpoint")  # stopped before training
