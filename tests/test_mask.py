"""The mask option of CD (train.py --mask; Mokady et al., ICLR 2020): the mask decoder, its loss
terms, training, resuming, the grids, eval's mask modes and the mask scores."""
import csv
import json
import os

import pytest
import torch
import torch.nn.functional as F

import data
import eval as evaluate
import ground_truth as gt
import train
from conftest import TINY_CD, make_two_domains, run_script
from mask_transfer import iou, iou_scores, masked_removal, unchanged_outside_mask
from models import build_cd, composite

TINY = dict(resize=16, n_blocks=1, n_tot_feats=32, sep=8, e2_feats=8, n_enc_res_blocks=1,
            n_res_blocks=1, mask=True)
MASK_GRIDS = ("experiments", "masks", "d_a", "segmentation")


def tiny_mask_model(seed=0):
    torch.manual_seed(seed)
    return build_cd(TINY)


def images(n, seed):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_composite_by_hand():
    mask = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    content = torch.full((1, 3, 2, 2), 1.0)
    base = torch.full((1, 3, 2, 2), -1.0)
    expected = torch.tensor([[-1.0, 0.0], [1.0, -0.5]]).expand(1, 3, 2, 2)
    assert torch.equal(composite(mask, content, base), expected)


def test_output_is_exactly_the_base_where_the_mask_is_zero():
    model = tiny_mask_model()

    def mask_off_on_the_left(module, inputs, h):
        h = h.clone()
        h[:, 0, :, :8] = -200.0  # sigmoid underflows to exactly 0
        return h
    model.mask_decoder.net.register_forward_hook(mask_off_on_the_left)
    x_b, x_a = images(2, 1), images(2, 2)
    out = model.transfer(x_b, x_a)
    assert torch.equal(out[..., :8], x_b[..., :8])
    assert not torch.equal(out[..., 8:], x_b[..., 8:])
    common = model.common_encoder(x_b)
    assert model.mask_of(common, model.separate_encoder(x_a))[..., :8].abs().sum() == 0


def test_each_loss_term_by_hand():
    model = tiny_mask_model()
    x_a, x_b = images(2, 3), images(2, 4)
    cfg = {**train.MASK_PRESETS["eyewear"], "cycle_common": 0.5}
    losses, _ = train.mask_autoencoder_losses(model, x_a, x_b, cfg)

    e1, e2, d_a = model.common_encoder, model.separate_encoder, model.decoder
    c_a, s_a, c_b = e1(x_a), e2(x_a), e1(x_b)
    zero = torch.zeros_like(s_a)

    def d_b(common, separate, base):
        m, y = model.mask_decoder(torch.cat([common, separate], 1))
        return m * y + (1 - m) * base, m

    def l1(a, b):
        return (a - b).abs().mean()

    x_c = d_b(c_b, s_a, x_b)[0]
    bce = F.binary_cross_entropy_with_logits
    logits_a, logits_b = model.latent_disc(c_a), model.latent_disc(c_b)
    by_hand = {
        "recon1_a": l1(d_b(c_a, s_a, d_a(torch.cat([c_a, zero], 1)))[0], x_a),
        "recon1_b": l1(d_a(torch.cat([c_b, zero], 1)), x_b),
        "cycle_common": ((e1(x_c) - c_b) ** 2).mean(),
        "cycle_separate": ((e2(x_c) - s_a) ** 2).mean(),
        "recon2_a": l1(d_b(c_a, s_a, x_a)[0], x_a),
        "recon2_b": l1(d_b(c_b, zero, x_b)[0], x_b),
        "adv": bce(logits_a, torch.zeros(2)) + bce(logits_b, torch.zeros(2)),
        "mask_area": d_b(c_a, s_a, x_a)[1].mean()}
    for name, value in by_hand.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name
    total = (7 * by_hand["recon1_a"] + 5 * by_hand["recon1_b"] + 0.5 * by_hand["cycle_common"]
             + 0.001 * by_hand["cycle_separate"] + 0.7 * by_hand["recon2_a"]
             + 0.7 * by_hand["recon2_b"] + 0.005 * by_hand["adv"])
    assert losses["ae"].item() == pytest.approx(total.item(), rel=1e-4)


