"""paper_metrics.py and eval.py --metrics --paper: the Fréchet distance and KID against
independent computations, the InceptionV3 and LPIPS pipelines on random networks (nothing is
downloaded), the weight loaders' refusals, dlib's face figures on a real photograph, and the
command line on a tiny CD run and on OverLORD models."""
import argparse
import importlib.util
import json
import os

import cv2
import numpy as np
import pytest
import torch

import paper_metrics as pm
import train
import utils
from conftest import TINY_CD, make_two_domains
from data import load_prepared, make_demo_labeled
from models import build_overlord
from test_metrics import OL_RUN, eval_cli, ol_sets, quiet

HAS_LIBRARIES = all(importlib.util.find_spec(m) for m in ("lpips", "pytorch_fid"))
HAS_DLIB = all(importlib.util.find_spec(m) for m in ("dlib", "face_recognition_models"))
needs_libraries = pytest.mark.skipif(not HAS_LIBRARIES, reason=pm.METRICS_INSTALL)
needs_dlib = pytest.mark.skipif(not HAS_DLIB, reason="pip install -r requirements-align.txt")
VARIANTS = ("torchvision", "pytorch-fid")


@pytest.fixture(scope="module", autouse=True)
def quiet_machine(tmp_path_factory):
    """One thread (a shared 2-core machine), an empty torch hub, and every download refused."""
    import torchvision.models._api as torchvision_api

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
        mp.setattr(torch.hub, "load_state_dict_from_url", refuse)
        mp.setattr(torch.hub, "download_url_to_file", refuse)
        mp.setattr(torchvision_api, "load_state_dict_from_url", refuse)
        yield
    torch.set_num_threads(threads)


def one_line_error(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message and all(part in message for part in parts), message


# ------------------------------------------------------------------------------------------------
# 1. The Fréchet distance and KID

def scipy_frechet(mu1, cov1, mu2, cov2):
    """The textbook formula with scipy's sqrtm of the product (an independent computation)."""
    from scipy import linalg
    root = linalg.sqrtm(cov1 @ cov2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * root))


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    # commuting (diagonal) covariances: |mu1 - mu2|² + Σ (√a - √b)²
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert pm.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, 1e-10)
    # general covariances
    f1, f2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    cov1, cov2 = f1 @ f1.T, f2 @ f2.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert pm.frechet_distance(mu1, cov1, mu2, cov2) == \
        pytest.approx(scipy_frechet(mu1, cov1, mu2, cov2), 1e-8)
    # singular covariances, where sqrtm of the product is unstable: one shared direction
    u = rng.normal(size=(6, 1))
    assert pm.frechet_distance(mu1, u @ u.T, mu2, u @ u.T) == \
        pytest.approx(((mu1 - mu2) ** 2).sum(), 1e-8)
    assert pm.frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0, abs=1e-8)


@pytest.mark.parametrize("n, d", [(40, 64), (300, 8)])   # fewer samples than dimensions, more
def test_fid_of_features_is_the_distance_of_their_gaussians(n, d):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(n + 7, d))
    expected = scipy_frechet(x.mean(0), np.cov(x, rowvar=False), y.mean(0),
                             np.cov(y, rowvar=False))
    assert pm.fid(x, y) == pytest.approx(expected, rel=1e-6)
    assert pm.fid(x, y) == pytest.approx(pm.frechet_distance(
        x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)), rel=1e-8)
    assert pm.fid(x, x) == pytest.approx(0, abs=1e-9)


def test_fid_of_large_samples_approaches_the_population_distance():
    rng = np.random.default_rng(2)
    cov2 = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
    x = rng.normal(size=(40000, 3))
    y = rng.multivariate_normal([1.0, 0.0, -0.5], cov2, size=40000)
    population = scipy_frechet(np.zeros(3), np.eye(3), np.array([1.0, 0.0, -0.5]), cov2)
    assert pm.fid(x, y) == pytest.approx(population, rel=0.03)


