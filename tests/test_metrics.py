"""eval.py --metrics and --plot: each score's range and meaning on constructed data, trained
against untrained, and both methods end to end on tiny runs (16-32 px, a few steps)."""
import argparse
import contextlib
import io
import json
import os

import cv2
import numpy as np
import pytest
import torch

import eval as ev
import train
import utils
from conftest import TINY_CD, make_two_domains, run_script
from data import make_demo_labeled
from models import VGGDistance, build_cd

# OverLORD networks 8-16 channels wide, batches of 8, one epoch per stage (24 images: 3 steps)
TINY_OL = ["label_dim=8", "uncorrelated_dim=8", "generator.max_width=16", "encoder.base=8",
           "encoder.max_width=16", "discriminator.max_width=16",
           "disentanglement.batch_size=8", "disentanglement.n_epochs=1",
           "amortization.batch_size=8", "amortization.n_epochs=1",
           "synthesis.batch_size=8", "synthesis.n_epochs=1"]
OL_RUN = ["--perceptual", "l1", "--workers", "0", "--device", "cpu"]
SECTIONS = {"reconstruction", "leakage", "classifier", "transfer", "diversity"}
REPORT_KEYS = {"method", "run", "trained", "data", "images", "settings", "notes", "metrics"}


@pytest.fixture(scope="module", autouse=True)
def quiet_machine(tmp_path_factory):
    """One thread (a shared 2-core machine), and an empty torch hub: no real VGG weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
        yield
    torch.set_num_threads(threads)


def quiet(fn, *args):
    """fn(*args) with its stdout and stderr captured: (result, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        result = fn(*args)
    return result, out.getvalue()


def eval_cli(*args):
    """eval.py's main under run_cli, in this process: (exit status, stdout, stderr)."""
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            utils.run_cli(lambda: ev.main([str(a) for a in args]))
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


def ol_sets(*extra):
    return [flag for s in (*TINY_OL, *extra) for flag in ("--set", s)]


def leaves(metrics):
    return dict(ev.metric_rows(metrics))


def check_ranges(metrics):
    """Every number in its range: accuracies and shares in [0, 1], PSNR finite and positive,
    MSE and distances >= 0."""
    for name, value in leaves(metrics).items():
        if value is None or isinstance(value, str):
            continue
        assert np.isfinite(value), name
        if name.endswith("psnr"):
            assert value > 0, name
        else:
            assert value >= 0, name
        if name.rsplit(".", 1)[-1] in ("linear", "mlp", "chance", "accuracy", "success",
                                       "success_changed"):
            assert value <= 1, name


# ------------------------------------------------------------------------------------------------
# 1. The scores on constructed data

def test_reconstruction_scores_range_and_values():
    torch.manual_seed(0)
    x = 0.8 * torch.rand(4, 3, 16, 16)
    scores = ev.reconstruction_scores(x, x + 0.1)
    assert scores["mse"] == pytest.approx(0.01) and scores["psnr"] == pytest.approx(20)
    perfect = ev.reconstruction_scores(x, x)
    assert perfect["mse"] == 0 and np.isfinite(perfect["psnr"]) and perfect["psnr"] > 0


def test_unchanged_leaves_out_the_most_changed_tenth():
    source = torch.zeros(2, 3, 10, 10)
    moved = source.clone()
    moved[0, :, 0, :] = 1.0          # image 0: 10% of its pixels changed fully
    moved[1, :, :2, :] = 1.0         # image 1: 20% changed; half of that counts
    unchanged = ev.unchanged_per_image(moved, source)
    assert unchanged[0].item() == 0
    assert unchanged[1].item() == pytest.approx(10 / 90)
    assert (ev.unchanged_per_image(torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)) >= 0).all()


def test_balanced_accuracy_weighs_classes_alike():
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert ev.balanced_accuracy(torch.zeros(10, dtype=torch.long), labels, 2) == 0.5
    assert ev.balanced_accuracy(labels, labels, 2) == 1.0
    assert ev.balanced_accuracy(1 - labels, labels, 2) == 0.0


