"""train.py and eval.py as a user runs them: outputs, resume, and every bad input's message."""
import json
import os

import numpy as np
import pytest
import torch

import train
from conftest import TINY_CD, make_two_domains, run_script
from data import draw_face, write_image


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_then_eval_write_their_pictures(two_domains, tmp_path):
    out = tmp_path / "run"
    r = run_script("train.py", "--root", two_domains, "--out", out, "--iters", "4",
                   "--display_iter", "2", "--save_iter", "2", "--progress_iter", "2", *TINY_CD)
    assert r.returncode == 0, r.stderr
    assert {"experiments_000002.png", "experiments_000004.png", "checkpoint", "config.json",
            "metrics.jsonl"} <= set(os.listdir(out))
    assert [m["step"] for m in read_metrics(out)] == [2, 4]
    grid = torch.from_numpy(np.fromfile(out / "experiments_000004.png", np.uint8))
    assert grid.numel() > 0
    assert json.load(open(out / "config.json"))["sep"] == 8

    # eval needs no architecture flags: the checkpoint carries them
    r = run_script("eval.py", "--data", two_domains, "--load", out, "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    written = set(os.listdir(tmp_path / "ev"))
    assert {"experiments_000004.png", "reconstruction_A.png", "reconstruction_B.png",
            "interpolation_0.png", "interpolation_2.png"} <= written

    person = os.path.join(two_domains, "testB", "0.png")
    glasses = os.path.join(two_domains, "testA", "1.png")
    r = run_script("eval.py", "--load", out, "--img", person, "--reference", glasses,
                   "--output", tmp_path / "apply" / "out.png")
    assert r.returncode == 0, r.stderr
    import cv2
    assert cv2.imread(str(tmp_path / "apply" / "out.png")).shape == (16, 16, 3)

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"img,reference,output\n{person},{glasses},a.png\n{glasses},,b.png\n")
    r = run_script("eval.py", "--load", out, "--pairs", pairs, "--remove")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.png").exists() and (tmp_path / "b.png").exists()


def test_eval_grid_layout(two_domains, tmp_path):
    import cv2
    out = tmp_path / "run"
    train.main(["--root", two_domains, "--out", str(out), "--iters", "1", *TINY_CD])
    grid = cv2.imread(str(out / "experiments_000001.png"))
    n, side = 3, 16
    assert grid.shape[:2] == ((n + 1) * (side + 2) + 2,) * 2  # (n+1)^2 tiles, 2-px padding


def test_resume_gives_the_same_losses_as_one_run(two_domains, tmp_path):
    common = ["--root", two_domains, "--progress_iter", "1", "--display_iter", "100",
              "--save_iter", "100", *TINY_CD]
    train.main([*common, "--out", str(tmp_path / "whole"), "--iters", "6"])
    train.main([*common, "--out", str(tmp_path / "split"), "--iters", "3"])
    train.main([*common, "--out", str(tmp_path / "split"), "--iters", "6",
                "--load", str(tmp_path / "split")])
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in split] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole, split):
        for key in ("recon_a", "recon_b", "adv", "disc"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)