def test_polynomial_mmd_matches_a_direct_sum_over_pairs(monkeypatch):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))

    def k(p, q):
        return (p @ q / 3 + 1) ** 3

    xx = np.mean([k(x[i], x[j]) for i in range(7) for j in range(7) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(5) for j in range(5) if i != j])
    xy = np.mean([k(p, q) for p in x for q in y])
    assert pm.polynomial_mmd(x, y) == pytest.approx(xx + yy - 2 * xy, 1e-12)
    monkeypatch.setattr(pm, "KERNEL_ROWS", 2)                # summed in blocks of rows alike
    assert pm.polynomial_mmd(x, y) == pytest.approx(xx + yy - 2 * xy, 1e-12)


def test_kid_is_near_zero_for_one_distribution_and_clearly_above_for_a_shifted_one():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    same, same_error = pm.kid(x, y)
    shifted, shifted_error = pm.kid(x, y + 0.5)
    assert abs(same) < 3 * same_error and abs(same) < 0.02
    assert shifted > 10 * shifted_error and shifted > 20 * abs(same)
    assert pm.kid(x[:3], y[:3])[1] is None                   # too few for two subsets of two


# ------------------------------------------------------------------------------------------------
# 2. The networks, with random weights (nothing downloaded)

def calibrated_state(variant):
    """A random InceptionV3's state dict whose batch-norm statistics are those of random images,
    so that its features neither vanish nor explode (a stand-in for the real weights)."""
    torch.manual_seed(0)
    net = pm.inception_network(variant)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None                                 # a plain average of the batches
    with torch.no_grad():
        net.train()(torch.rand(2, 3, pm.INCEPTION_SIDE, pm.INCEPTION_SIDE) * 2 - 1)
    return net.state_dict()


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random stand-ins of the three weight files, named as the real ones, in a torch hub."""
    import torchvision
    hub = tmp_path_factory.mktemp("torch_home")
    folder = hub / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    files = {"torchvision": folder / "inception_v3_google-0cc3c7bd.pth",
             "alexnet": folder / "alexnet-owt-7be5be79.pth"}
    torch.save(calibrated_state("torchvision"), files["torchvision"])
    if HAS_LIBRARIES:
        files["pytorch-fid"] = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-x.pth"
        torch.save(calibrated_state("pytorch-fid"), files["pytorch-fid"])
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), files["alexnet"])
    return {"torch_home": str(hub), **{k: str(v) for k, v in files.items()}}


def unfolded_features(variant, state, x):
    """The same features through the network as built, batch norms unfolded."""
    net = pm.inception_network(variant)
    net.load_state_dict(state)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in pm.NORMALISATION[variant])
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                        align_corners=False)
    with torch.no_grad():
        return torch.nn.Sequential(*(getattr(net, n) for n in pm.FEATURE_LAYERS)).eval()(
            (x - mean) / std).flatten(1)


@pytest.mark.parametrize("variant", [
    "torchvision", pytest.param("pytorch-fid", marks=needs_libraries)])
def test_inception_pipeline_end_to_end(variant, weight_files):
    net = pm.load_inception(weight_files[variant])
    assert net.variant == variant and net.source == weight_files[variant]
    torch.manual_seed(1)
    real, fake = torch.rand(6, 3, 32, 32), torch.rand(6, 3, 32, 32).pow(3)
    features = pm.inception_features(net, real)
    assert features.shape == (6, pm.POOL_FEATURES) and features.dtype == np.float64
    assert np.isfinite(features).all() and (features >= 0).all()         # after ReLU and pooling
    assert features.std(0).mean() > 1e-3                                 # not collapsed
    # folding the batch norms leaves the features as they were
    unfolded = unfolded_features(variant, pm.read_state(weight_files[variant], ""), real[:2])
    assert torch.allclose(torch.from_numpy(features[:2]).float(), unfolded, rtol=1e-3, atol=1e-4)
    other = pm.inception_features(net, fake)
    assert pm.fid(features, features) == pytest.approx(0, abs=1e-6)
    assert pm.fid(features, other) > 0.01
    assert pm.kid(features, other)[0] > abs(pm.kid(features, features)[0])


@needs_libraries
def test_lpips_diversity_on_a_random_alexnet(weight_files, monkeypatch):
    monkeypatch.setattr(pm, "LPIPS_IMAGES_PER_PASS", 2)          # 3 images: two passes
    net = pm.load_lpips(weight_files["alexnet"])
    state = torch.load(weight_files["alexnet"], weights_only=True)
    assert torch.equal(net.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(net.net.slice5, "10").weight, state["features.10.weight"])
    torch.manual_seed(2)
    copies = torch.rand(3, 1, 3, 32, 32).expand(-1, 4, -1, -1, -1)
    assert torch.allclose(pm.lpips_diversity(net, copies), torch.zeros(3), atol=1e-6)
    groups = torch.rand(3, 4, 3, 32, 32)
    scores = pm.lpips_diversity(net, groups)
    assert scores.shape == (3,) and (scores > 0).all()
    with torch.no_grad():                            # the mean of lpips' own forward per pair
        direct = [np.mean([net(groups[i, a:a + 1], groups[i, b:b + 1], normalize=True).item()
                           for a in range(4) for b in range(a + 1, 4)]) for i in range(3)]
    assert np.allclose(scores.numpy(), direct, rtol=1e-5)


def test_weight_loaders_refuse_wrong_files(weight_files, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(utils.UserError) as e:
        pm.load_inception(str(text))
    one_line_error(e, str(text), "not an InceptionV3 state dict")
    with pytest.raises(utils.UserError) as e:
        pm.load_inception(weight_files["alexnet"])
    one_line_error(e, "not an InceptionV3 state dict", "inception_v3_google-*.pth",
                   "pt_inception-2015-12-05-*.pth")
    state = torch.load(weight_files["torchvision"], weights_only=True)
    del state["Mixed_6c.branch7x7_1.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(utils.UserError) as e:
        pm.load_inception(str(tmp_path / "partial.pth"))
    one_line_error(e, "Mixed_6c.branch7x7_1.conv.weight")
    if HAS_LIBRARIES:
        with pytest.raises(utils.UserError) as e:
            pm.load_lpips(weight_files["torchvision"])
        one_line_error(e, "not a torchvision AlexNet state dict")
    with pytest.raises(utils.UserError) as e:
        pm.weights_file(str(tmp_path / "missing.pth"), [], "--inception_weights")
    one_line_error(e, "--inception_weights", "no such file")


def test_weights_are_read_from_the_hub_cache_only(weight_files, monkeypatch, tmp_path):
    assert pm.weights_file("", pm.INCEPTION_FILES.values(), "--inception_weights") is None
    note = pm.missing_weights("InceptionV3", pm.INCEPTION_FILES.values(), "--inception_weights")
    assert all(s in note for s in ("--inception_weights", "inception_v3_google-*.pth",
                                   "pt_inception-2015-12-05-*.pth", "nothing is downloaded"))
    monkeypatch.setenv("TORCH_HOME", weight_files["torch_home"])
    assert pm.weights_file("", pm.INCEPTION_FILES.values(), "") == weight_files["torchvision"]
    if HAS_LIBRARIES:   # pytorch-fid's file first, when both are there
        cached = os.path.join(weight_files["torch_home"], "hub", "checkpoints",
                              os.path.basename(weight_files["pytorch-fid"]))
        os.symlink(weight_files["pytorch-fid"], cached)
        try:
            assert pm.weights_file("", pm.INCEPTION_FILES.values(), "") == cached
        finally:
            os.remove(cached)


# ------------------------------------------------------------------------------------------------
# 3. Face metrics

def test_head_pose_recovers_a_known_rotation():
    def rotation(yaw, pitch, roll):
        y, p, r = np.radians([yaw, pitch, roll])
        rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
        ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
        rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
        return rz @ ry @ rx

    side = 256
    camera = np.array([[side, 0, (side - 1) / 2], [0, side, (side - 1) / 2], [0, 0, 1]])
    for angles in ((0, 0, 0), (20, -10, 15), (-35, 12, -8)):
        head = pm.GENERIC_FACE @ rotation(*angles).T + [0, 0, 2000]    # 2 m from the camera
        projected = head @ camera.T
        landmarks = np.zeros((68, 2))
        landmarks[list(pm.POSE_POINTS)] = projected[:, :2] / projected[:, 2:]
        assert pm.head_pose(landmarks, (side, side)) == pytest.approx(angles, abs=0.1)
    assert pm.wrapped_degrees(179.0, -179.0) == pytest.approx(2.0)


@pytest.fixture(scope="module")
def astronaut():
    return pytest.importorskip("skimage.data").astronaut()


@pytest.fixture(scope="module")
def meter():
    if not HAS_DLIB:
        pytest.skip("pip install -r requirements-align.txt")
    return pm.FaceMeter()


def warped(img, matrix):
    return cv2.warpAffine(img, matrix, img.shape[1::-1], flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def test_face_figures_of_the_astronaut_against_moved_copies(astronaut, meter):
    h, w = astronaut.shape[:2]
    content = meter.measure(astronaut)
    i, j = pm.OUTER_EYE_CORNERS
    interocular = np.linalg.norm(content.landmarks[i] - content.landmarks[j])

    # shifted: every landmark moves by the shift, the head keeps its pose and identity
    shift = (12.0, -8.0)
    moved = meter.measure(warped(astronaut, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])))
    scores = pm.face_comparison(content, moved, content)
    assert scores["landmark_error"] == pytest.approx(np.hypot(*shift) / interocular, abs=0.03)
    assert max(scores[f"{a}_error"] for a in ("yaw", "pitch", "roll")) < 3
    assert scores["identity_cosine"] > 0.95

    # rotated by 10 degrees about the image centre: the roll changes by 10, the rest stays
    rotation = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 10, 1.0)
    turned = meter.measure(warped(astronaut, rotation))
    scores = pm.face_comparison(content, turned, content)
    assert scores["roll_error"] == pytest.approx(10, abs=1.5)
    assert scores["yaw_error"] < 3 and scores["pitch_error"] < 3
    expected = np.hstack([content.landmarks, np.ones((68, 1))]) @ rotation.T
    assert np.linalg.norm(turned.landmarks - expected, axis=1).mean() / interocular < 0.05

    # small images are enlarged before dlib looks; a blank one has no face, and is counted
    small = meter.measure(cv2.resize(astronaut, (64, 64), interpolation=cv2.INTER_AREA))
    assert small is not None
    blank = meter.measure(np.full((64, 64, 3), 128, np.uint8))
    assert blank is None
    summary = pm.face_scores([(content, moved, content), (content, blank, content),
                              (blank, turned, content)])
    assert summary["pairs"] == 3 and summary["scored"] == 1
    assert summary["no_face"] == {"content": 1, "translation": 1, "identity_source": 0}
    assert summary["landmark_error"] == pytest.approx(
        pm.face_comparison(content, moved, content)["landmark_error"])


# ------------------------------------------------------------------------------------------------
# 4. The command line and the section

@pytest.fixture(scope="module")
def cd_run(tmp_path_factory):
    """A tiny CD run at 32 px (LPIPS' AlexNet needs 32), 4 test images per domain."""
    root = make_two_domains(tmp_path_factory.mktemp("cd") / "data")
    out = str(tmp_path_factory.mktemp("cd") / "run")
    quiet(train.main, ["--root", root, "--out", out, "--iters", "2", "--progress_iter", "1",
                       *TINY_CD, "--resize", "32"])
    return out


def paper_report(folder):
    with open(os.path.join(folder, "metrics_eval.json")) as f:
        report = json.load(f)
    return report, report["metrics"]["paper"]


def test_paper_section_without_weights_says_what_is_missing(cd_run, tmp_path):
    status, out, err = eval_cli("--load", cd_run, "--metrics", "--paper", "--no_face",
                                "--device", "cpu", "--out", tmp_path)
    assert status == 0, err
    report, paper = paper_report(tmp_path)
    assert paper == {"fid": "unavailable", "kid": "unavailable", "kid_std_error": "unavailable",
                     "lpips": "unavailable", "face": None}
    notes = " ".join(report["notes"])
    for part in ("--inception_weights", "--alexnet_weights", "--no_face", "nothing is "
                 "downloaded"):
        assert part in notes
    assert report["settings"]["paper"]["inception_weights"] == "unavailable"
    assert "paper.fid" in out and "unavailable" in out


def test_paper_section_with_random_weights(cd_run, weight_files, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", weight_files["torch_home"])
    status, out, err = eval_cli("--load", cd_run, "--metrics", "--paper", "--device", "cpu",
                                "--out", tmp_path)
    assert status == 0, err
    report, paper = paper_report(tmp_path)
    for figure in ("fid", "kid", "kid_std_error"):
        assert set(paper[figure]) == {"add", "remove", "mean"}
        assert all(np.isfinite(v) for v in paper[figure].values())
    assert all(v >= 0 for v in paper["fid"].values())
    assert paper["fid"]["mean"] == pytest.approx((paper["fid"]["add"] + paper["fid"]["remove"])
                                                 / 2)
    settings = report["settings"]["paper"]
    assert settings["inception_weights"] == weight_files["torchvision"]
    assert settings["inception_variant"] == "torchvision"
    if HAS_LIBRARIES:
        assert paper["lpips"]["add"] >= 0 and paper["lpips"]["remove"] is None
        assert settings["alexnet_weights"] == weight_files["alexnet"]
    else:
        assert paper["lpips"] == "unavailable" and pm.METRICS_INSTALL in " ".join(report["notes"])
    # the drawn demo faces are faces or not to dlib; either way the section says which
    if paper["face"] is not None:
        assert paper["face"]["pairs"] == 8 and paper["face"]["scored"] <= 8
    elif HAS_DLIB:
        assert any("face metrics skipped" in n for n in report["notes"])
    for row in ("paper.fid.add", "paper.kid.remove", "paper.lpips"):
        assert row in out
    assert any(line.startswith("paper.fid.mean") and line.endswith("lower")
               for line in out.splitlines())


def test_paper_usage_errors(cd_run, weight_files, tmp_path):
    status, _, err = eval_cli("--load", cd_run, "--paper")
    assert status == 2 and "--metrics" in err and err.count("\n") == 1
    status, _, err = eval_cli("--load", cd_run, "--metrics", "--paper", "--inception_weights",
                              weight_files["alexnet"], "--out", tmp_path, "--device", "cpu")
    assert status == 2 and "not an InceptionV3 state dict" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "metrics_eval.json")    # stopped before the work


def overlord_model(data, preset, extra=()):
    """An untrained OverLORD of `preset` (narrowed) on `data`, as if amortised."""
    cfg = train.resolve_overlord_config(["--root", data, "--config", preset, *ol_sets(*extra),
                                         *OL_RUN])[0]
    cfg.update(load_prepared(data).config_fields(), root=os.path.abspath(data))
    torch.manual_seed(0)
    return build_overlord(cfg).eval(), {"config": cfg,
                                        "done": ["disentanglement", "amortization"]}


@pytest.mark.parametrize("preset, extra", [("ffhq", ()), ("afhq", ("correlated_dim=8",))])
def test_overlord_paper_section(preset, extra, weight_files, tmp_path):
    """By label (ffhq) and by reference (afhq, correlated: several references, so LPIPS)."""
    data = make_demo_labeled(str(tmp_path / "demo"), n=24, size=32)
    model, ckpt = overlord_model(data, preset, extra)
    lpips_net = pm.load_lpips(weight_files["alexnet"]) if HAS_LIBRARIES else None
    networks = pm.PaperNetworks(pm.load_inception(weight_files["torchvision"]), lpips_net, None,
                                {"fid": None, "lpips": "not installed", "face": "skipped"})
    args = argparse.Namespace(data="", metrics_images=256)
    section, notes, settings = pm.paper_section(model, ckpt, networks, None, args)
    names = [f"to_{name}" for name in load_prepared(data).label_names]
    assert set(section["fid"]) == {*names, "mean"}
    assert all(v is None or v >= 0 for v in section["fid"].values())
    if lpips_net is not None:
        by_reference = preset == "afhq"
        assert all((v is not None) == by_reference for k, v in section["lpips"].items())
    assert section["face"] is None and "paper: skipped" in notes
    assert settings["inception_variant"] == "torchvision"
    ckpt["done"] = ["disentanglement"]
    assert pm.paper_section(model, ckpt, networks, None, args)[0] is None
