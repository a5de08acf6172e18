"""Reconstruction distances: GLO's Laplacian-pyramid L1 by hand, and --perceptual of both methods
(CD: l2 | lap1 | vgg; OverLORD: vgg | lap1 | l1) through their command lines, on tiny data."""
import contextlib
import io
import json
import os

import pytest
import torch
import torch.nn.functional as F

import train
import utils
from conftest import TINY_CD
from data import make_demo_labeled
from models import Lap1Distance


@pytest.fixture(scope="module", autouse=True)
def one_thread(tmp_path_factory):
    """One thread (the machine is shared) and an empty torch hub (no real VGG16 is found)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
        yield
    torch.set_num_threads(threads)


def cli(*args):
    """train.main(args) under run_cli, as the command line runs it: (status, stdout, stderr)."""
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            utils.run_cli(lambda: train.main([str(a) for a in args]))
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
    return status, out.getvalue(), err.getvalue()


def one_error_line(result, *needles):
    """Exit status 2, one `error:` line (ours or argparse's) naming every needle, no traceback."""
    status, _, err = result
    assert status == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err


def checkerboard(side=8):
    """(1, 3, side, side) of +-1 in a checkerboard: the finest band only."""
    i = torch.arange(side)
    return ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().expand(1, 3, side, side)


# ------------------------------------------------------------------------------------------------
# Lap1 by hand

def test_lap1_hand_computation():
    lap1 = Lap1Distance()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert lap1(x, x) == 0
    # a constant offset lives only in the low-pass residual (4x4 here), weighed 1 per pixel
    assert torch.isclose(lap1(x + 0.3, x), torch.tensor(0.3), atol=1e-6)
    # the binomial blur of a checkerboard is 0, so it is all finest band: mean |band| = 1
    zeros = torch.zeros(1, 3, 8, 8)
    assert torch.isclose(lap1(checkerboard(), zeros), torch.tensor(1.0))
    # both at once add up per level (1 + 0.5), where pixel L1 mixes them (mean of 1.5 and 0.5)
    assert torch.isclose(lap1(checkerboard() + 0.5, zeros), torch.tensor(1.5))
    assert torch.isclose((checkerboard() + 0.5).abs().mean(), torch.tensor(1.0))
    assert [t.shape[-1] for t in lap1.pyramid(x)] == [16, 8, 4]


def test_lap1_gradients_flow_and_stay_float32_under_autocast():
    a = torch.rand(2, 3, 16, 16, requires_grad=True)
    b = torch.rand(2, 3, 16, 16)
    Lap1Distance()(a, b).backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Lap1Distance()(a.bfloat16(), b).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# CD --perceptual

def test_cd_default_is_the_seeds_mse():
    assert train.build_parser().parse_args([]).perceptual == "l2"
    assert train.reconstruction_distance({"perceptual": "l2"}, torch.device("cpu")) is F.mse_loss


def test_cd_lap1_trains_and_the_choice_rides_in_the_checkpoint(two_domains, tmp_path):
    out = tmp_path / "run"
    status, _, err = cli("--root", two_domains, "--out", out, "--iters", "2", "--perceptual",
                         "lap1", *TINY_CD)
    assert status == 0, err[-2000:]
    assert utils.load_checkpoint(str(out), method="cd")["config"]["perceptual"] == "lap1"
    # resuming without the flag keeps it
    status, _, err = cli("--load", out, "--out", out, "--iters", "3", "--n_threads", "0")
    assert status == 0, err[-2000:]
    assert json.load(open(out / "config.json"))["perceptual"] == "lap1"
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[-1]["step"] == 3 and all(r["recon_a"] > 0 for r in records)


TINY_CD_32 = [a if a != "16" else "32" for a in TINY_CD]  # VGG16 halves the side five times


def test_cd_vgg_runs_on_random_weights_and_needs_32_px(two_domains, tmp_path):
    status, _, err = cli("--root", two_domains, "--out", tmp_path / "run", "--iters", "1",
                         "--perceptual", "vgg", "--vgg_weights", "random", *TINY_CD_32)
    assert status == 0, err[-2000:]
    one_error_line(cli("--root", two_domains, "--out", tmp_path / "small", "--iters", "1",
                       "--perceptual", "vgg", "--vgg_weights", "random", *TINY_CD),
                   "--perceptual vgg", "32")


def test_cd_bad_perceptual_values_get_one_line(two_domains, tmp_path):
    run = ["--root", two_domains, "--out", tmp_path / "run", "--iters", "1", *TINY_CD_32]
    one_error_line(cli(*run, "--perceptual", "lap2"), "--perceptual", "lap2")
    one_error_line(cli(*run, "--perceptual", "vgg"), "--vgg_weights", "--perceptual")
    one_error_line(cli(*run, "--perceptual", "vgg", "--vgg_weights", tmp_path / "nope.pth"),
                   "nope.pth")
    one_error_line(cli(*run, "--perceptual", "lap1", "--reproduce", "kozistr"),
                   "--perceptual", "l2")


# ------------------------------------------------------------------------------------------------
# OverLORD --perceptual lap1

TINY_OL = ["label_dim=8", "uncorrelated_dim=8", "generator.max_width=16", "encoder.base=8",
           "encoder.max_width=16", "discriminator.max_width=16",
           "disentanglement.batch_size=8", "disentanglement.n_epochs=1"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return make_demo_labeled(str(tmp_path_factory.mktemp("ol") / "demo"), n=16, size=32)


def overlord(labelled, out, *extra):
    sets = [flag for s in TINY_OL for flag in ("--set", s)]
    return cli("--method", "overlord", "--config", "demo", "--root", labelled, "--out", out,
               "--workers", "0", "--device", "cpu", "--stage", "disentanglement", *sets, *extra)


def test_overlord_lap1_runs(labelled, tmp_path):
    status, _, err = overlord(labelled, tmp_path / "run", "--perceptual", "lap1")
    assert status == 0, err[-2000:]
    ckpt = utils.load_checkpoint(str(tmp_path / "run"), method="overlord")
    assert ckpt["config"]["perceptual"]["kind"] == "lap1"


def test_overlord_bad_perceptual_values_get_one_line(labelled, tmp_path):
    one_error_line(overlord(labelled, tmp_path / "a", "--perceptual", "l2"), "--perceptual")
    one_error_line(overlord(labelled, tmp_path / "b", "--set", "perceptual.kind=lap2"),
                   "lap2", "lap1")
