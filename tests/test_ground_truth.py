"""The demo's ground truth (data.py demo --ground_truth) and the scorer (eval.py --ground_truth)."""
import json
import os

import numpy as np
import pytest
import torch

import data
import eval as evaluate
import ground_truth as gt
import train
from conftest import TINY_CD
from utils import UserError

N_TRAIN, N_TEST, SIZE, COUNT = 8, 64, 32, 5  # data.py demo draws 64 test images


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("gt") / "demo")
    data.main(["demo", "--dest", dest, "--n_train", str(N_TRAIN), "--size", str(SIZE)])
    gt.write_ground_truth(dest, N_TRAIN, N_TEST, SIZE, count=COUNT)
    return dest


def test_the_drawer_is_the_same_with_parameters():
    rng, replay = np.random.default_rng(5), np.random.default_rng(5)
    for glasses in (False, True, True):
        img = data.draw_face(rng, 32, glasses=glasses)
        assert np.array_equal(img, data.render_face(*data.draw_face_parameters(replay, glasses),
                                                    32))


def test_ground_truth_puts_a_i_glasses_on_b_j_at_b_j_eyes(demo):
    truth = gt.read_ground_truth(demo)
    paths = data.domain_paths(demo, splits=("testA", "testB"))
    a = [data.read_image(p) for p in paths["testA"][:COUNT]]
    b = [data.read_image(p) for p in paths["testB"][:COUNT]]
    assert truth["transfers"].shape == (COUNT, COUNT, SIZE, SIZE, 3)
    params = gt.demo_test_parameters(N_TRAIN, N_TEST, 0)
    for i in range(COUNT):
        colour = np.array(data.GLASSES_COLOURS[truth["meta"]["colours"][i]])
        for j in range(COUNT):
            t, mask = truth["transfers"][i, j].astype(int), truth["transfer_masks"][i, j] > 0
            # the mask lies where the transfer differs from B_j, and nowhere else visibly
            assert mask.any() and np.abs(t - b[j])[~mask].max() < gt.CHANGED_LEVEL
            assert (np.abs(t - b[j]).max(2)[mask] >= gt.CHANGED_LEVEL).all()
            # A_i's colour, centred on B_j's eyes (64-px frame scaled to SIZE)
            face = params["testB"][j][0]
            for side in (-1, 1):
                x = int((face["cx"] + side * face["eye_dx"]) * SIZE / 64)
                y = int(face["eye_y"] * SIZE / 64)
                assert np.abs(t[y, x] - colour).max() < 40
        assert np.array_equal(a[i], data.render_face(*params["testA"][i], SIZE))
        removal = truth["removals"][i].astype(int)
        visible = np.abs(removal - a[i]).max(2) >= gt.CHANGED_LEVEL
        assert visible.sum() == truth["masks_A"][i].sum()


def test_scores_of_the_truth_the_blind_mean_and_b(demo):
    truth = gt.read_ground_truth(demo)
    side = 16
    true_t = gt.to_unit(truth["transfers"], side)
    b = gt.to_unit(np.stack([data.read_image(p) for p in
                             data.domain_paths(demo)["testB"][:COUNT]]), side)
    removals = gt.to_unit(truth["removals"], side)
    perfect = gt.score_transfers(true_t, removals, truth, b, side)
    assert perfect["specific_gain"] == 1 and perfect["transfer_gain"] == 1
    assert perfect["region_mse"] == 0 and perfect["outside_mse"] == 0
    assert perfect["colour_share"] == 1 and perfect["removal"]["mse"] == 0
    blind = true_t.mean(0, keepdim=True).expand_as(true_t)
    assert gt.score_transfers(blind, removals, truth, b, side)["specific_gain"] == \
        pytest.approx(0, abs=1e-6)
    unchanged = gt.score_transfers(b[None].expand_as(true_t), removals, truth, b, side)
    assert unchanged["transfer_gain"] == pytest.approx(0, abs=1e-6)
    assert unchanged["specific_gain"] < 0 and unchanged["outside_mse"] < 1e-4


def test_region_mse_by_hand():
    pred = torch.zeros(1, 3, 2, 2)
    truth = torch.ones(1, 3, 2, 2)
    truth[..., 0, 0] = 0.5
    mask = torch.tensor([[[[True, False], [False, False]]]])
    assert gt.region_mse(pred, truth, mask) == pytest.approx(0.25)
    assert gt.region_mse(pred, truth, ~mask) == pytest.approx(1.0)