def test_recon2_warmup_scales_only_the_recon2_terms():
    model = tiny_mask_model()
    x_a, x_b = images(2, 3), images(2, 4)
    model.eval()  # spectral norm's power iteration would move between the two calls
    cfg = {**train.MASK_PRESETS["eyewear"], "mask_warmup": 100}
    assert [train.recon2_ramp(cfg, step) for step in (0, 25, 100, 400, None)] == \
        [0.0, 0.25, 1.0, 1.0, 1.0]
    assert train.recon2_ramp({**cfg, "mask_warmup": 0}, 0) == 1.0
    full, _ = train.mask_autoencoder_losses(model, x_a, x_b, cfg)
    at_25, _ = train.mask_autoencoder_losses(model, x_a, x_b, cfg, step=25)
    recon2 = 0.7 * (full["recon2_a"] + full["recon2_b"])
    assert at_25["ae"].item() == pytest.approx((full["ae"] - 0.75 * recon2).item(), rel=1e-5)
    for term in train.MASK_LOSS_WEIGHTS:  # the logged terms themselves are unscaled
        assert at_25[term].item() == pytest.approx(full[term].item(), rel=1e-5)


def test_plain_model_is_unchanged_by_the_mask_option():
    torch.manual_seed(0)
    plain = build_cd({k: v for k, v in TINY.items() if k != "mask"})
    masked = tiny_mask_model()
    assert not hasattr(plain, "mask_decoder")
    for key, value in plain.state_dict().items():  # same networks, same initial weights
        assert torch.equal(value, masked.state_dict()[key]), key
    assert set(masked.state_dict()) - set(plain.state_dict()) == {
        k for k in masked.state_dict() if k.startswith("mask_decoder.")}


def test_removal_keeps_the_pixels_outside_the_mask():
    model = tiny_mask_model().eval()
    x = images(2, 5)
    removed, mask = masked_removal(model, x, threshold=0.5)
    inside = (mask >= 0.5).expand_as(x)
    assert torch.equal(removed[~inside], x[~inside])
    assert torch.equal(removed[inside], model.remove(x)[inside])


def test_mask_scores_by_hand():
    truth = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    truth[:, :, 1:3, 1:3] = True
    scores = iou_scores(truth.float(), truth)
    assert scores["iou"] == 1 and scores["best_iou"] == 1
    half = truth.float() * 0.3
    assert iou(half, truth, 0.5) == 0 and iou(half, truth, 0.1) == 1
    assert iou_scores(half, truth)["best_iou"] == 1
    base = torch.zeros(1, 3, 2, 2)
    moved = base.clone()
    moved[0, :, 0, 0] = 0.5
    moved[0, :, 1, 1] = 0.5
    mask = torch.tensor([[[[0.0, 0.0], [0.0, 0.9]]]])
    assert unchanged_outside_mask(moved, base, mask) == pytest.approx(2 / 3)


def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_mask_run_trains_resumes_exactly_and_writes_the_four_grids(two_domains, tmp_path):
    common = ["--root", two_domains, "--progress_iter", "1", "--display_iter", "2",
              "--save_iter", "100", "--mask", "--mask_preset", "smile", "--gamma", "3",
              *TINY_CD]
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train.main([*common, "--out", whole, "--iters", "4"])
    train.main([*common, "--out", split, "--iters", "2"])
    train.main(["--load", split, "--out", split, "--iters", "4"])  # the rest from the checkpoint
    for name in MASK_GRIDS:
        assert os.path.isfile(os.path.join(whole, f"{name}_000004.png")), name
    a = torch.load(os.path.join(whole, "checkpoint"), weights_only=True)
    b = torch.load(os.path.join(split, "checkpoint"), weights_only=True)
    assert a["config"]["mask"] and b["config"]["gamma"] == 3.0
    assert b["config"]["alpha1"] == train.MASK_PRESETS["smile"]["alpha1"]
    assert any(k.startswith("mask_decoder.") for k in a["models"]["model"])
    for key, value in a["models"]["model"].items():
        assert torch.allclose(value, b["models"]["model"][key], rtol=0, atol=1e-6), key
    records = read_metrics(whole)
    assert [r["step"] for r in read_metrics(split)] == [1, 2, 3, 4]
    for column in (*train.MASK_LOSS_WEIGHTS, "mask_area", "ae", "disc"):
        assert all(column in r for r in records), column


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    """A 2-iteration mask model trained on a tiny demo set that has ground truth."""
    base = tmp_path_factory.mktemp("mask")
    demo = str(base / "demo")
    data.main(["demo", "--dest", demo, "--n_train", "8", "--size", "32"])
    gt.write_ground_truth(demo, 8, 64, 32, count=4)
    run = str(base / "run")
    train.main(["--root", demo, "--iters", "2", "--out", run, "--mask", *TINY_CD])
    return demo, run