def test_checkpoint_round_trips(two_domains, tmp_path):
    from eval import load_model
    out = tmp_path / "run"
    train.main(["--root", two_domains, "--out", str(out), "--iters", "2", *TINY_CD])
    ckpt = torch.load(out / "checkpoint", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["method"] == "cd"
    json.dumps(ckpt["config"])  # a plain JSON-able dict
    model, loaded = load_model(str(out), torch.device("cpu"))
    assert loaded["step"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["models"]["model"][key])
    assert not any(name.endswith(".tmp") for name in os.listdir(out))


def test_list_files_with_relative_paths_crlf_and_blank_lines(tmp_path):
    root = make_two_domains(tmp_path / "d", lists=True)
    with open(os.path.join(root, "trainA.txt"), "a", newline="") as f:
        f.write("\r\n\r\n")
    from data import domain_paths
    paths = domain_paths(root)
    assert len(paths["trainA"]) == 6 and all(os.path.isfile(p) for p in paths["trainA"])


def test_image_conversions(tmp_path):
    import cv2
    from data import read_image
    gray = (np.arange(400).reshape(20, 20) % 256).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    cv2.imwrite(str(tmp_path / "a.png"), np.dstack([gray] * 4))
    cv2.imwrite(str(tmp_path / "w.png"), (np.dstack([gray] * 3).astype(np.uint16) * 257))
    for name in ("g.png", "a.png", "w.png"):
        img = read_image(str(tmp_path / name))
        assert img.shape == (20, 20, 3) and img.dtype == np.uint8
        assert np.array_equal(img[..., 0], gray)
    assert read_image(str(tmp_path / "missing.png")) is None


def fails(script, *args):
    r = run_script(script, *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_bad_data_gets_one_clear_line(tmp_path):
    tiny = [*TINY_CD, "--iters", "1"]
    out = tmp_path / "out"
    assert "does not exist" in fails("train.py", "--root", tmp_path / "nope", "--out", out, *tiny)

    root = make_two_domains(tmp_path / "d1", lists=True)
    os.remove(os.path.join(root, "testB.txt"))
    os.rename(os.path.join(root, "testB"), os.path.join(root, "elsewhere"))
    assert "testB" in fails("train.py", "--root", root, "--out", out, *tiny)

    root = make_two_domains(tmp_path / "d2")
    for name in os.listdir(os.path.join(root, "trainB")):
        os.remove(os.path.join(root, "trainB", name))
    assert "trainB" in fails("train.py", "--root", root, "--out", out, *tiny)

    root = make_two_domains(tmp_path / "d3", lists=True)
    with open(os.path.join(root, "trainA.txt"), "a") as f:
        f.write("\nmissing_1.png\nmissing_2.png")
    (tmp_path / "d3" / "trainA" / "broken.png").write_bytes(b"not an image")
    with open(os.path.join(root, "trainA.txt"), "a") as f:
        f.write("\ntrainA/broken.png")
    msg = fails("train.py", "--root", root, "--out", out, *tiny)
    assert "3 of 9 images in trainA" in msg and "missing_1.png" in msg and "--skip_bad" in msg
    r = run_script("train.py", "--root", root, "--out", out, *tiny, "--skip_bad")
    assert r.returncode == 0 and "warning" in r.stderr

    root = make_two_domains(tmp_path / "d4")
    msg = fails("train.py", "--root", root, "--out", out, *tiny[:-2], "--crop", "64",
                "--iters", "1")
    assert "smaller than --crop 64" in msg


def test_bad_sizes_and_outputs_get_one_clear_line(two_domains, tmp_path):
    tiny = [*TINY_CD, "--iters", "1"]
    out = tmp_path / "out"
    assert "--resize 18" in fails("train.py", "--root", two_domains, "--out", out, *tiny,
                                  "--resize", "18")
    assert "--sep 32" in fails("train.py", "--root", two_domains, "--out", out, *tiny,
                               "--sep", "32")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write" in fails("train.py", "--root", two_domains, "--out", blocker / "sub",
                                   *tiny)


def test_bad_load_gets_one_clear_line(two_domains, tmp_path):
    tiny = [*TINY_CD, "--iters", "1"]
    assert "no checkpoint" in fails("eval.py", "--load", tmp_path / "nothing")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "checkpoint").write_bytes(b"garbage")
    assert "not a checkpoint" in fails("eval.py", "--load", junk)
    assert "not a checkpoint" in fails("train.py", "--root", two_domains, "--out",
                                       tmp_path / "o", "--load", junk, *tiny)
    run = tmp_path / "run"
    train.main(["--root", two_domains, "--out", str(run), *tiny])
    assert "trained with --sep 8" in fails("train.py", "--root", two_domains, "--out", run,
                                           "--load", run, *tiny, "--sep", "4")
    # a checkpoint whose weights belong to another architecture
    ckpt = torch.load(run / "checkpoint", weights_only=True)
    ckpt["config"]["n_res_blocks"] = 2
    torch.save(ckpt, junk / "checkpoint")
    assert "does not match" in fails("eval.py", "--load", junk)
    assert "--reference" in fails("eval.py", "--load", run, "--img",
                                  os.path.join(two_domains, "testA", "0.png"), "--output", "x.png")