def test_eval_ground_truth_writes_scores_and_montage(demo, tmp_path):
    run = str(tmp_path / "run")
    train.main(["--root", demo, "--iters", "2", "--out", run, *TINY_CD])
    evaluate.main(["--load", run, "--ground_truth", demo, "--device", "cpu"])
    report = json.load(open(os.path.join(run, "metrics_eval.json")))
    scores = report["metrics"]["ground_truth"]
    assert scores["images"] == COUNT and scores["side"] == 16
    for key in ("region_mse", "outside_mse", "transfer_gain", "specific_gain", "colour_share"):
        assert np.isfinite(scores[key]), key
    assert 0 <= scores["colour_share"] <= 1 and scores["removal"]["mse"] >= 0
    montage = data.read_image(os.path.join(run, "ground_truth_montage.png"))
    assert montage.shape[1] == 4 * 16 + 5 * 2  # A, B, prediction, truth
    # with --metrics the scores join the other sections of the same file
    evaluate.main(["--load", run, "--metrics", "--metrics_images", "4", "--ground_truth", demo,
                   "--device", "cpu"])
    report = json.load(open(os.path.join(run, "metrics_eval.json")))
    assert {"reconstruction", "leakage", "ground_truth"} <= set(report["metrics"])


def test_missing_ground_truth_names_the_command(tmp_path):
    with pytest.raises(UserError, match="data.py demo --dest"):
        gt.read_ground_truth(str(tmp_path))


