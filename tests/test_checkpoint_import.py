"""Importing the seeds' saved models: avivga/overlord model folders and kozistr checkpoints.

The folders and checkpoints are built here in the originals' formats, with key names written out
from the originals' module layouts (not with the importer's own renaming)."""
import copy
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import make_two_domains, run_script
import checkpoint_import
from data import draw_face, read_image, write_image
from eval import load_input, to_uint8, translate_by_reference, translate_to_each_label
from models import build_cd, build_overlord
from train import PRESETS
from utils import UserError, load_checkpoint

TAPS = torch.tensor([1.0, 3.0, 3.0, 1.0])
FIR = torch.outer(TAPS, TAPS) / 64  # the original's make_kernel([1, 3, 3, 1])


# ------------------------------------------------------------------------------------------------
# An original-format OverLORD folder (test helper only: the project has no export)

def original_key(part, key):
    """(file, key in the original's naming) of this project's `part.key`."""
    if part in ("generator", "amortized_generator"):
        m = re.match(r"(up_convs|convs)\.(\d+)\.(.*)", key)
        if m:  # the original's one list: level k's upsampling conv at 2k, its plain conv at 2k+1
            key = f"convs.{2 * int(m[2]) + (m[1] == 'convs')}.{m[3]}"
    if part.endswith("encoder"):
        key = "main." + key[len("net."):]
        for ours, theirs in (("residual.1", "conv1"), ("residual.4", "conv2"),
                             ("shortcut", "conv1x1")):
            key = key.replace(f".{ours}.", f".{theirs}.")
    if part == "discriminator":
        key = "convs." + key[len("blocks."):] if key.startswith("blocks.") else key
    file = "latent" if part in ("label_embedding", "uncorrelated_embedding", "generator",
                                "correlated_encoder") else "amortized"
    name = {"correlated_amortized_encoder": "correlated_encoder",
            "amortized_generator": "generator"}.get(part, part)
    return file, f"{name}.module.{key}"


def original_state(model, side):
    """(latent.pth, amortized.pth) dicts of `model`, FIR kernel buffers included."""
    files = {"latent": {}, "amortized": {}}
    for key, tensor in model.state_dict().items():
        part, rest = key.split(".", 1)
        file, name = original_key(part, rest)
        files[file][name] = tensor.clone() if tensor.device.type != "meta" else tensor
    levels = int(np.log2(side)) - 2
    for file in ("latent", "amortized"):
        for k in range(levels):
            files[file][f"generator.module.convs.{2 * k}.conv.blur.kernel"] = FIR * 4
            files[file][f"generator.module.to_rgbs.{k}.upsample.kernel"] = FIR * 4
    for i in range(1, levels + 1):
        for conv in ("conv2", "skip"):
            files["amortized"][f"discriminator.module.convs.{i}.{conv}.0.kernel"] = FIR.clone()
    return files["latent"], files["amortized"]


def original_config(cfg):
    """The plain dict the original pickles: its YAML config plus img_shape, n_imgs, n_labels."""
    config = {k: cfg[k] for k in ("labeled_attribute", "correlation", "label_dim",
                                  "uncorrelated_dim", "uncorrelated_std")}
    if cfg["correlation"]:
        config.update(correlated_dim=cfg["correlated_dim"],
                      correlation_augmentation=copy.deepcopy(cfg["augmentation"]))
    for stage in ("disentanglement", "amortization", "synthesis"):
        config[stage] = copy.deepcopy(cfg[stage])
    config["perceptual_loss"] = {"layers": list(cfg["perceptual"]["layer_ids"]),
                                 "normalize": cfg["perceptual"]["normalize"]}
    config.update(img_shape=tuple(cfg["img_shape"]), n_imgs=cfg["n_imgs"],
                  n_labels=cfg["n_labels"])
    return config


