"""OverLORD training (train.py --method overlord) and manipulation (eval.py) on tiny data.

Everything is 32 px, 24 images, 3 labels, networks 8-16 channels wide and 1-2 epochs. Most runs go
through the scripts' own `main` + `run_cli` in this process (the exact code path of the command
line, minus the interpreter start); a few go through real subprocesses (`run_script`)."""
import contextlib
import io
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch

import eval as ol_eval
import train
import utils
from conftest import run_script
from data import load_prepared, make_demo_labeled, read_image, write_image, LabelledImages
from models import (L1Distance, Lap1Distance, VGGDistance, build_overlord, vgg16_features,
                    VGG16_WEIGHTS_FILE)
from utils import UserError

SIZE, N_IMGS, N_LABELS = 32, 24, 3

# networks 8-16 channels wide, batches of 8, one epoch per stage
TINY = ["label_dim=8", "uncorrelated_dim=8", "generator.max_width=16", "encoder.base=8",
        "encoder.max_width=16", "discriminator.max_width=16",
        "disentanglement.batch_size=8", "disentanglement.n_epochs=1",
        "amortization.batch_size=8", "amortization.n_epochs=1",
        "synthesis.batch_size=8", "synthesis.n_epochs=1"]
RUN = ["--workers", "0", "--device", "cpu"]
STAGES = ("disentanglement", "amortization", "synthesis")


def sets(*extra):
    """--set flags of TINY followed by `extra` (later assignments win)."""
    return [flag for s in (*TINY, *extra) for flag in ("--set", s)]


def cli(module, *args):
    """Run module.main(args) under run_cli, as `python module.py args` does: (status, out, err)."""
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            utils.run_cli(lambda: module.main([str(a) for a in args]))
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
    return status, out.getvalue(), err.getvalue()


def train_ol(*args):
    return cli(train, "--method", "overlord", *RUN, *args)


def ok(result):
    status, out, err = result
    assert status == 0, err[-3000:]
    return out


def user_error(result, *needles):
    """Exit status 2, exactly one `error:` line naming every needle, no traceback."""
    if isinstance(result, tuple):
        status, _, err = result
    else:
        status, err = result.returncode, result.stderr
    assert status == 2, err[-3000:]
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint(run):
    return utils.load_checkpoint(run, method="overlord")


def tiny_cfg(preset="demo"):
    """A preset narrowed like TINY, with the data fields of the demo set."""
    cfg = json.loads(json.dumps(train.PRESETS[preset]))
    for assignment in TINY[:6]:
        train.apply_override(cfg, assignment)
    if cfg["correlation"]:
        train.apply_override(cfg, "correlated_dim=8")
    cfg.update(img_shape=[SIZE, SIZE, 3], n_imgs=N_IMGS, n_labels=N_LABELS, preset=preset)
    return cfg


def dataset_for(cfg, root):
    return LabelledImages(root, augment=cfg["augmentation"] if cfg["correlation"] else None,
                          with_masks=cfg["correlation"] == "localized")


# ------------------------------------------------------------------------------------------------
# Fixtures: one environment for the whole module, a prepared set, trained runs

@pytest.fixture(scope="module", autouse=True)
def quiet_machine(tmp_path_factory):
    """One thread (the machine is shared: two-thread OpenMP under contention is ~100x slower),
    an empty torch hub (so no real VGG weights are ever found) and a scratch working folder (a
    run that writes to a default ./ol lands there, not in the project)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def scratch_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 demo faces of 32 px, 3 hair-colour labels, with hair masks."""
    return make_demo_labeled(str(tmp_path_factory.mktemp("prepared") / "demo"), n=N_IMGS,
                             size=SIZE)