def test_bench_quality_trains_then_scores(demo, tmp_path):
    import bench
    path = tmp_path / "quality.json"
    # the run's own --iters ends it well before --minutes: the test never waits on the clock
    flags = " ".join([*TINY_CD[:-2], "--iters", "3"])
    bench.main(["--quality", "--data", demo, "--resize", "16", "--bs", "2", "--minutes", "10",
                "--device", "cpu", "--cd_flags", flags, "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["iterations"] == 3 and report["ground_truth"]["images"] == COUNT
    assert np.isfinite(report["ground_truth"]["specific_gain"])


# ------------------------------------------------------------------------------------------------
# OverLORD: held-out demo faces with every hair colour

OL_SIZE, OL_FACES = 32, 6
TINY_OL = ["label_dim=8", "uncorrelated_dim=8", "generator.max_width=16", "encoder.base=8",
           "encoder.max_width=16", "discriminator.max_width=16",
           *[f"{stage}.{key}" for stage in ("disentanglement", "amortization", "synthesis")
             for key in ("batch_size=8", "n_epochs=1")]]


@pytest.fixture(scope="module")
def ol_demo(tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("olgt") / "demo")
    data.make_demo_labeled(dest, n=24, size=OL_SIZE)
    gt.write_overlord_ground_truth(dest, OL_SIZE, seed=0, count=OL_FACES)
    return dest


def test_overlord_ground_truth_draws_each_face_with_the_target_hair_colour(ol_demo):
    truth = gt.read_ground_truth(ol_demo, "overlord")
    names = truth["meta"]["labels"]
    assert names == data.load_prepared(ol_demo).label_names  # label k means the same colour
    assert truth["translations"].shape == (OL_FACES, len(names), OL_SIZE, OL_SIZE, 3)
    assert truth["meta"]["first_index"] >= 24                 # never a training face
    for n, own in enumerate(truth["labels"]):
        face = truth["faces"][n].astype(int)
        drawn = data.draw_demo_face(0, gt.HELD_OUT_INDEX + n, OL_SIZE,
                                    truth["meta"]["glasses"][n], data.DEMO_HAIR[names[own]])[0]
        assert np.array_equal(face, drawn)
        for k, name in enumerate(names):
            t, mask = truth["translations"][n, k].astype(int), truth["changed_masks"][n, k] > 0
            gap = np.abs(t - face).max(2)
            # the mask lies where the translation differs from the face, and nowhere else
            assert np.array_equal(mask, gap >= gt.CHANGED_LEVEL)
            assert mask.any() == (k != own)
            if k != own:  # most of the changed pixels wear the target's hair colour
                near = np.abs(t[mask] - data.HAIR_COLOURS[data.DEMO_HAIR[name]]).max(1) < 40
                assert near.mean() > 0.5


def test_labelled_demo_with_four_hair_colours_and_its_ground_truth(tmp_path):
    dest = str(tmp_path / "four")
    data.make_demo_labeled(dest, n=16, size=OL_SIZE, hair="black,blonde,red,grey")
    prepared = data.load_prepared(dest)
    assert prepared.label_names == ["black", "blonde", "red", "grey"]
    assert sorted(np.bincount(prepared.labels)) == [4, 4, 4, 4]
    gt.write_overlord_ground_truth(dest, OL_SIZE, seed=0, count=10, hair="black,blonde,red,grey")
    truth = gt.read_ground_truth(dest, "overlord")
    assert truth["meta"]["labels"] == prepared.label_names
    assert truth["meta"]["hair_rgb"][3] == list(data.HAIR_COLOURS[4])
    assert len(truth["labels"]) == 16                    # rounded up to whole blocks of 8
    pairs = set(zip(truth["labels"].tolist(), truth["meta"]["glasses"]))
    assert len(pairs) == 8                               # every (label, glasses) pair occurs
    # the default's settings are unchanged, so folders drawn before are still reused
    assert data.demo_hair(None) == data.DEMO_HAIR
    for bad in ("black", "black,purple", "red,red"):
        with pytest.raises(data.UserError, match="two or more different colours"):
            data.demo_hair(bad)


def test_overlord_scores_of_the_truth_and_of_the_untranslated_face(ol_demo):
    truth = gt.read_ground_truth(ol_demo, "overlord")
    side = 16
    faces, true_t = gt.to_unit(truth["faces"], side), gt.to_unit(truth["translations"], side)
    perfect = gt.score_translations(true_t, faces, truth, side)
    assert perfect["region_mse"] == 0 and perfect["outside_mse"] == 0
    assert perfect["transfer_gain"] == 1 and perfect["colour_share"] == 1
    assert perfect["reconstruction_mse"] == 0
    assert perfect["translations"] == OL_FACES * 2          # every face to the two other labels
    identity = gt.score_translations(faces[:, None].expand_as(true_t), faces, truth, side)
    assert identity["transfer_gain"] == pytest.approx(0, abs=1e-6)
    assert identity["colour_share"] == 0 and identity["outside_mse"] < 1e-4
    assert identity["region_mse"] == perfect["baselines"]["identity"]["region_mse"]


def test_eval_overlord_ground_truth_writes_scores_and_montage(ol_demo, demo, tmp_path):
    run = str(tmp_path / "ol")
    sets = [flag for s in TINY_OL for flag in ("--set", s)]
    train.main(["--method", "overlord", "--config", "demo", "--root", ol_demo, "--out", run,
                "--workers", "0", "--device", "cpu", "--perceptual", "l1", *sets])
    evaluate.main(["--load", run, "--ground_truth", ol_demo, "--device", "cpu"])
    report = json.load(open(os.path.join(run, "metrics_eval.json")))
    assert report["method"] == "overlord" and report["trained"].startswith("stages done")
    scores = report["metrics"]["ground_truth"]
    assert scores["images"] == OL_FACES and scores["side"] == OL_SIZE
    for key in ("region_mse", "outside_mse", "transfer_gain", "colour_share"):
        assert np.isfinite(scores[key]), key
    assert scores["baselines"]["identity"]["colour_share"] == 0
    montage = data.read_image(os.path.join(run, "ground_truth_montage.png"))
    assert montage.shape[:2] == (OL_FACES * 34 + 2, 7 * 34 + 2)  # face, (pred, truth) x 3
    # each method's ground truth belongs to its own models
    with pytest.raises(UserError, match="ground truth of the cd demo"):
        evaluate.main(["--load", run, "--ground_truth", demo, "--device", "cpu"])
    with pytest.raises(UserError, match="data.py demo_labeled --dest"):
        evaluate.main(["--load", run, "--ground_truth", str(tmp_path), "--device", "cpu"])


def test_data_py_demo_labeled_ground_truth_command(tmp_path):
    dest = str(tmp_path / "demo")
    data.main(["demo_labeled", "--dest", dest, "--n", "6", "--size", "16", "--ground_truth"])
    truth = gt.read_ground_truth(dest, "overlord")
    assert truth["meta"]["size"] == 16 and truth["faces"].shape[0] == gt.OVERLORD_GROUND_TRUTH_FACES
    # the ground truth inside the folder does not stop a redraw with other settings
    data.main(["demo_labeled", "--dest", dest, "--n", "9", "--size", "16"])
    assert len(data.load_prepared(dest)) == 9