def write_original_folder(model, cfg, folder, latent_zip=True, with_config=True):
    """config.pkl (protocol 3), latent.pth and amortized.pth, one of each torch.save format."""
    os.makedirs(folder, exist_ok=True)
    latent, amortized = original_state(model, cfg["img_shape"][0])
    torch.save(latent, os.path.join(folder, "latent.pth"),
               _use_new_zipfile_serialization=latent_zip)
    torch.save(amortized, os.path.join(folder, "amortized.pth"),
               _use_new_zipfile_serialization=not latent_zip)
    if with_config:
        with open(os.path.join(folder, "config.pkl"), "wb") as f:
            pickle.dump(original_config(cfg), f, protocol=3)
    return str(folder)


def small_config(preset, **changes):
    """A preset at 16 px with few images and labels (and small widths for the real presets)."""
    cfg = copy.deepcopy(PRESETS[preset])
    cfg.update({"img_shape": [16, 16, 3], "n_imgs": 6, "n_labels": 3, **changes})
    if preset != "demo":
        cfg["generator"]["max_width"] = cfg["discriminator"]["max_width"] = 32
        cfg["encoder"].update(base=8, max_width=16)
    return cfg


def random_model(cfg, seed=0):
    """OverLORD with every tensor perturbed, so that no two tensors share their values."""
    torch.manual_seed(seed)
    model = build_overlord(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def face_file(path, seed=0, size=16):
    write_image(path, draw_face(np.random.default_rng(seed), size, glasses=False))
    return str(path)


# ------------------------------------------------------------------------------------------------
# OverLORD folders

def test_uncorrelated_folder_imports_and_manipulates_by_label(tmp_path):
    cfg = small_config("demo")
    model = random_model(cfg)
    folder = write_original_folder(model, cfg, tmp_path / "overlord-demo", latent_zip=True)
    latent = torch.load(os.path.join(folder, "latent.pth"), weights_only=True)
    amortized = torch.load(os.path.join(folder, "amortized.pth"), weights_only=True)

    ckpt = load_checkpoint(folder, method="overlord")
    state = ckpt["models"]["model"]
    assert ckpt["config"]["preset"] == "demo" and ckpt["done"][-1] == "synthesis"
    for ours, file, theirs in (
            ("generator.up_convs.1.conv.weight", latent, "generator.module.convs.2.conv.weight"),
            ("generator.convs.1.conv.weight", latent, "generator.module.convs.3.conv.weight"),
            ("amortized_generator.convs.0.activate.bias", amortized,
             "generator.module.convs.1.activate.bias"),
            ("uncorrelated_encoder.net.1.shortcut.weight", amortized,
             "uncorrelated_encoder.module.main.1.conv1x1.weight"),
            ("label_encoder.net.2.residual.4.bias", amortized,
             "label_encoder.module.main.2.conv2.bias"),
            ("discriminator.blocks.2.skip.1.weight", amortized,
             "discriminator.module.convs.2.skip.1.weight"),
            ("label_embedding.weight", latent, "label_embedding.module.weight")):
        assert torch.equal(state[ours], file[theirs]), ours
    assert not any(k.endswith(".kernel") for k in state)

    # the same manipulation as the exported model gives, through eval.py as a user runs it
    face = face_file(tmp_path / "face.png")
    out = tmp_path / "all_labels.png"
    result = run_script("eval.py", "--load", folder, "--img", face, "--output", out,
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        x = load_input(face, 0, 16, "image", signed=False)
        row = translate_to_each_label(model, x, range(cfg["n_labels"]))[0]
    expected = to_uint8(torch.cat(list(row), 2), low=0.0)
    got = read_image(str(out))
    assert got.shape == (16, 16 * (cfg["n_labels"] + 1), 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_correlated_folder_imports_and_manipulates_by_reference(tmp_path):
    cfg = small_config("afhq", label_dim=16, uncorrelated_dim=8, correlated_dim=8, n_labels=2)
    model = random_model(cfg, seed=1)
    folder = write_original_folder(model, cfg, tmp_path / "overlord-afhq", latent_zip=False)
    latent = torch.load(os.path.join(folder, "latent.pth"), weights_only=True)
    amortized = torch.load(os.path.join(folder, "amortized.pth"), weights_only=True)

    ckpt = load_checkpoint(folder, method="overlord")
    imported, state = ckpt["config"], ckpt["models"]["model"]
    assert (imported["preset"], imported["correlation"]) == ("afhq", "pose-invariant")
    assert (imported["label_dim"], imported["uncorrelated_dim"], imported["correlated_dim"]) \
        == (16, 8, 8)
    assert torch.equal(state["correlated_encoder.net.6.weight"],
                       latent["correlated_encoder.module.main.6.weight"])
    assert torch.equal(state["correlated_amortized_encoder.net.6.weight"],
                       amortized["correlated_encoder.module.main.6.weight"])
    assert not torch.equal(state["correlated_encoder.net.6.weight"],
                           state["correlated_amortized_encoder.net.6.weight"])

    face, ref = face_file(tmp_path / "pose.png"), face_file(tmp_path / "look.png", seed=3)
    out = tmp_path / "translated.png"
    result = run_script("eval.py", "--load", folder, "--img", face, "--reference", ref,
                        "--output", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    load = lambda p: load_input(p, 0, 16, "image", signed=False)  # noqa: E731
    expected = to_uint8(translate_by_reference(model, load(face), load(ref))[0], low=0.0)
    assert np.abs(read_image(str(out)).astype(int) - expected.astype(int)).max() <= 1


def test_a_config_pkl_with_code_in_it_is_refused(tmp_path):
    cfg = small_config("demo")
    folder = write_original_folder(random_model(cfg), cfg, tmp_path / "evil")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(os.path.join(folder, "config.pkl"), "wb") as f:
        pickle.dump({**original_config(cfg), "n_labels": Payload()}, f, protocol=3)
    result = run_script("eval.py", "--load", folder, "--img", face_file(tmp_path / "f.png"),
                        "--output", tmp_path / "o.png", "--device", "cpu")
    assert result.returncode == 2 and not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "system" in lines[0]
    assert "refused" in lines[0]


def test_without_config_pkl_the_preset_comes_from_the_shapes(tmp_path, capsys):
    cfg = small_config("demo")
    folder = write_original_folder(random_model(cfg), cfg, tmp_path / "m", with_config=False)
    ckpt = load_checkpoint(folder, method="overlord")
    assert ckpt["config"]["preset"] == "demo" and "no config.pkl" in capsys.readouterr().out

    odd = small_config("afhq", label_dim=16, uncorrelated_dim=8, correlated_dim=8)
    folder = write_original_folder(random_model(odd), odd, tmp_path / "odd", with_config=False)
    with pytest.raises(UserError, match="match no preset"):
        load_checkpoint(folder, method="overlord")


def test_loading_is_strict_and_names_the_key():
    cfg = small_config("demo")
    latent, amortized = original_state(random_model(cfg), 16)
    original = original_config(cfg)
    convert = checkpoint_import.overlord_checkpoint
    key = "label_encoder.module.main.1.conv1.weight"

    cases = [("lacks", {k: v for k, v in amortized.items() if k != key}),
             ("unexpected", {**amortized, "label_encoder.module.main.9.weight": torch.zeros(1)}),
             ("misshapen", {**amortized, key: amortized[key][:1]}),
             ("FIR kernel", {**amortized, "discriminator.module.convs.1.skip.0.kernel": FIR * 4})]
    for problem, broken in cases:
        with pytest.raises(UserError, match=problem) as error:
            convert(latent, broken, original, "m")
        assert "module" in str(error.value)
    with pytest.raises(UserError, match="n_labels 5"):
        convert(latent, amortized, {**original, "n_labels": 5}, "m")


# real sizes of the five published models: (preset, side, n_imgs, n_labels)
PUBLISHED = [("ffhq", 256, 70000, 8), ("celeba", 128, 202599, 10177), ("afhq", 256, 14630, 3),
             ("celebahq", 256, 30000, 2), ("celebahq_hair", 256, 30000, 2)]


@pytest.mark.parametrize("preset, side, n_imgs, n_labels", PUBLISHED)
def test_published_key_lists_map_exactly(preset, side, n_imgs, n_labels):
    cfg = copy.deepcopy(PRESETS[preset])
    cfg.update(img_shape=[side, side, 3], n_imgs=n_imgs, n_labels=n_labels)
    with torch.device("meta"):
        model = build_overlord(cfg)
    latent, amortized = original_state(model, side)
    levels = int(np.log2(side)) - 2
    # facts read from the original's modules, independent of this project's layout
    assert f"generator.module.convs.{2 * levels - 1}.conv.weight" in latent
    assert f"generator.module.to_rgbs.{levels - 1}.upsample.kernel" in latent
    assert "generator.module.to_rgb1.upsample.kernel" not in latent
    assert tuple(amortized[f"discriminator.module.convs.{levels}.skip.1.weight"].shape) == \
        (512, 512, 1, 1)
    assert tuple(amortized["discriminator.module.final_linear.0.weight"].shape) == (512, 8192)
    assert tuple(amortized["label_encoder.module.main.0.weight"].shape) == (64, 3, 3, 3)
    assert "label_encoder.module.main.2.conv1x1.weight" in amortized
    assert "label_encoder.module.main.3.conv1x1.weight" not in amortized  # 256 wide from there
    assert tuple(latent["label_embedding.module.weight"].shape) == (n_labels, cfg["label_dim"])

    ckpt = checkpoint_import.overlord_checkpoint(latent, amortized, original_config(cfg), preset)
    assert ckpt["config"]["preset"] == preset
    got = {k: tuple(v.shape) for k, v in ckpt["models"]["model"].items()}
    assert got == {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# kozistr's checkpoint

KZ = dict(resize=16, n_blocks=1, n_tot_feats=32, sep=8, e2_feats=32, n_enc_res_blocks=1,
          n_res_blocks=1)  # E2 as wide as the code, as kozistr's train.py builds it


def kozistr_name(part, key):
    """kozistr's key for this project's `part.key` (E1/E2 as flat Sequentials of pad, conv,
    norm, act; the decoder's res_model then model)."""
    n = KZ["n_blocks"]
    i, rest = key.split(".")[1], key.split(".", 2)[2]
    i = int(i)
    if part in ("common_encoder", "separate_encoder"):
        if i <= n + 1:
            return f"model.{4 * i + 1}.weight"
        conv = "conv1" if "body.1" in rest else "conv2"
        return f"model.{4 * (n + 2) + i - (n + 2)}.{conv}.weight"
    if i < KZ["n_res_blocks"]:
        return f"res_model.{i}.{'conv1' if 'body.1' in rest else 'conv2'}.weight"
    j = i - KZ["n_res_blocks"]
    if rest == "weight":
        return f"model.{j}.weight"
    return f"model.{j}.conv.weight" if rest == "body.2.weight" else f"model.{j}.norm.{rest[7:]}"


def write_kozistr_checkpoint(folder):
    """(checkpoint path, project-layout model, kozistr's Disc) written as kozistr's train.py
    writes it, in the legacy torch.save format, after one Adam step of each optimiser."""
    torch.manual_seed(0)
    model = build_cd(KZ)
    in_features = (KZ["n_tot_feats"] - KZ["sep"]) * 4 ** 2
    sn = nn.utils.spectral_norm
    hidden = KZ["n_tot_feats"]  # kozistr's Disc: n_feat = 512 = its code width
    kz_disc = nn.Sequential(sn(nn.Linear(in_features, hidden)), nn.LeakyReLU(0.2),
                            sn(nn.Linear(hidden, 1)), nn.Sigmoid())
    kz_disc(torch.randn(4, in_features))  # one power iteration: u, v are not the initial ones
    params = model.autoencoder_parameters()
    ae_opt = torch.optim.Adam(params, 1e-4, betas=(0.5, 0.999), eps=1e-6)
    disc_opt = torch.optim.Adam(kz_disc.parameters(), 4e-4, betas=(0.5, 0.999), eps=1e-6)
    for opt, ps in ((ae_opt, params), (disc_opt, list(kz_disc.parameters()))):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()

    def old_adam(opt):  # old torch kept `step` as a plain int
        state = opt.state_dict()
        for s in state["state"].values():
            s["step"] = int(s["step"])
        return state

    nets = {name: {kozistr_name(part, k): v for k, v in getattr(model, part).state_dict().items()}
            for name, part in (("e1", "common_encoder"), ("e2", "separate_encoder"),
                               ("decoder", "decoder"))}
    checkpoint = {**nets, "ae_opt": old_adam(ae_opt),
                  "disc": {f"classify.{k}": v for k, v in kz_disc.state_dict().items()},
                  "disc_opt": old_adam(disc_opt), "iters": 9}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "checkpoint")
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return path, model, kz_disc


def test_kozistr_checkpoint_converts_weights_and_discriminator(tmp_path):
    path, model, kz_disc = write_kozistr_checkpoint(tmp_path / "bald_result")
    ckpt = load_checkpoint(str(tmp_path / "bald_result"), method="cd")
    assert {k: ckpt["config"][k] for k in KZ} == KZ and ckpt["step"] == 10
    imported = build_cd(ckpt["config"])
    imported.load_state_dict(ckpt["models"]["model"])
    for ours, theirs in zip(imported.state_dict().items(), model.state_dict().items()):
        if "latent_disc" not in ours[0]:
            assert torch.equal(ours[1], theirs[1]), ours[0]
    code = torch.randn(3, KZ["n_tot_feats"] - KZ["sep"], 4, 4)
    imported.eval(), kz_disc.eval()
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(imported.latent_disc(code)),
                              kz_disc(code.flatten(1)).squeeze(1), atol=1e-6)


def test_kozistr_checkpoint_resumes_and_applies(tmp_path):
    write_kozistr_checkpoint(tmp_path / "bald_result")
    data = make_two_domains(tmp_path / "data", n_train=2, n_test=3, size=180)  # crop 178
    out = tmp_path / "continued"
    common = ["--iters", "11", "--bs", "2", "--num_display", "3", "--n_threads", "0",
              "--device", "cpu", "--display_iter", "100", "--save_iter", "100", "--out", out]
    result = run_script("train.py", "--load", tmp_path / "bald_result", *common)
    assert result.returncode == 2 and "give --root" in result.stderr
    result = run_script("train.py", "--load", tmp_path / "bald_result", "--root", data, *common)
    assert result.returncode == 0, result.stderr
    assert "at iteration 10" in result.stdout
    ckpt = torch.load(out / "checkpoint", weights_only=True)
    assert ckpt["step"] == 11 and float(ckpt["optimizers"]["ae"]["state"][0]["step"]) == 2
    assert ckpt["optimizers"]["ae"]["param_groups"][0]["eps"] == 1e-6
    assert os.path.isfile(tmp_path / "bald_result" / "checkpoint")  # the seed's file is kept

    a, b = (os.path.join(data, "testA", "0.png"), os.path.join(data, "testB", "0.png"))
    result = run_script("eval.py", "--load", tmp_path / "bald_result", "--img", b,
                        "--reference", a, "--output", tmp_path / "t.png", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert read_image(str(tmp_path / "t.png")).shape == (16, 16, 3)
    assert json.loads(json.dumps(load_checkpoint(str(tmp_path / "bald_result"))["config"]))