def planted_codes(n, shape, n_classes, strength, seed):
    """Gaussian codes and labels; each label adds `strength` times its own fixed random pattern
    (a dense one, as an attribute shows in a real code)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    dims = int(np.prod(shape))
    patterns = torch.randn(n_classes, dims, generator=torch.Generator().manual_seed(99))
    codes = torch.randn(n, dims, generator=g) + strength * patterns[labels]
    return codes.view(n, *shape), labels


@pytest.mark.parametrize("shape", [(64,), (64, 4, 4)])   # the second is wider than 512: projected
def test_probes_read_a_planted_label_and_not_random_codes(shape):
    held_in, in_labels = planted_codes(240, shape, 3, 1.0, 0)
    held_out, out_labels = planted_codes(120, shape, 3, 1.0, 1)
    planted = ev.leakage(held_in, in_labels, held_out, out_labels, 3)
    assert planted["chance"] == pytest.approx(1 / 3)
    assert planted["linear"] >= 0.95 and planted["mlp"] >= 0.95, planted
    held_in, in_labels = planted_codes(240, shape, 3, 0.0, 2)    # no label in the codes
    held_out, out_labels = planted_codes(120, shape, 3, 0.0, 3)
    random = ev.leakage(held_in, in_labels, held_out, out_labels, 3)
    assert abs(random["linear"] - 1 / 3) < 0.15 and abs(random["mlp"] - 1 / 3) < 0.15, random


def squares(n, colour_of_class, seed, side=16):
    """Images of a coloured 5x5 square at a random place on grey; the colour is the class."""
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(rng.integers(0, len(colour_of_class), n))
    images = torch.full((n, 3, side, side), 0.5)
    for i, label in enumerate(labels):
        top, left = rng.integers(0, side - 5, 2)
        colour = torch.tensor(colour_of_class[label])[:, None, None]             # (3, 1, 1)
        images[i, :, top:top + 5, left:left + 5] = colour
    return images, labels


def test_classifier_learns_a_visible_attribute():
    colours = [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]
    held_in, in_labels = squares(128, colours, 0)
    held_out, out_labels = squares(64, colours, 1)
    net, scores = ev.attribute_classifier(held_in, in_labels, held_out, out_labels, 2)
    assert scores["accuracy"] >= 0.9 and scores["chance"] == 0.5, scores
    # it scores "translations": the same squares, all recoloured red, are classified as class 0
    recoloured, _ = squares(64, [colours[0]] * 2, 1)
    assert (ev.predict(net, recoloured) == 0).float().mean() >= 0.9


def test_diversity_is_zero_for_copies_and_grows_with_spread():
    torch.manual_seed(0)
    base = torch.rand(3, 1, 3, 32, 32)
    vgg = VGGDistance((2, 7), weights="random")
    same = ev.pairwise_diversity(base.expand(3, 4, 3, 32, 32), vgg)
    assert same["pixel_l1"] == 0 and same["vgg_l1"] == pytest.approx(0, abs=1e-6)
    spread = ev.pairwise_diversity((base + 0.2 * torch.randn(3, 4, 3, 32, 32)).clamp(0, 1), vgg)
    assert spread["pixel_l1"] > 0.05 and spread["vgg_l1"] > 0
    assert ev.pairwise_diversity(base.expand(3, 4, 3, 32, 32), None)["vgg_l1"] == "unavailable"
    assert ev.pairwise_diversity(torch.rand(2, 3, 3, 16, 16), vgg)["vgg_l1"] == "unavailable"


def test_fixed_subsets_and_the_held_out_split():
    assert list(ev.fixed_subset(5, 10)) == [0, 1, 2, 3, 4]
    subset = ev.fixed_subset(100, 10)
    assert len(set(subset)) == 10 and list(subset) == sorted(subset)
    assert list(subset) == list(ev.fixed_subset(100, 10))                  # fixed seed
    held_in, held_out = ev.held_out_split(100, 256)
    assert len(held_out) == 20 and len(held_in) == 80 and not set(held_in) & set(held_out)
    assert [len(part) for part in ev.held_out_split(100, 8)] == [8, 8]


# ------------------------------------------------------------------------------------------------
# 2. A trained CD model scores better than an untrained one

def metric_args(**changes):
    return argparse.Namespace(**{**dict(data="", image_root="", metrics_images=256,
                                        skip_bad=False), **changes})


def test_trained_cd_model_beats_the_untrained_one(tmp_path):
    root = make_two_domains(tmp_path / "data")
    out = tmp_path / "run"
    quiet(train.main, ["--root", root, "--out", str(out), "--iters", "40", "--lr", "1e-3",
                       "--progress_iter", "40", *TINY_CD])
    model, ckpt = ev.load_model(str(out), torch.device("cpu"))
    images = ev.cd_metric_images(metric_args(), ckpt["config"])
    torch.manual_seed(ckpt["config"]["seed"])                  # the run's initial weights
    untrained = build_cd(ckpt["config"]).eval()
    trained_scores = ev.cd_metrics(model, images, None)[0]
    untrained_scores = ev.cd_metrics(untrained, images, None)[0]
    for domain in ("A", "B"):
        assert trained_scores["reconstruction"][domain]["psnr"] > \
            untrained_scores["reconstruction"][domain]["psnr"] + 3
    assert trained_scores["transfer"]["add"]["unchanged_l1"] < \
        untrained_scores["transfer"]["add"]["unchanged_l1"]
    check_ranges(trained_scores)
    check_ranges(untrained_scores)


# ------------------------------------------------------------------------------------------------
# 3. The command line on tiny trained runs

@pytest.fixture(scope="module")
def cd_run(tmp_path_factory):
    root = make_two_domains(tmp_path_factory.mktemp("cd") / "data")
    out = str(tmp_path_factory.mktemp("cd") / "run")
    quiet(train.main, ["--root", root, "--out", out, "--iters", "6", "--progress_iter", "1",
                       *TINY_CD])
    return out


@pytest.fixture(scope="module")
def ol_data(tmp_path_factory):
    """24 demo faces of 32 px, 3 hair-colour labels, with hair masks."""
    return make_demo_labeled(str(tmp_path_factory.mktemp("ol") / "demo"), n=24, size=32)


def train_overlord(data, out, *args):
    quiet(train.main, ["--method", "overlord", "--root", data, "--out", out, *OL_RUN, *args])
    return out


@pytest.fixture(scope="module")
def ol_run(ol_data, tmp_path_factory):
    """All three stages, uncorrelated (ffhq preset, narrowed)."""
    return train_overlord(ol_data, str(tmp_path_factory.mktemp("ol") / "run"),
                          "--config", "ffhq", *ol_sets())


def read_report(folder):
    with open(os.path.join(folder, "metrics_eval.json")) as f:
        return json.load(f)


def test_cd_metrics_command_line(cd_run):
    result = run_script("eval.py", "--load", cd_run, "--metrics", "--metrics_images", "5",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(cd_run)
    assert set(report) == REPORT_KEYS and report["method"] == "cd"
    assert report["images"] == {"trainA": 5, "trainB": 5, "testA": 4, "testB": 4}
    metrics = report["metrics"]
    assert set(metrics) == SECTIONS
    assert set(metrics["reconstruction"]) == {"A", "B"}
    assert set(metrics["reconstruction"]["A"]) == {"psnr", "mse"}
    assert set(metrics["leakage"]["common_code"]) == {"linear", "mlp", "chance"}
    assert metrics["leakage"]["common_code"]["chance"] == 0.5
    assert set(metrics["classifier"]) == {"accuracy", "chance"}
    assert {k: set(v) for k, v in metrics["transfer"].items()} == \
        {"add": {"success", "unchanged_l1"}, "remove": {"success", "unchanged_l1"}}
    assert metrics["diversity"]["vgg_l1"] == "unavailable" and metrics["diversity"]["pixel_l1"] >= 0
    check_ranges(metrics)
    for line in ("reconstruction.A.psnr", "leakage.common_code.mlp", "transfer.add.success"):
        assert line in result.stdout
    samples = cv2.imread(os.path.join(cd_run, "metrics_samples.png"))
    assert samples.shape == (4 * 18 + 2, 4 * 18 + 2, 3)      # rows B, B+attribute, A, A-attribute


def test_overlord_metrics_command_line(ol_run):
    result = run_script("eval.py", "--load", ol_run, "--metrics", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(ol_run)
    assert set(report) == REPORT_KEYS and report["method"] == "overlord"
    assert report["images"] == {"held_in": 19, "held_out": 5}      # 20% of 24 held out
    metrics = report["metrics"]
    assert set(metrics) == SECTIONS
    assert set(metrics["reconstruction"]) == {"stage1", "amortized"}
    assert set(metrics["leakage"]) == {"uncorrelated_table", "uncorrelated_amortized"}
    assert metrics["leakage"]["uncorrelated_table"]["chance"] == pytest.approx(1 / 3)
    assert set(metrics["transfer"]) == {"mode", "success", "success_changed", "unchanged_l1"}
    assert metrics["transfer"]["mode"] == "by label"
    assert metrics["diversity"] is None and any("correlated" in n for n in report["notes"])
    check_ranges(metrics)
    assert "held-out split" in result.stdout
    samples = cv2.imread(os.path.join(ol_run, "metrics_samples.png"))
    assert samples.shape == (5 * 34 + 2, 4 * 34 + 2, 3)       # each image, then 3 labels


def test_overlord_metrics_after_stage_one_and_correlated(ol_data, tmp_path):
    stage1 = train_overlord(ol_data, str(tmp_path / "stage1"), "--config", "ffhq", *ol_sets(),
                            "--stage", "disentanglement")
    status, out, err = eval_cli("--load", stage1, "--metrics", "--device", "cpu")
    assert status == 0, err
    metrics = read_report(stage1)["metrics"]
    assert metrics["reconstruction"]["stage1"]["psnr"] > 0
    assert metrics["reconstruction"]["amortized"] is None and metrics["transfer"] is None
    assert metrics["leakage"]["uncorrelated_amortized"] is None
    assert "amortisation stage" in out

    correlated = train_overlord(ol_data, str(tmp_path / "afhq"), "--config", "afhq",
                                *ol_sets("correlated_dim=8"))
    status, out, err = eval_cli("--load", correlated, "--metrics", "--device", "cpu",
                                "--out", tmp_path / "m")
    assert status == 0, err
    metrics = read_report(tmp_path / "m")["metrics"]
    assert metrics["transfer"]["mode"] == "by reference"
    assert metrics["diversity"]["pixel_l1"] >= 0
    assert metrics["diversity"]["vgg_l1"] == "unavailable"
    check_ranges(metrics)


def test_metrics_usage_errors(cd_run, tmp_path):
    status, _, err = eval_cli("--load", cd_run, "--metrics", "--img", "x.png", "--output", "y")
    assert status == 2 and "--img" in err
    status, _, err = eval_cli("--load", cd_run, "--metrics", "--metrics_images", "1",
                              "--device", "cpu")
    assert status == 2 and "--metrics_images" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = eval_cli("--load", empty, "--plot")
    assert status == 2 and "metrics.jsonl" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# 4. Loss curves

def test_plot_cd_run(cd_run, tmp_path):
    result = run_script("eval.py", "--load", cd_run, "--plot", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "loss_curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = ev.PANEL_SIZE
    # recon_a, recon_b, adv, ae, disc: two rows of three panels
    assert cv2.imread(str(path)).shape == (2 * height, 3 * width, 3)


def test_overlord_steps_are_global_across_stages():
    records = [{"stage": "disentanglement", "epoch": 1, "step": 3, "loss": 1.0},
               {"stage": "disentanglement", "epoch": 2, "step": 6, "loss": 0.5},
               {"stage": "amortization", "epoch": 1, "step": 4, "loss": 0.1, "label": 0.2},
               {"stage": "synthesis", "epoch": 1, "step": 2, "adversarial": 0.7,
                "img_per_s": 9.0, "s_per_iter": 0.1}]
    series, boundaries = ev.loss_series(records)
    assert boundaries == [(0, "disentanglement"), (6, "amortization"), (10, "synthesis")]
    assert series["loss"] == [[(3, 1.0), (6, 0.5)], [(10, 0.1)]]     # one segment per stage
    assert series["adversarial"] == [[(12, 0.7)]]
    assert set(series) == {"loss", "label", "adversarial"}


def test_plot_overlord_run(ol_run):
    status, out, err = eval_cli("--load", ol_run, "--plot")
    assert status == 0, err
    path = os.path.join(ol_run, "loss_curves.png")
    assert path in out
    width, height = ev.PANEL_SIZE
    image = cv2.imread(path)
    assert image.shape == (3 * height, 3 * width, 3)           # nine losses over three stages
    # stage boundaries are drawn as grey vertical lines inside the first panel
    left, right, top, bottom = ev.PLOT_MARGINS
    column = image[top + 20:height - bottom - 2, left + 1:width - right - 1]
    grey = (np.abs(column.astype(int) - ev.GREY[0]).max(axis=2) < 8).mean(axis=0) > 0.8
    assert grey.sum() >= 2


def test_plot_draws_a_log_axis_for_wide_ranges():
    scale, low, high, log = ev.y_axis([1e-4, 1.0, 10.0])
    assert log and scale(10.0) == 1.0 and low < -4 < 1 < high
    assert not ev.y_axis([0.1, 0.5])[3] and not ev.y_axis([-1.0, 100.0])[3]
    assert ev.draw_panel("x", [[(0, 1.0)]], [], 0).shape == (ev.PANEL_SIZE[1],
                                                            ev.PANEL_SIZE[0], 3)