def test_eval_remove_masks_and_pairs_write_their_files(mask_run, tmp_path):
    demo, run = mask_run
    img, ref = (data.domain_paths(demo, splits=(s,))[s][0] for s in ("testB", "testA"))
    removed = str(tmp_path / "removed.png")
    evaluate.main(["--load", run, "--img", ref, "--remove", "--output", removed,
                   "--threshold", "0.3", "--device", "cpu"])
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        csv.writer(f).writerows([["img", "reference", "output"], [img, ref, "out/t.png"],
                                 [ref, img, "out/u.png"]])
    evaluate.main(["--load", run, "--pairs", str(pairs), "--device", "cpu"])
    evaluate.main(["--load", run, "--pairs", str(pairs), "--remove", "--device", "cpu"])
    masks = str(tmp_path / "masks")
    evaluate.main(["--load", run, "--masks", masks, "--device", "cpu"])
    evaluate.main(["--load", run, "--masks", str(tmp_path / "one"), "--img", ref,
                   "--device", "cpu"])
    for path in (removed, tmp_path / "out" / "t.png", tmp_path / "one"):
        assert os.path.exists(path), path
    written = sorted(os.listdir(masks))
    assert len(written) == 2 * 64 and written[0].endswith("_mask.png")
    binary = data.read_image(os.path.join(masks, written[0]))
    assert binary.shape == (16, 16, 3) and set(binary.flatten()) <= {0, 255}


def test_eval_metrics_and_ground_truth_of_a_mask_model(mask_run, tmp_path):
    demo, run = mask_run
    evaluate.main(["--load", run, "--metrics", "--metrics_images", "4", "--ground_truth", demo,
                   "--device", "cpu", "--out", str(tmp_path)])
    report = json.load(open(tmp_path / "metrics_eval.json"))
    mask = report["metrics"]["transfer"]["add"]["mask"]
    assert 0 <= mask["unchanged_outside_mask"] <= 1 and 0 <= mask["mask_area"] <= 1
    scores = report["metrics"]["ground_truth"]["mask"]
    for kind in ("segmentation", "transfer"):
        assert 0 <= scores[kind]["iou"] <= scores[kind]["best_iou"] <= 1
        assert scores[kind]["threshold"] == 0.1


