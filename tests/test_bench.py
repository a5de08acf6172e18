"""bench.py on tiny networks: the report's fields, the FLOP counts and the seed-loop step.

Timings are never asserted; only that they are there and positive."""
import json

import pytest
import torch

import bench
import train
from utils import UserError

# 16 px, CD codes of 32 channels, OverLORD networks 8-16 wide: a few seconds on one CPU core
TINY = ["--resize", "16", "--bs", "4", "--iters", "2", "--warmup", "1", "--device", "cpu",
        "--e2_feats", "8",
        "--cd_flags", "--n_blocks 1 --n_tot_feats 32 --sep 8 --n_enc_res_blocks 1 --n_res_blocks 1",
        *[flag for s in ("label_dim=8", "uncorrelated_dim=8", "generator.max_width=16",
                         "encoder.base=8", "encoder.max_width=16", "discriminator.max_width=16")
          for flag in ("--set", s)]]
ROW_FIELDS = {"name", "images_per_s", "s_per_iter", "flops_per_iter", "flops_per_s",
              "peak_pct", "peak_memory_bytes", "memory_kind"}


def parse(*extra):
    """The bench's flags: TINY followed by `extra`."""
    return bench.build_parser().parse_args([*TINY, *extra])


def test_report_rows_reference_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main([*TINY, "--reference", "--json", str(path)])
    report = json.loads(path.read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["cd (reuse fp32)", "cd seed loop (e2_feats 8)", "overlord disentanglement",
                     "overlord amortization", "overlord synthesis"]
    for row in report["rows"]:
        assert set(row) == ROW_FIELDS
        assert row["flops_per_iter"] > 0 and row["images_per_s"] > 0 and row["s_per_iter"] > 0
        assert row["peak_memory_bytes"] > 0 and row["memory_kind"] == "process peak RSS"
        assert row["flops_per_s"] == pytest.approx(row["flops_per_iter"] / row["s_per_iter"])
        assert row["peak_pct"] == pytest.approx(100 * row["flops_per_s"]
                                                / report["conv_peak_flops"])
    ours, seed = report["rows"][:2]
    assert report["ratio"] == pytest.approx(ours["images_per_s"] / seed["images_per_s"])
    # the seed loop runs E1 twice more and D backward through E1: more FLOPs than ours
    assert seed["flops_per_iter"] > ours["flops_per_iter"]
    # counted on the meta device, the same step gives the same count as on the CPU
    flops = {int(w): f for w, f in report["reference_flops"].items()}
    assert sorted(flops) == [8, 32, 512]
    assert flops[8] == seed["flops_per_iter"] and flops[8] < flops[32] < flops[512]
    assert report["conv_peak_flops"] > 0
    assert any(name in note for note in report["notes"] for name in ("Lap1", "L1", "VGG16"))
    printed = capsys.readouterr().out
    assert "ours / seed loop" in printed and all(name in printed for name in names)


def test_step_options_reach_the_cd_row():
    args = parse("--method", "cd", "--d_codes", "recompute", "--amp", "bf16", "--channels_last")
    cfg = bench.cd_config(args)
    assert (cfg["d_codes"], cfg["amp"], cfg["channels_last"]) == ("recompute", "bf16", True)
    assert (cfg["resize"], cfg["e2_feats"], cfg["sep"]) == (16, 8, 8)
    model, x_a, *_ = bench.cd_setup(cfg, torch.device("cpu"))
    assert x_a.is_contiguous(memory_format=torch.channels_last)
    (row,), _ = bench.bench_cd(args, torch.device("cpu"), peak=1e9)
    assert row["name"] == "cd (recompute bf16 channels_last)"
    # recomputing the codes costs a common-encoder forward more than reusing them
    (reuse,), _ = bench.bench_cd(parse("--method", "cd"), torch.device("cpu"), peak=1e9)
    assert row["flops_per_iter"] > reuse["flops_per_iter"]


def test_seed_loop_step_has_train_steps_losses():
    # first step from the same weights, the seed's layer arithmetic and plain Adam on its side:
    # the same autoencoder loss, and (D recomputed on the updated encoder in both) the same
    # discriminator loss up to spectral-norm power iterations
    cfg = bench.cd_config(parse("--d_codes", "recompute"))
    ours = train.train_step(*bench.cd_setup(cfg, torch.device("cpu")), cfg)
    seed_cfg = bench.seed_config(cfg)
    assert seed_cfg["reproduce"] == "kozistr" and seed_cfg["e2_feats"] == cfg["e2_feats"]
    model, *rest = bench.cd_setup(seed_cfg, torch.device("cpu"))
    seed = train.train_step(model, *rest, seed_cfg)
    assert seed["ae"] == pytest.approx(ours["ae"], rel=1e-5)
    assert seed["disc"] == pytest.approx(ours["disc"], rel=1e-3)



def test_end_to_end_rows_run_both_pipelines_on_a_folder(two_domains, tmp_path):
    # 6 images per domain at batch 4: the seeds' loader starts a new epoch every step
    path, flags = tmp_path / "e2e.json", TINY[TINY.index("--cd_flags") + 1]
    bench.main([*TINY, "--method", "cd", "--data", two_domains, "--iters", "3", "--reference",
                "--cd_flags", f"{flags} --crop 0 --n_threads 1 --num_display 2",
                "--json", str(path)])
    report = json.loads(path.read_text())
    ours, seed = report["rows"]
    assert ours["name"] == "cd end to end (train.py, reuse fp32)"
    assert seed["name"] == "cd end to end (seeds' pipeline)"
    assert all(row["images_per_s"] > 0 and row["flops_per_iter"] > 0 for row in (ours, seed))
    assert seed["flops_per_iter"] > ours["flops_per_iter"]
    assert report["ratio"] == pytest.approx(ours["images_per_s"] / seed["images_per_s"])
    assert any("data loading included" in note for note in report["notes"])


def test_seed_images_flip_at_random(two_domains):
    files = bench.data.ImageFiles(bench.data.domain_paths(two_domains)["trainA"], 0, 16)
    seed_images = bench.SeedImages(files)
    plain, mirrored = files[(0, False)], files[(0, True)]
    draws = [seed_images[0] for _ in range(40)]
    assert all(torch.equal(img, plain) or torch.equal(img, mirrored) for img in draws)
    assert {torch.equal(img, plain) for img in draws} == {True, False}


def test_breakdown_times_the_convolutions_forward_and_backward():
    report = bench.run_bench(parse("--method", "cd", "--breakdown"))
    convolutions = report["rows"][0]["convolutions"]
    for part in ("forward", "backward"):
        assert convolutions[part]["s_per_iter"] > 0 and convolutions[part]["share_of_step"] > 0
        assert convolutions[part]["peak_pct"] > 0

def test_conv_peak_is_positive():
    flops, shape = bench.conv_peak_flops(torch.device("cpu"), shapes=((8, 8),), target_s=1e-4)
    assert flops > 0 and shape[0] >= 1 and shape[1:] == [8, 8, 8]
    # several shapes: the fastest one is reported
    flops, shape = bench.conv_peak_flops(torch.device("cpu"), shapes=((4, 4), (16, 8)),
                                         target_s=1e-4)
    assert flops > 0 and shape[1:] in ([4, 4, 4], [16, 8, 8])


@pytest.mark.parametrize("extra, message", [(("--resize", "24"), "power of two"),
                                            (("--bs", "6"), "multiple of 4")])
def test_overlord_sizes_are_checked(extra, message):
    with pytest.raises(UserError, match=message):
        bench.overlord_config(parse(*extra))


def test_distances_time_each_reconstruction_distance_in_turns(tmp_path):
    path = tmp_path / "bench.json"
    # 32 px: CD's VGG16 distance halves the side five times
    bench.main([*TINY[:1], "32", *TINY[2:], "--distances", "--json", str(path)])
    report = json.loads(path.read_text())
    names = [row["name"] for row in report["rows"]]
    for kind in train.CD_DISTANCES:
        assert f"cd --perceptual {kind}" in names
    for kind in train.OVERLORD_DISTANCES:
        assert f"overlord disentanglement --perceptual {kind}" in names
    costs = report["distance_cost"]
    assert list(costs["cd"]) == ["l2", "lap1", "vgg"] and costs["cd"]["l2"] == 1
    assert list(costs["overlord disentanglement"]) == ["l1", "lap1", "vgg"]
    assert all(ratio > 0 for ratios in costs.values() for ratio in ratios.values())
    rows = {row["name"]: row for row in report["rows"]}
    # the VGG16 distance adds its convolutions to the FLOPs of both methods' steps
    assert (rows["cd --perceptual vgg"]["flops_per_iter"]
            > rows["cd --perceptual l2"]["flops_per_iter"])
    assert (rows["overlord disentanglement --perceptual vgg"]["flops_per_iter"]
            > rows["overlord disentanglement --perceptual l1"]["flops_per_iter"])
