"""--reproduce kozistr: every behaviour of the seed's train.py at once, and its parts."""
import numpy as np
import pytest
import torch

import data
import train
from conftest import TINY_CD
from models import ILN, UpSampleBlock, build_cd
from utils import UserError

TINY_SEED = list(TINY_CD)
TINY_SEED[TINY_SEED.index("--e2_feats"):TINY_SEED.index("--e2_feats") + 2] = []  # it sets 512


def test_reproduce_sets_every_seed_behaviour():
    cfg, _ = train.resolve_config(["--root", "x", "--reproduce", "kozistr"])
    assert cfg["reproduce"] == "kozistr"
    assert {k: cfg[k] for k in train.REPRODUCE["kozistr"]} == train.REPRODUCE["kozistr"]
    assert (cfg["e2_feats"], cfg["d_codes"], cfg["d_clip"]) == (512, "recompute", 0.0)
    assert (cfg["sampler"], cfg["interpolation"]) == ("epochs", "bilinear")
    # a flag it sets, given the same value, is fine; another value is refused
    train.resolve_config(["--root", "x", "--reproduce", "kozistr", "--d_clip", "0"])
    with pytest.raises(UserError, match="--reproduce kozistr sets --d_clip 0.0"):
        train.resolve_config(["--root", "x", "--reproduce", "kozistr", "--d_clip", "5"])
    with pytest.raises(UserError, match="--amp"):
        train.resolve_config(["--root", "x", "--reproduce", "kozistr", "--amp", "bf16"])


def test_reproduce_builds_the_seeds_arithmetic_and_plain_adam():
    cfg, _ = train.resolve_config(["--root", "x", "--reproduce", "kozistr", *TINY_SEED])
    model = build_cd(cfg)
    norms = [m for m in model.modules() if isinstance(m, (ILN, UpSampleBlock))]
    assert norms and all("seed_" in m.forward.func.__name__ for m in norms)
    ae_opt, d_opt = train.cd_optimizers(model, cfg)
    assert not ae_opt.defaults["fused"] and not d_opt.defaults["fused"]
    ours, _ = train.resolve_config(["--root", "x", *TINY_CD])
    assert all(opt.defaults["fused"] for opt in train.cd_optimizers(build_cd(ours), ours))
    assert not any(hasattr(m.forward, "func") for m in build_cd(ours).modules()
                   if isinstance(m, ILN))


def test_epochs_sampler_cuts_each_epoch_to_the_smaller_domain():
    batches = iter(data.EndlessBatches(10, 2, seed=3, per_epoch=2))
    epochs = [[i for _ in range(2) for i, _ in next(batches)] for _ in range(3)]
    assert all(len(set(e)) == 4 for e in epochs)           # 2 batches of 2, no repeats
    assert len({tuple(e) for e in epochs}) == 3            # a fresh shuffle every epoch
    resumed = iter(data.EndlessBatches(10, 2, seed=3, start=3, per_epoch=2))
    assert [i for i, _ in next(resumed)] == epochs[1][2:]  # resumes mid-epoch exactly


def test_bilinear_matches_pils_resize():
    from PIL import Image
    rng = np.random.default_rng(0)
    img = (rng.random((178, 178, 3)) * 255).astype(np.uint8)
    for side in (32, 64, 256):
        ours = data.resize_square(img, side, interpolation="bilinear").astype(int)
        pil = np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR)).astype(int)
        assert np.abs(ours - pil).max() <= 1 and (ours != pil).mean() < 0.3
    # ours (area) differs from it: the table in the README lists the difference
    assert not np.array_equal(data.resize_square(img, 64), data.resize_square(
        img, 64, interpolation="bilinear"))


def test_reproduce_run_trains_and_resumes_exactly(two_domains, tmp_path):
    args = ["--root", two_domains, "--reproduce", "kozistr", "--progress_iter", "1",
            *TINY_SEED]
    train.main([*args, "--iters", "3", "--out", str(tmp_path / "whole")])
    train.main([*args, "--iters", "2", "--out", str(tmp_path / "cut")])
    train.main(["--load", str(tmp_path / "cut"), "--iters", "3"])
    whole, cut = (torch.load(tmp_path / r / "checkpoint", weights_only=True) for r in
                  ("whole", "cut"))
    assert cut["config"]["reproduce"] == "kozistr" and cut["step"] == 3
    assert cut["config"]["interpolation"] == "bilinear"
    for key, value in whole["models"]["model"].items():
        assert torch.allclose(value, cut["models"]["model"][key], atol=1e-6), key
    assert any(name.startswith("trainA_16_bilinear") for name in
               (p.name for p in (tmp_path / "whole" / "cache").iterdir()))