def fails(script, *args):
    r = run_script(script, *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_bad_mask_flags_get_one_clear_line(mask_run, tmp_path):
    demo, run = mask_run
    root = make_two_domains(tmp_path / "data")
    tiny = ["--root", root, "--out", str(tmp_path / "o"), "--iters", "1", *TINY_CD]
    assert "--alpha1 -1.0 must be" in fails("train.py", *tiny, "--mask", "--alpha1", "-1")
    assert "--gamma nan must be" in fails("train.py", *tiny, "--mask", "--gamma", "nan")
    assert "add --mask" in fails("train.py", *tiny, "--cycle_separate", "1")
    assert "add --mask" in fails("train.py", *tiny, "--mask_preset", "smile")
    assert "add --mask" in fails("train.py", *tiny, "--mask_warmup", "10")
    assert "--mask_warmup -5 must be >= 0" in fails("train.py", *tiny, "--mask",
                                                    "--mask_warmup", "-5")
    assert "invalid choice" in fails("train.py", *tiny, "--mask", "--mask_preset", "hats")
    assert "drop --mask or --reproduce" in fails("train.py", *tiny, "--mask",
                                                 "--reproduce", "kozistr")
    assert "drop one of them" in fails("train.py", *tiny, "--mask", "--perceptual", "lap1")
    assert "--threshold 1.5" in fails("eval.py", "--load", run, "--threshold", "1.5")
    plain = str(tmp_path / "plain")
    train.main([*tiny[:2], "--out", plain, *tiny[4:]])
    assert "not trained with --mask" in fails("eval.py", "--load", plain, "--masks",
                                              str(tmp_path / "m"))


def test_resumed_mask_run_logs_the_same_losses(two_domains, tmp_path):
    common = ["--root", two_domains, "--progress_iter", "1", "--display_iter", "100",
              "--save_iter", "100", "--mask", "--cycle_common", "0.5", *TINY_CD]
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train.main([*common, "--out", whole, "--iters", "3"])
    train.main([*common, "--out", split, "--iters", "1"])
    train.main(["--load", split, "--out", split, "--iters", "3"])
    for a, b in zip(read_metrics(whole), read_metrics(split)):
        for column in (*train.MASK_LOSS_WEIGHTS, "mask_area", "ae", "disc"):
            assert a[column] == pytest.approx(b[column], rel=1e-5, abs=1e-7), (a["step"], column)


def test_mask_run_with_bf16_and_channels_last(two_domains, tmp_path):
    run = str(tmp_path / "run")
    train.main(["--root", two_domains, "--out", run, "--iters", "2", "--progress_iter", "1",
                "--mask", "--amp", "bf16", "--channels_last", *TINY_CD])
    assert all(r["ae"] == r["ae"] for r in read_metrics(run))  # finite, not NaN


def test_eval_grids_of_a_mask_model_add_the_mask_grids(mask_run, tmp_path):
    _, run = mask_run
    evaluate.main(["--load", run, "--out", str(tmp_path), "--device", "cpu"])
    for name in MASK_GRIDS:
        assert (tmp_path / f"{name}_000002.png").exists(), name


class PerfectMasks:
    """A stand-in model whose masks are the ground truth's: the 'images' are indices (A_i = i,
    B_j = OFFSET + j), the encoders pass them on and mask_of looks the true mask up."""
    OFFSET = 100

    def __init__(self, masks_a, transfer_masks):
        self.masks_a, self.transfer_masks = masks_a.float(), transfer_masks.float()
        self.common_encoder = self.separate_encoder = lambda x: x

    def mask_of(self, common, separate):
        c, s = common.flatten().long(), separate.flatten().long()
        if (c < self.OFFSET).all():             # an A image with its own code
            return self.masks_a[c]
        return self.transfer_masks[s, c - self.OFFSET]


def test_ground_truth_iou_is_one_for_perfect_masks(mask_run):
    demo, _ = mask_run
    truth = gt.read_ground_truth(demo)
    masks_a, transfer_masks = (gt.mask_at(truth[k], 16) for k in ("masks_A", "transfer_masks"))
    n = len(masks_a)
    x_a = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    scores = gt.ground_truth_mask_scores(PerfectMasks(masks_a, transfer_masks), x_a,
                                         x_a + PerfectMasks.OFFSET, masks_a, transfer_masks)
    assert masks_a.any() and transfer_masks.any()
    for kind in ("segmentation", "transfer"):
        assert scores[kind]["iou"] == 1 and scores[kind]["best_iou"] == 1, kind


def test_mask_two_processes_match_one(two_domains, tmp_path):
    from test_distributed import assert_same_weights, torchrun, weights
    tiny = [a for a in TINY_CD if a not in ("--bs", "2")] + ["--bs", "4"]
    args = ["--root", two_domains, "--iters", "2", "--progress_iter", "1", "--mask", *tiny]
    train.main([*args, "--out", str(tmp_path / "one")])
    r = torchrun(*args, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