def test_celeba_and_folders_preparation(tmp_path):
    img_dir = tmp_path / "img_align_celeba"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    names = [f"{i:06d}.jpg" for i in range(1, 9)]
    for name in names:
        write_image(str(img_dir / name), draw_face(rng, 24))
    attrs = tmp_path / "list_attr_celeba.txt"
    header = " ".join(__import__("data").CELEBA_ATTRIBUTES)
    rows = [f"{name}  " + " ".join("1" if (j == 4 and i % 2 == 0) else "-1" for j in range(40))
            for i, name in enumerate(names)]
    attrs.write_text(f"{len(names)}\n{header}\n" + "\n".join(rows) + "\n")
    dest = tmp_path / "bald"
    r = run_script("data.py", "celeba", "--root", img_dir, "--attributes", attrs,
                   "--dest", dest, "--attr", "Bald", "--num_test_imgs", "1")
    assert r.returncode == 0, r.stderr
    from data import domain_paths
    paths = domain_paths(str(dest))
    assert [len(paths[s]) for s in ("trainA", "testA", "trainB", "testB")] == [3, 1, 3, 1]
    assert paths["testA"][0].endswith("000001.jpg") and os.path.isfile(paths["testA"][0])
    assert "unknown CelebA attribute" in fails("data.py", "celeba", "--root", img_dir,
                                               "--attributes", attrs, "--attr", "Baldness")

    root = make_two_domains(tmp_path / "f")
    r = run_script("data.py", "folders", "--root", root, "--dest", tmp_path / "lists")
    assert r.returncode == 0, r.stderr
    assert len(domain_paths(str(tmp_path / "lists"))["trainB"]) == 6


def test_cache_gives_the_same_images_and_is_reused_until_files_change(tmp_path):
    from data import CachedImages, ImageFiles, domain_paths, open_image_set
    root = make_two_domains(tmp_path / "d", size=24)
    paths = domain_paths(root)["trainA"]
    cache = str(tmp_path / "cache")
    cached = open_image_set(paths, 0, 16, "trainA", cache_dir=cache, cache_gb=1)
    plain = ImageFiles(paths, 0, 16)
    assert isinstance(cached, CachedImages)
    for item in [(0, False), (3, True)]:
        assert torch.equal(cached[item], plain[item])
    stamp = os.path.getmtime(os.path.join(cache, "trainA_16.npy"))
    assert open_image_set(paths, 0, 16, "trainA", cache_dir=cache, cache_gb=1).rows == cached.rows
    assert os.path.getmtime(os.path.join(cache, "trainA_16.npy")) == stamp  # reused, not redone
    write_image(paths[0], draw_face(np.random.default_rng(9), 24, glasses=True))
    os.utime(paths[0], ns=(1, 1))
    rebuilt = open_image_set(paths, 0, 16, "trainA", cache_dir=cache, cache_gb=1)
    assert torch.equal(rebuilt[(0, False)], ImageFiles(paths, 0, 16)[(0, False)])
    # too big for the limit: decoded on every access instead
    assert type(open_image_set(paths, 0, 16, "trainA", cache_dir=cache, cache_gb=1e-9)) \
        is ImageFiles


def test_step_options_train(two_domains, tmp_path):
    """The discriminator-code reuse, the seeds' recompute, channels_last and bf16 all train."""
    for extra in (["--d_codes", "recompute"], ["--channels_last", "--amp", "bf16"],
                  ["--cache_gb", "0"]):
        out = tmp_path / "_".join(e.strip("-") for e in extra)
        train.main(["--root", two_domains, "--out", str(out), "--iters", "2", *TINY_CD, *extra])
        losses = read_metrics(out)[-1]
        assert all(np.isfinite(losses[k]) for k in ("recon_a", "recon_b", "disc"))