@pytest.fixture(scope="module")
def image_files(data, tmp_path_factory):
    """Two of the prepared images as PNG files, and a bigger non-square one."""
    folder = tmp_path_factory.mktemp("images")
    images = load_prepared(data).images
    paths = []
    for i in (0, 1):
        paths.append(str(folder / f"face{i}.png"))
        write_image(paths[-1], np.array(images[i]))
    big = np.zeros((48, 64, 3), np.uint8)  # the face enlarged to 48 px, black bars each side
    big[:, 8:56] = np.array(images[2]).repeat(3, 0).repeat(3, 1)[::2, ::2]
    paths.append(str(folder / "big.png"))
    write_image(paths[-1], big)
    return paths


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """All three stages through the real command line (ffhq preset, narrowed, L1 distance)."""
    run = str(tmp_path_factory.mktemp("full") / "run")
    result = run_script("train.py", "--method", "overlord", "--config", "ffhq", "--root", data,
                        "--perceptual", "l1", "--out", run, *RUN, *sets(),
                        cwd=tmp_path_factory.mktemp("full_cwd"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


@pytest.fixture(scope="module")
def stage1_run(data, tmp_path_factory):
    """Stage 1 only (--stage disentanglement); tests copy it before resuming it."""
    run = str(tmp_path_factory.mktemp("stage1") / "run")
    ok(train_ol("--config", "ffhq", "--root", data, "--perceptual", "l1", "--out", run, *sets(),
                "--stage", "disentanglement"))
    return run


def copy_run(run, tmp_path):
    dest = str(tmp_path / "run")
    shutil.copytree(run, dest)
    return dest


@pytest.fixture(scope="module", params=["afhq", "celebahq_hair"])
def correlated_run(request, data, tmp_path_factory):
    """pose-invariant (afhq) and localized (celebahq_hair, hair masks) runs, all three stages."""
    run = str(tmp_path_factory.mktemp(request.param) / "run")
    result = train_ol("--config", request.param, "--root", data, "--perceptual", "l1",
                      "--out", run, *sets("correlated_dim=8"))
    ok(result)
    return request.param, run


# ------------------------------------------------------------------------------------------------
# 1. The step functions on one fixed batch

def stage_setup(preset, stage, data, perceptual=None, **learning_rates):
    torch.manual_seed(0)
    cfg = tiny_cfg(preset)
    cfg[stage]["learning_rate"].update(learning_rates)
    model = build_overlord(cfg)
    batch = train.collate_items(dataset_for(cfg, data), range(8), torch.device("cpu"))
    optimizers, _ = train.stage_optimizers(stage, model, cfg[stage])
    ctx = {"cfg": cfg, "perceptual": perceptual or L1Distance(), "optimizers": optimizers}
    return cfg, model, batch, ctx


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def moved(before, model, prefix):
    """True if any tensor under `prefix` changed."""
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items()
               if k.startswith(prefix + "."))


def run_steps(stage, model, batch, ctx, n):
    step = train.STAGE_STEPS[stage]
    return [{k: v.item() for k, v in step(model, batch, ctx).items()} for _ in range(n)]


@pytest.mark.parametrize("preset, perceptual", [
    ("demo", "l1"), ("demo", "vgg-random"), ("afhq", "l1"), ("celebahq_hair", "l1")])
def test_disentanglement_step_lowers_reconstruction(preset, perceptual, data):
    distance = VGGDistance((2, 7, 12), weights="random") if perceptual != "l1" else None
    cfg, model, batch, ctx = stage_setup(preset, "disentanglement", data, distance)
    before = snapshot(model)
    history = run_steps("disentanglement", model, batch, ctx, 8)
    assert set(history[0]) == {"loss", "reconstruction", "uncorrelated_decay"}
    assert history[-1]["reconstruction"] < 0.85 * history[0]["reconstruction"]
    # stage 1 trains the tables and the generator (+ correlated encoder), nothing else
    trained = ["label_embedding", "uncorrelated_embedding", "generator"]
    if cfg["correlation"]:
        trained.append("correlated_encoder")
    for name in trained:
        assert moved(before, model, name), name
    for name in ("label_encoder", "uncorrelated_encoder", "amortized_generator",
                 "discriminator"):
        assert not moved(before, model, name), name
    # per-image codes of images outside the batch never move
    table = model.uncorrelated_embedding.weight.detach()
    outside = torch.ones(N_IMGS, dtype=torch.bool)
    outside[batch["index"]] = False
    assert torch.equal(table[outside], before["uncorrelated_embedding.weight"][outside])
    assert not torch.equal(table[~outside], before["uncorrelated_embedding.weight"][~outside])


@pytest.mark.parametrize("preset", ["demo", "celebahq_hair"])
def test_amortization_step_lowers_latent_regression(preset, data):
    cfg, model, batch, ctx = stage_setup(preset, "amortization", data)
    before = snapshot(model)
    history = run_steps("amortization", model, batch, ctx, 8)
    names = {"uncorrelated", "label"} | ({"correlated"} if cfg["correlation"] else set())
    assert set(history[0]) == {"loss"} | names
    assert history[-1]["loss"] < 0.97 * history[0]["loss"]
    assert history[0]["loss"] == pytest.approx(sum(history[0][n] for n in names), rel=1e-5)
    for name in model.amortized_encoders():
        prefix = next(k for k, m in model.named_children() if m is name)
        assert moved(before, model, prefix), prefix
    for name in ("label_embedding", "uncorrelated_embedding", "generator", "correlated_encoder",
                 "amortized_generator", "discriminator"):
        assert not moved(before, model, name), name


@pytest.mark.parametrize("preset", ["demo", "afhq"])
def test_synthesis_step_lowers_the_generator_loss(preset, data):
    # the preset's 1e-4 moves 8 steps by only 2-4 %: 1e-3 makes the drop unmistakable
    cfg, model, batch, ctx = stage_setup(preset, "synthesis", data, generator=1e-3)
    model.amortized_generator.load_state_dict(model.generator.state_dict())
    before = snapshot(model)
    history = run_steps("synthesis", model, batch, ctx, 8)
    assert set(history[0]) == {"discriminator", "generator", "reconstruction", "latent",
                               "adversarial"}
    assert np.mean([h["generator"] for h in history[-2:]]) < \
        0.9 * np.mean([h["generator"] for h in history[:2]])
    assert history[-1]["latent"] < 0.8 * history[0]["latent"]
    w = cfg["synthesis"]["loss_weights"]
    assert history[0]["generator"] == pytest.approx(
        sum(w[k] * history[0][k] for k in ("reconstruction", "latent", "adversarial")), rel=1e-5)
    for name in ("label_encoder", "uncorrelated_encoder", "amortized_generator", "discriminator"):
        assert moved(before, model, name), name
    for name in ("label_embedding", "uncorrelated_embedding", "generator", "correlated_encoder"):
        assert not moved(before, model, name), name
    # the real images' gradient flag never leaks out of the step
    assert not batch["img"].requires_grad


def test_stage_optimizers_cover_the_right_parameters():
    for preset in ("demo", "afhq"):
        cfg = tiny_cfg(preset)
        model = build_overlord(cfg)
        ids = lambda opt: {id(p) for g in opt.param_groups for p in g["params"]}  # noqa: E731
        params = lambda *names: {id(p) for n in names if getattr(model, n) is not None  # noqa
                                 for p in getattr(model, n).parameters()}
        opts, annealed = train.stage_optimizers("disentanglement", model, cfg["disentanglement"])
        assert set(opts) == {"main"} and annealed == ("main",)
        lr = cfg["disentanglement"]["learning_rate"]
        groups = opts["main"].param_groups
        assert [g["lr"] for g in groups] == [lr["latent"], lr["generator"]] + (
            [lr["encoder"]] if cfg["correlation"] else [])
        assert ids(opts["main"]) == params("label_embedding", "uncorrelated_embedding",
                                           "generator", "correlated_encoder")
        opts, annealed = train.stage_optimizers("amortization", model, cfg["amortization"])
        assert annealed == ("main",)
        assert ids(opts["main"]) == params("label_encoder", "uncorrelated_encoder",
                                           "correlated_amortized_encoder")
        assert opts["main"].param_groups[0]["lr"] == cfg["amortization"]["learning_rate"]["max"]
        opts, annealed = train.stage_optimizers("synthesis", model, cfg["synthesis"])
        assert set(opts) == {"generator", "discriminator"} and annealed == ()
        assert ids(opts["generator"]) == params("label_encoder", "uncorrelated_encoder",
                                                "correlated_amortized_encoder",
                                                "amortized_generator")
        assert ids(opts["discriminator"]) == params("discriminator")


@pytest.mark.parametrize("preset", ["demo", "afhq"])
def test_translation_tiles_layout(preset, data):
    torch.manual_seed(0)
    cfg = tiny_cfg(preset)
    model = build_overlord(cfg).eval()
    n = 4
    batch = train.collate_items(dataset_for(cfg, data), range(n), torch.device("cpu"))
    for stage in ("disentanglement", "synthesis"):
        tiles = train.translation_tiles(model, batch, stage, cfg)
        assert tiles.shape == ((n + 1) ** 2, 3, SIZE, SIZE)
        assert 0 <= tiles.min() and tiles.max() <= 1
        grid = tiles.reshape(n + 1, n + 1, 3, SIZE, SIZE)
        assert torch.equal(grid[0, 0], torch.ones(3, SIZE, SIZE))
        assert torch.equal(grid[0, 1:], batch["img"]) and torch.equal(grid[1:, 0], batch["img"])
        with torch.no_grad():
            if stage == "disentanglement":
                u, l, c = model.table_codes(batch["index"], batch["label"],
                                            train.view_for_correlated(batch, cfg))
                generator = model.generator
            else:
                u, l, c = model.amortized_codes(batch["img"])
                generator = model.amortized_generator
            for i in range(n):  # row i: the label (and correlated) codes of image i on every u_j
                ci = None if c is None else c[i:i + 1].expand(n, -1)
                expected = generator(model.latent(u, l[i:i + 1].expand(n, -1), ci)).clamp(0, 1)
                assert torch.allclose(grid[i + 1, 1:], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 2. End to end through the command line, then eval.py

def test_cli_run_writes_grids_metrics_config_and_checkpoint(full_run, data):
    run, result = full_run
    assert "done: disentanglement, amortization, synthesis" in result.stdout
    assert "Traceback" not in result.stderr
    for stage in STAGES:
        for kind in ("fixed", "random"):
            grid = read_image(os.path.join(run, f"{stage}_{kind}_0001.png"))
            assert grid is not None and grid.shape == (11 * 34 + 2, 11 * 34 + 2, 3)  # 11x11 tiles
    lines = metrics(run)
    assert [m["stage"] for m in lines] == list(STAGES)
    assert all(m["epoch"] == 1 and m["step"] == 3 for m in lines)  # 24 images, batches of 8
    assert {"loss", "reconstruction", "uncorrelated_decay"} <= set(lines[0])
    assert {"loss", "uncorrelated", "label"} <= set(lines[1])
    assert {"discriminator", "generator", "reconstruction", "latent", "adversarial"} <= \
        set(lines[2])
    assert all(np.isfinite(v) for m in lines for v in m.values() if isinstance(v, float))
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["method"] == "overlord" and cfg["preset"] == "ffhq"
    assert cfg["img_shape"] == [SIZE, SIZE, 3] and cfg["n_imgs"] == N_IMGS
    assert cfg["n_labels"] == N_LABELS and cfg["root"] == os.path.abspath(data)
    assert cfg["perceptual"]["kind"] == "l1" and cfg["label_dim"] == 8
    assert cfg["generator"]["max_width"] == 16 and cfg["synthesis"]["batch_size"] == 8
    ckpt = checkpoint(run)
    assert ckpt["done"] == list(STAGES)
    model = build_overlord(ckpt["config"])
    utils.load_weights(model, ckpt["models"]["model"], "test")


def test_eval_every_label_side_by_side(full_run, image_files, tmp_path):
    run, _ = full_run
    out = str(tmp_path / "all.png")
    result = run_script("eval.py", "--load", run, "--img", image_files[0], "--output", out,
                        "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    img = read_image(out)
    assert img.shape == (SIZE, (N_LABELS + 1) * SIZE, 3)
    assert np.array_equal(img[:, :SIZE], read_image(image_files[0]))  # the input comes first
    # the other columns are G([E_u(x), L[k]]) for k = 0..K-1
    model, _ = ol_eval.load_model(run, torch.device("cpu"), "overlord")
    x = ol_eval.load_input(image_files[0], 0, SIZE, "image", signed=False)
    rows = ol_eval.translate_to_each_label(model, x, range(N_LABELS))
    assert rows.shape == (1, N_LABELS + 1, 3, SIZE, SIZE)
    expected = torch.cat(list(rows[0]), 2)
    assert np.abs(ol_eval.to_uint8(expected, low=0.0).astype(int) - img.astype(int)).max() <= 1


def test_eval_by_reference_and_pairs(full_run, image_files, tmp_path):
    run, _ = full_run
    face0, face1, big = image_files
    out = str(tmp_path / "r.png")
    ok(cli(ol_eval, "--load", run, "--img", face0, "--reference", face1, "--output", out,
           "--device", "cpu"))
    img = read_image(out)
    assert img.shape == (SIZE, SIZE, 3)
    model, _ = ol_eval.load_model(run, torch.device("cpu"), "overlord")
    load = lambda p: ol_eval.load_input(p, 0, SIZE, "image", signed=False)  # noqa: E731
    expected = ol_eval.translate_by_reference(model, load(face0), load(face1))[0]
    assert np.abs(ol_eval.to_uint8(expected, low=0.0).astype(int) - img.astype(int)).max() <= 1
    # pairs: relative paths from the CSV's folder, a header, an empty reference = every label,
    # a bigger non-square image is cropped and resized to the model's 32 px
    folder = tmp_path / "pairs"
    folder.mkdir()
    for p in image_files:
        shutil.copy(p, folder)
    (folder / "pairs.csv").write_text("img,reference,output\n"
                                      "face0.png,face1.png,out/a.png\n"
                                      "big.png,,out/b.png\n"
                                      "big.png,face0.png,out/c.png\n")
    printed = ok(cli(ol_eval, "--load", run, "--pairs", folder / "pairs.csv", "--device", "cpu",
                     "--bs", "2"))
    for name, width in (("a", SIZE), ("b", (N_LABELS + 1) * SIZE), ("c", SIZE)):
        path = folder / "out" / f"{name}.png"
        assert str(path) in printed
        assert read_image(str(path)).shape == (SIZE, width, 3)
    # the same job gives the same picture as the single-image mode
    assert np.array_equal(read_image(str(folder / "out" / "a.png")), img)


def test_eval_grids_without_img(full_run):
    run, _ = full_run
    printed = ok(cli(ol_eval, "--load", run, "--device", "cpu"))
    translation = os.path.join(run, "eval", "translation.png")
    all_labels = os.path.join(run, "eval", "all_labels.png")
    assert translation in printed and all_labels in printed
    assert read_image(translation).shape == (11 * 34 + 2, 11 * 34 + 2, 3)
    assert read_image(all_labels).shape == (10 * 34 + 2, (N_LABELS + 1) * 34 + 2, 3)


def test_eval_usage_errors(full_run, image_files, tmp_path):
    run, _ = full_run
    user_error(cli(ol_eval, "--load", run, "--img", image_files[0], "--device", "cpu"),
               "--output")
    user_error(cli(ol_eval, "--load", run, "--img", image_files[0], "--remove", "--output",
                   tmp_path / "x.png", "--device", "cpu"), "--remove")
    user_error(cli(ol_eval, "--load", run, "--img", tmp_path / "missing.png", "--output",
                   tmp_path / "x.png", "--device", "cpu"), "missing.png")
    user_error(cli(ol_eval, "--load", run, "--method", "cd", "--device", "cpu"), "overlord")


# ------------------------------------------------------------------------------------------------
# 3. The correlated modes

def test_correlated_run_and_manipulation(correlated_run, image_files, tmp_path):
    preset, run = correlated_run
    ckpt = checkpoint(run)
    cfg = ckpt["config"]
    assert ckpt["done"] == list(STAGES)
    assert cfg["correlation"] == {"afhq": "pose-invariant",
                                  "celebahq_hair": "localized"}[preset]
    assert cfg["correlated_dim"] == 8
    assert any(k.startswith("correlated_encoder.") for k in ckpt["models"]["model"])
    assert any(k.startswith("correlated_amortized_encoder.") for k in ckpt["models"]["model"])
    assert [m["stage"] for m in metrics(run)] == list(STAGES)
    assert "correlated" in metrics(run)[1]  # stage 2 regresses the correlated code too
    for stage in STAGES:
        assert os.path.isfile(os.path.join(run, f"{stage}_fixed_0001.png"))
    # by label: refused with a pointer to --reference; by reference: works
    line = user_error(cli(ol_eval, "--load", run, "--img", image_files[0], "--output",
                          tmp_path / "all.png", "--device", "cpu"), "--reference")
    assert cfg["correlation"] in line
    assert not os.path.exists(tmp_path / "all.png")
    ok(cli(ol_eval, "--load", run, "--img", image_files[0], "--reference", image_files[1],
           "--output", tmp_path / "r.png", "--device", "cpu"))
    assert read_image(str(tmp_path / "r.png")).shape == (SIZE, SIZE, 3)
    # grids: the translation grid only (every-label rows are for uncorrelated configs)
    printed = ok(cli(ol_eval, "--load", run, "--out", tmp_path / "ev", "--device", "cpu"))
    assert os.listdir(tmp_path / "ev") == ["translation.png"] and "translation.png" in printed


def test_localized_needs_masks(tmp_path):
    root = make_demo_labeled(str(tmp_path / "nomasks"), n=N_IMGS, size=SIZE, masks=False)
    user_error(train_ol("--config", "celebahq_hair", "--root", root, "--perceptual", "l1",
                        "--out", tmp_path / "run", *sets("correlated_dim=8")), "masks.npy")
    assert not os.path.exists(tmp_path / "run" / "checkpoint")


# ------------------------------------------------------------------------------------------------
# 4. Resuming

def test_resume_after_stage_one_continues_with_the_later_stages(stage1_run, tmp_path):
    first = checkpoint(stage1_run)
    assert first["done"] == ["disentanglement"]
    assert [m["stage"] for m in metrics(stage1_run)] == ["disentanglement"]
    assert not any(n.startswith("amortization_") for n in os.listdir(stage1_run))

    run = copy_run(stage1_run, tmp_path)
    # --stage amortization: the amortised generator starts as a copy of stage 1's generator and
    # stage 2 does not train it
    out = ok(train_ol("--load", run, "--out", run, "--stage", "amortization"))
    assert "resumed from" in out
    state = checkpoint(run)["models"]["model"]
    assert checkpoint(run)["done"] == ["disentanglement", "amortization"]
    for key, value in state.items():
        if key.startswith("generator."):
            assert torch.equal(state["amortized_" + key], value), key
            assert torch.equal(first["models"]["model"][key], value), key
    # then the rest; stage 1 is not trained again and its tables stay as they were
    ok(train_ol("--load", run, "--out", run))
    final = checkpoint(run)
    assert final["done"] == list(STAGES)
    assert [m["stage"] for m in metrics(run)] == list(STAGES)
    for key in ("label_embedding.weight", "uncorrelated_embedding.weight"):
        assert torch.equal(final["models"]["model"][key], first["models"]["model"][key])
    assert os.path.isfile(os.path.join(run, "synthesis_fixed_0001.png"))
    # a finished run has nothing left to do
    out = ok(train_ol("--load", run, "--out", run))
    assert "done: disentanglement, amortization, synthesis" in out and len(metrics(run)) == 3


def test_resume_without_out_continues_in_the_loaded_run(stage1_run, tmp_path):
    run = copy_run(stage1_run, tmp_path)
    ok(train_ol("--load", run))
    assert not os.path.exists(tmp_path / "ol")  # cwd is tmp_path
    assert checkpoint(run)["done"] == list(STAGES)


def test_later_stage_without_its_predecessor_is_refused(stage1_run, tmp_path):
    run = copy_run(stage1_run, tmp_path)
    user_error(train_ol("--load", run, "--out", run, "--stage", "synthesis"),
               "synthesis", "amortization")
    assert checkpoint(run)["done"] == ["disentanglement"]
    # and a fresh run cannot start at a later stage either
    user_error(train_ol("--config", "ffhq", "--root", checkpoint(run)["config"]["root"],
                        "--perceptual", "l1", "--out", tmp_path / "fresh", *sets(),
                        "--stage", "amortization"), "disentanglement")


def test_eval_before_amortization_is_refused(stage1_run, image_files, tmp_path):
    user_error(cli(ol_eval, "--load", stage1_run, "--img", image_files[0], "--output",
                   tmp_path / "x.png", "--device", "cpu"), "amortisation")
    user_error(cli(ol_eval, "--load", stage1_run, "--device", "cpu"), "amortisation")


@pytest.mark.parametrize("noise", ["0.0", "0.01"])
def test_interrupted_stage_resumes_exactly(noise, data, tmp_path, monkeypatch):
    """Ctrl-C after batch 4 of 6, then --load: the same weights as an uninterrupted run (with and
    without the per-image code noise, the one global-RNG draw of stage 1)."""
    args = ["--config", "ffhq", "--root", data, "--perceptual", "l1", "--stage",
            "disentanglement", *sets("disentanglement.n_epochs=2", f"uncorrelated_std={noise}")]
    ok(train_ol(*args, "--out", tmp_path / "whole"))

    step = train.STAGE_STEPS["disentanglement"]
    calls = []

    def interrupted_step(model, batch, ctx):
        calls.append(1)
        losses = step(model, batch, ctx)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # StopRequest: stop after this batch
        return losses

    monkeypatch.setitem(train.STAGE_STEPS, "disentanglement", interrupted_step)
    status, _, err = train_ol(*args, "--out", tmp_path / "cut")
    assert status == 130 and "resume with --load" in err
    ckpt = checkpoint(str(tmp_path / "cut"))
    assert ckpt["stage"] == "disentanglement" and ckpt["step"] == 4 and ckpt["done"] == []
    monkeypatch.setitem(train.STAGE_STEPS, "disentanglement", step)
    ok(train_ol("--load", tmp_path / "cut", "--out", tmp_path / "cut", "--stage",
                "disentanglement"))
    whole = checkpoint(str(tmp_path / "whole"))["models"]["model"]
    cut = checkpoint(str(tmp_path / "cut"))["models"]["model"]
    for key in whole:
        assert torch.allclose(whole[key], cut[key], atol=1e-6), key
    assert [(m["epoch"], m["step"]) for m in metrics(str(tmp_path / "cut"))] == [(1, 3), (2, 6)]
    assert checkpoint(str(tmp_path / "cut"))["done"] == ["disentanglement"]


# ------------------------------------------------------------------------------------------------
# 5. The perceptual distance offline

def test_vgg_without_weights_stops_before_training(data, tmp_path, monkeypatch):
    hub_home = tmp_path / "torch_home"
    hub_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(hub_home))  # inherited by the subprocess
    run = tmp_path / "run"
    result = run_script("train.py", "--method", "overlord", "--config", "ffhq", "--root", data,
                        "--out", run, *RUN, *sets(), cwd=tmp_path)
    line = user_error(result, "--vgg_weights", "--perceptual l1", VGG16_WEIGHTS_FILE,
                      os.path.join(str(hub_home), "hub", "checkpoints"))
    assert "nothing is downloaded" in line
    assert not any(os.path.exists(run / f) for f in ("checkpoint", "metrics.jsonl",
                                                     "config.json"))


@pytest.fixture(scope="module")
def random_vgg_file(tmp_path_factory):
    """torchvision-layout VGG16 features with random weights (about 59 MB)."""
    path = str(tmp_path_factory.mktemp("vgg") / VGG16_WEIGHTS_FILE)
    torch.manual_seed(0)
    torch.save(vgg16_features().state_dict(), path)
    return path


def test_vgg_weights_file_trains(data, random_vgg_file, tmp_path):
    run = str(tmp_path / "run")
    ok(train_ol("--config", "ffhq", "--root", data, "--vgg_weights", random_vgg_file,
                "--out", run, *sets(), "--stage", "disentanglement"))
    ckpt = checkpoint(run)
    assert ckpt["config"]["perceptual"]["kind"] == "vgg" and ckpt["done"] == ["disentanglement"]
    line = metrics(run)[0]
    assert line["stage"] == "disentanglement" and np.isfinite(line["reconstruction"])


def test_build_perceptual_hub_cache_auto_and_bad_files(random_vgg_file, tmp_path, monkeypatch):
    cfg = {"perceptual": {"kind": "vgg", "layer_ids": [2, 7], "normalize": True}}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match="--vgg_weights"):
        train.build_perceptual(json.loads(json.dumps(cfg)), "")
    # the hub cache copy is found without --vgg_weights
    cache = tmp_path / "home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    os.symlink(random_vgg_file, cache / VGG16_WEIGHTS_FILE)
    distance = train.build_perceptual(json.loads(json.dumps(cfg)), "")
    assert isinstance(distance, VGGDistance) and distance.source == str(cache / VGG16_WEIGHTS_FILE)
    # "auto" (the demo) takes VGG when the weights are there, else Lap1 with a note
    auto = {"perceptual": dict(cfg["perceptual"], kind="auto")}
    chosen = json.loads(json.dumps(auto))
    assert isinstance(train.build_perceptual(chosen, ""), VGGDistance)
    assert chosen["perceptual"]["kind"] == "vgg"
    os.remove(cache / VGG16_WEIGHTS_FILE)
    chosen = json.loads(json.dumps(auto))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert isinstance(train.build_perceptual(chosen, ""), Lap1Distance)
    assert chosen["perceptual"]["kind"] == "lap1" and "Lap1 fallback" in printed.getvalue()
    # a --vgg_weights that is missing, or not a VGG16 state dict
    with pytest.raises(UserError, match="nope.pth"):
        train.build_perceptual(json.loads(json.dumps(cfg)), str(tmp_path / "nope.pth"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="--vgg_weights: .*not a torchvision VGG16"):
        train.build_perceptual(json.loads(json.dumps(cfg)), str(tmp_path / "other.pth"))


# ------------------------------------------------------------------------------------------------
# 6. Bad inputs: exit status 2, one `error:` line, no traceback

def test_missing_prepared_folder_through_the_command_line(tmp_path):
    result = run_script("train.py", "--method", "overlord", "--config", "ffhq", "--root",
                        tmp_path / "nowhere", "--perceptual", "l1", "--out", tmp_path / "run",
                        *RUN, cwd=tmp_path)
    user_error(result, "no prepared dataset", "nowhere")


@pytest.fixture
def corrupt_data(data, tmp_path):
    root = str(tmp_path / "corrupt")
    shutil.copytree(data, root)
    np.save(os.path.join(root, "labels.npy"), np.zeros(N_IMGS - 1, np.int64))
    return root


@pytest.mark.parametrize("args, needles", [
    (["--config", "ffhq", "--root", "{corrupt}"], ["23 labels", "24 images"]),
    (["--root", "{data}"], ["--config"]),
    (["--config", "ffhq", "--root", "{data}", "--set", "generator.nope=3"],
     ["generator.nope", "'nope'", "max_width"]),
    (["--config", "ffhq", "--root", "{data}", "--set", "nope.max_width=3"], ["'nope'"]),
    (["--config", "ffhq", "--root", "{data}", "--set", "disentanglement.batch_size=abc"],
     ["disentanglement.batch_size=abc", "int"]),
    (["--config", "ffhq", "--root", "{data}", "--set", "label_dim=8.5"], ["label_dim", "int"]),
    (["--config", "ffhq", "--root", "{data}", "--set", "label_dim"], ["KEY=VALUE"]),
    (["--config", "ffhq", "--root", "{data}", "--set", "synthesis.batch_size=6"],
     ["synthesis.batch_size 6", "multiple of 4"]),
    (["--config", "ffhq", "--root", "{data}", "--set", "correlation=sideways"],
     ["sideways", "pose-invariant"]),
    (["--config", "afhq", "--root", "{data}", "--set", "correlated_dim=0"], ["correlated_dim"]),
    (["--config", "ffhq", "--root", "{data}", "--set", "amortization.batch_size=32"],
     ["amortization.batch_size 32", "24 images"]),
])
def test_bad_inputs_get_one_error_line(args, needles, data, corrupt_data, tmp_path):
    args = [a.format(data=data, corrupt=corrupt_data) for a in args]
    user_error(train_ol("--perceptual", "l1", "--out", tmp_path / "run", *sets(), *args),
               *needles)


def test_unknown_config_is_an_argparse_error(data, tmp_path):
    status, _, err = train_ol("--config", "imagenet", "--root", data, "--out", tmp_path / "run")
    assert status == 2 and "invalid choice: 'imagenet'" in err and "Traceback" not in err


def test_null_for_a_non_nullable_key_is_refused(data, tmp_path):
    user_error(train_ol("--config", "ffhq", "--root", data, "--perceptual", "l1", "--out",
                        tmp_path / "run", *sets("synthesis.batch_size=null")),
               "synthesis.batch_size")


def test_resume_with_mismatching_data_or_config(stage1_run, tmp_path):
    other = make_demo_labeled(str(tmp_path / "other"), n=12, size=SIZE)
    run = copy_run(stage1_run, tmp_path)
    user_error(train_ol("--load", run, "--out", run, "--root", other), "n_imgs", "24", "12")
    user_error(train_ol("--load", run, "--out", run, "--config", "afhq"), "ffhq")
    user_error(train_ol("--load", tmp_path / "nowhere", "--out", run), "no checkpoint")


# ------------------------------------------------------------------------------------------------
# 7. apply_override

def test_apply_override_nested_keys_and_promotion():
    cfg = json.loads(json.dumps(train.PRESETS["ffhq"]))
    train.apply_override(cfg, "disentanglement.learning_rate.latent=0.5")
    train.apply_override(cfg, "generator.max_width=16")
    train.apply_override(cfg, "disentanglement.learning_rate.min=0")      # int -> float
    train.apply_override(cfg, "uncorrelated_std=1")
    train.apply_override(cfg, "augmentation.scale=[0.5, 1.0]")
    train.apply_override(cfg, "augmentation.flip_horizontal=False")
    train.apply_override(cfg, " labeled_attribute = =x")  # everything after the first '='
    assert cfg["disentanglement"]["learning_rate"]["latent"] == 0.5
    assert cfg["generator"] == {"channel_multiplier": 2, "max_width": 16}
    lr_min = cfg["disentanglement"]["learning_rate"]["min"]
    assert lr_min == 0.0 and type(lr_min) is float
    assert cfg["uncorrelated_std"] == 1.0 and type(cfg["uncorrelated_std"]) is float
    assert cfg["augmentation"]["scale"] == [0.5, 1.0]
    assert cfg["augmentation"]["flip_horizontal"] is False
    assert cfg["labeled_attribute"] == " =x"
    # the preset itself is never touched
    assert train.PRESETS["ffhq"]["generator"]["max_width"] == 512


def test_apply_override_none_valued_correlation():
    cfg = json.loads(json.dumps(train.PRESETS["ffhq"]))
    assert cfg["correlation"] is None
    train.apply_override(cfg, "correlation=localized")
    assert cfg["correlation"] == "localized"
    train.apply_override(cfg, "correlation=pose-invariant")
    assert cfg["correlation"] == "pose-invariant"
    train.apply_override(cfg, "correlation=null")
    assert cfg["correlation"] is None
    train.apply_override(cfg, "correlation='localized'")
    assert cfg["correlation"] == "localized"
    train.apply_override(cfg, "correlation=None")
    assert cfg["correlation"] is None


@pytest.mark.parametrize("assignment, message", [
    ("generator.nope=1", r"unknown key 'nope' \(known here: channel_multiplier, max_width\)"),
    ("nope=1", "unknown key 'nope'"),
    ("nope.deeper=1", "unknown key 'nope'"),
    ("label_dim.max_width=1", "label_dim.max_width: unknown key 'label_dim'"),
    ("generator=1", "unknown key 'generator'"),  # a whole section
    ("disentanglement.batch_size=abc", "expected a int like 32"),
    ("augmentation.flip_horizontal=1", "expected a bool"),
    ("uncorrelated_std=True", "expected a float"),
    ("label_dim", "expected KEY=VALUE"),
])
def test_apply_override_refusals(assignment, message):
    cfg = json.loads(json.dumps(train.PRESETS["ffhq"]))
    with pytest.raises(UserError, match=message):
        train.apply_override(cfg, assignment)
    assert cfg == train.PRESETS["ffhq"]  # nothing changed by the refused assignment
