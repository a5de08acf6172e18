"""Read the seeds' saved models as this project's checkpoints, in memory (SPEC F).

- An OverLORD model folder of avivga/overlord (`config.pkl`, `latent.pth`, `amortized.pth`), e.g.
  the published `overlord-ffhq-x256-age/`: `eval.py --load FOLDER` manipulates with it directly.
- A checkpoint of kozistr/improved-ContentDisentanglement's train.py (a dict of `e1, e2,
  decoder, ae_opt, disc, disc_opt, iters`): `train.py --load` continues it with its optimiser
  state, `eval.py --load` applies it.

utils.load_checkpoint calls `overlord_folder` and `is_kozistr_checkpoint` and, on a match,
returns what `import_overlord` / `import_kozistr` build: the dict train.py itself writes. Nothing
is executed while reading: `config.pkl` goes through an unpickler that refuses every global, and
the weights through torch.load(weights_only=True). Loading is strict: a missing, extra or
misshapen tensor stops the import with its key in the original's naming.
"""
import copy
import math
import os
import pickle
import re

import numpy as np
import torch

from models import build_cd, build_overlord, make_blur_kernel
from utils import CHECKPOINT_NAME, FORMAT_VERSION, UserError, rng_state, seed_everything, \
    set_rng_state

OVERLORD_FILES = ("config.pkl", "latent.pth", "amortized.pth")
KOZISTR_KEYS = ("e1", "e2", "decoder", "ae_opt", "disc", "disc_opt", "iters")
GRID_RNG_SEED = 1337  # the translation grids' sample generator, as a fresh run starts it


# ------------------------------------------------------------------------------------------------
# Reading without running code

class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a Python global (a class or function): loading it could run code."""


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickler of plain data only (dicts, lists, tuples, strings, numbers, None)."""

    def find_class(self, module, name):
        raise RefusedGlobal(f"{module}.{name}")


def read_original_config(path):
    """The dict pickled in an original `config.pkl`, or UserError without executing anything."""
    try:
        with open(path, "rb") as f:
            config = PlainDataUnpickler(f).load()
    except RefusedGlobal as e:
        raise UserError(f"{path} refers to the Python global {e}, and unpickling it could run "
                        f"code: refused (remove config.pkl to import with the preset inferred "
                        f"from the tensors)") from None
    except Exception as e:  # a truncated or foreign file: any unpickling error
        raise UserError(f"{path} is not a readable pickle ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a {type(config).__name__}, not the original's config dict")
    return config


def read_tensors(path):
    """A state dict saved by torch.save (zipfile or legacy format, from any device) on the CPU."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable torch state dict "
                        f"({str(e).strip().splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return dict(state)


def strict_rename(tensors, expected, what):
    """{new name: tensor} from `tensors` named as in `expected` ({old name: (new name, shape)}).
    UserError naming the first missing, extra or misshapen key."""
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    wrong = [k for k in expected if k in tensors
             and tuple(tensors[k].shape) != tuple(expected[k][1])]
    for problem, keys in (("lacks", missing), ("has an unexpected tensor", extra),
                          ("has a misshapen tensor", wrong)):
        if keys:
            detail = (f" of shape {tuple(tensors[keys[0]].shape)}, expected "
                      f"{tuple(expected[keys[0]][1])}" if keys is wrong else "")
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise UserError(f"{what} {problem} {keys[0]}{detail}{more}")
    return {new: tensors[old] for old, (new, _) in expected.items()}


def seeded_rng_state(seed):
    """rng_state() as seed_everything(seed) leaves it, without touching this process's state."""
    saved = rng_state()
    seed_everything(seed)
    state = rng_state()
    set_rng_state(saved)
    return state


# ------------------------------------------------------------------------------------------------
# OverLORD: names of the original's modules

# (this project's network, the original's file, its name there)
OVERLORD_PARTS = (
    ("label_embedding", "latent", "label_embedding"),
    ("uncorrelated_embedding", "latent", "uncorrelated_embedding"),
    ("generator", "latent", "generator"),
    ("correlated_encoder", "latent", "correlated_encoder"),
    ("label_encoder", "amortized", "label_encoder"),
    ("uncorrelated_encoder", "amortized", "uncorrelated_encoder"),
    ("correlated_amortized_encoder", "amortized", "correlated_encoder"),
    ("amortized_generator", "amortized", "generator"),
    ("discriminator", "amortized", "discriminator"),
)


def generator_name(key):
    """Generator key -> the original's: it keeps each level's two convs in one list."""
    match = re.match(r"(up_convs|convs)\.(\d+)\.(.*)", key)
    if not match:
        return key
    kind, level, rest = match.groups()
    return f"convs.{2 * int(level) + (kind == 'convs')}.{rest}"


def encoder_name(key):
    """CodeEncoder key -> the original Encoder's (`main`, and named residual-block layers)."""
    key = re.sub(r"^net\.", "main.", key)
    return (key.replace(".residual.1.", ".conv1.").replace(".residual.4.", ".conv2.")
            .replace(".shortcut.", ".conv1x1."))


def original_name(part, original_part, key):
    """`part.key` of this project -> the original's key, DataParallel's `module.` included."""
    if part.endswith("generator"):
        key = generator_name(key)
    elif part.endswith("encoder"):
        key = encoder_name(key)
    elif part == "discriminator":
        key = re.sub(r"^blocks\.", "convs.", key)
    return f"{original_part}.module.{key}"


def expected_overlord_tensors(model):
    """{file: {original key: (project key or None for an FIR kernel, shape)}} of `model`, and
    {original key of an FIR kernel: its gain} (the kernels are buffers only in the original)."""
    expected, kernels = {"latent": {}, "amortized": {}}, {}
    for part, file, original_part in OVERLORD_PARTS:
        net = getattr(model, part)
        if net is None:
            continue
        for key, tensor in net.state_dict().items():
            name = original_name(part, original_part, key)
            expected[file][name] = (f"{part}.{key}", tuple(tensor.shape))
        for key, buffer in net.named_buffers():
            if key.endswith(".kernel"):
                name = original_name(part, original_part, key)
                expected[file][name] = (None, tuple(buffer.shape))
                # ×4 after the zero insertion of the generator's upsampling, ×1 in the critic
                kernels[name] = 4.0 if part.endswith("generator") else 1.0
    return expected, kernels


def check_fir_kernels(tensors, kernels, what):
    """The original's blur/upsample kernel buffers must hold this project's fixed kernels."""
    for name, gain in kernels.items():
        if name in tensors and not torch.allclose(tensors[name].float(),
                                                  make_blur_kernel() * gain, atol=1e-6):
            raise UserError(f"{what}: {name} is not the FIR kernel outer([1,3,3,1])/64"
                            f"{' x4' if gain != 1 else ''} this project uses")


# ------------------------------------------------------------------------------------------------
# OverLORD: sizes from the tensors, the preset from config.pkl

def module_indices(tensors, prefix):
    """Sorted distinct integers N of keys `prefix.N.…`."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in tensors if (m := pattern.match(k))})


def require(tensors, key, what):
    """tensors[key], or UserError naming the key."""
    if key not in tensors:
        raise UserError(f"{what} lacks {key}")
    return tensors[key]


def overlord_sizes(latent, amortized, what):
    """Sizes and widths of the networks, read from the tensors (SPEC F)."""
    labels = require(latent, "label_embedding.module.weight", f"{what}/latent.pth")
    images = require(latent, "uncorrelated_embedding.module.weight", f"{what}/latent.pth")
    levels = module_indices(latent, "generator.module.to_rgbs")
    if not levels:
        raise UserError(f"{what}/latent.pth holds no generator (generator.module.to_rgbs.*)")
    sizes = {"side": 2 ** (len(levels) + 2), "n_labels": labels.shape[0],
             "label_dim": labels.shape[1], "n_imgs": images.shape[0],
             "uncorrelated_dim": images.shape[1], "correlated_dim": 0,
             "generator_width": require(latent, "generator.module.input.input",
                                        f"{what}/latent.pth").shape[1]}
    encoder = "correlated_encoder.module.main"
    if module_indices(latent, encoder):
        sizes["correlated_dim"] = latent[f"{encoder}.{module_indices(latent, encoder)[-1]}"
                                         f".weight"].shape[0]
    # every encoder is built alike: read the widths from one that is there
    source, name = ((amortized, "uncorrelated_encoder") if amortized
                    else (latent, "correlated_encoder"))
    main = f"{name}.module.main"
    if module_indices(source, main):
        last = module_indices(source, main)[-1]
        sizes["encoder_base"] = source[f"{main}.0.weight"].shape[0]
        sizes["encoder_width"] = source[f"{main}.{last}.weight"].shape[1]
    if amortized:
        sizes["discriminator_width"] = require(
            amortized, "discriminator.module.final_conv.0.weight", f"{what}/amortized.pth").shape[0]
    return sizes


def presets():
    """train.py's OverLORD presets (imported here: train imports this module's callers)."""
    from train import PRESETS
    return PRESETS


def choose_preset(original, sizes, what):
    """Name of the preset for these tensors: the one with config.pkl's labelled attribute and
    correlation mode, else the one whose code widths the tensors have."""
    if original is not None:
        for name, preset in presets().items():
            if (preset["labeled_attribute"], preset["correlation"]) == \
                    (original.get("labeled_attribute"), original.get("correlation")):
                return name
    correlated = sizes["correlated_dim"] > 0
    matches = [name for name, p in presets().items()
               if (p["label_dim"], p["uncorrelated_dim"], bool(p["correlation"])) ==
               (sizes["label_dim"], sizes["uncorrelated_dim"], correlated)
               and (not correlated or p["correlated_dim"] == sizes["correlated_dim"])
               and (original is None or p["correlation"] == original.get("correlation"))]
    if not matches:
        raise UserError(f"{what}: codes of widths label {sizes['label_dim']}, uncorrelated "
                        f"{sizes['uncorrelated_dim']}, correlated {sizes['correlated_dim']} match "
                        f"no preset ({', '.join(presets())}); its config.pkl would name one")
    if len(matches) > 1:
        print(f"note: {what}: presets {', '.join(matches)} have these networks; took "
              f"{matches[0]} (the choice changes training settings only)")
    return matches[0]


def overlay(preset, original):
    """`preset` with the values that config.pkl gives for the same keys (ints kept as floats where
    the preset has floats)."""
    for key, value in preset.items():
        if key not in original:
            continue
        if isinstance(value, dict) and isinstance(original[key], dict):
            overlay(value, original[key])
        elif isinstance(value, float) and isinstance(original[key], int):
            preset[key] = float(original[key])
        elif not isinstance(value, dict):
            preset[key] = list(original[key]) if isinstance(original[key], tuple) \
                else original[key]
    return preset


ORIGINAL_CELEBA_CROP, ORIGINAL_CELEBA_WIDTH = 128, 178  # its preprocessing's crop (SPEC G)


def overlord_config(original, sizes, what):
    """This project's config for the original's model: preset, config.pkl's settings, sizes."""
    name = choose_preset(original, sizes, what)
    cfg = copy.deepcopy(presets()[name])
    if original is not None:
        overlay(cfg, original)
        if "correlation_augmentation" in original:
            overlay(cfg["augmentation"], original["correlation_augmentation"])
        perceptual = original.get("perceptual_loss", {})
        if "layers" in perceptual:
            cfg["perceptual"]["layer_ids"] = list(perceptual["layers"])
        if "normalize" in perceptual:
            cfg["perceptual"]["normalize"] = bool(perceptual["normalize"])
        for key in ("label_dim", "uncorrelated_dim", "n_imgs", "n_labels") + \
                (("correlated_dim",) if original.get("correlation") else ()):
            if key in original and original[key] != sizes[key]:
                raise UserError(f"{what}: config.pkl says {key} {original[key]}, the tensors "
                                f"{sizes[key]}")
    if bool(cfg["correlation"]) != (sizes["correlated_dim"] > 0):
        raise UserError(f"{what}: correlation {cfg['correlation']!r}, but latent.pth "
                        f"{'has' if sizes['correlated_dim'] else 'lacks'} a correlated encoder")
    cfg.update(preset=name, method="overlord", seed=0, root="", img_shape=[sizes["side"]] * 2 + [3],
               **{k: sizes[k] for k in ("n_imgs", "n_labels", "label_dim", "uncorrelated_dim",
                                        "correlated_dim")})
    if name == "celeba":  # the original cut 128 px from the middle of 178x218 aligned CelebA
        cfg.update(input_crop=ORIGINAL_CELEBA_CROP, input_crop_of=ORIGINAL_CELEBA_WIDTH)
    cfg["generator"]["max_width"] = sizes["generator_width"]  # = min(512, max_width)
    if "encoder_base" in sizes:
        cfg["encoder"].update(base=sizes["encoder_base"], max_width=sizes["encoder_width"])
    if "discriminator_width" in sizes:
        cfg["discriminator"]["max_width"] = sizes["discriminator_width"]
    return cfg


# ------------------------------------------------------------------------------------------------
# OverLORD: the folder

def overlord_folder(path):
    """The original OverLORD model folder that `path` names (the folder or one of its files),
    or None. A folder that also holds this project's checkpoint is this project's."""
    folder = os.path.dirname(path) if os.path.basename(path) in OVERLORD_FILES else path
    if not os.path.isdir(folder) or os.path.exists(os.path.join(folder, CHECKPOINT_NAME)):
        return None
    return folder if os.path.isfile(os.path.join(folder, "latent.pth")) else None


def import_overlord(folder):
    """This project's OverLORD checkpoint dict from an original model folder."""
    what = folder.rstrip("/") or folder
    config_path = os.path.join(folder, "config.pkl")
    original = read_original_config(config_path) if os.path.isfile(config_path) else None
    latent = read_tensors(os.path.join(folder, "latent.pth"))
    amortized_path = os.path.join(folder, "amortized.pth")
    amortized = read_tensors(amortized_path) if os.path.isfile(amortized_path) else None
    ckpt = overlord_checkpoint(latent, amortized, original, what)
    if original is None:
        print(f"note: {what} has no config.pkl; preset {ckpt['config']['preset']} inferred from "
              f"the tensors")
    return ckpt


def overlord_checkpoint(latent, amortized, original, what):
    """The checkpoint dict from the original's two state dicts and config (None if absent)."""
    from train import numpy_rng_state
    cfg = overlord_config(original, overlord_sizes(latent, amortized, what), what)
    with torch.device("meta"):  # shapes only: nothing is allocated
        shapes = build_overlord(cfg)
    expected, kernels = expected_overlord_tensors(shapes)
    state, done = {}, ["disentanglement"]
    for file, tensors in (("latent", latent), ("amortized", amortized)):
        if tensors is None:
            continue
        check_fir_kernels(tensors, kernels, f"{what}/{file}.pth")
        renamed = strict_rename(tensors, expected[file], f"{what}/{file}.pth")
        state.update({k: v for k, v in renamed.items() if k is not None})
    if amortized is None:
        # stage 1 only: the later stages' networks start fresh, as they would in training
        saved = rng_state()
        seed_everything(cfg["seed"])
        fresh = build_overlord(cfg).state_dict()
        set_rng_state(saved)
        state.update({k: v for k, v in fresh.items() if k not in state})
    else:
        done += ["amortization", "synthesis"]
    return {"format_version": FORMAT_VERSION, "config": cfg, "stage": done[-1], "step": 0,
            "done": done, "models": {"model": state}, "optimizers": {}, "schedulers": {},
            "rng": seeded_rng_state(cfg["seed"]),
            "grid_rng": numpy_rng_state(np.random.RandomState(GRID_RNG_SEED)),
            "imported_from": what}


# ------------------------------------------------------------------------------------------------
# kozistr's CD checkpoint

def is_kozistr_checkpoint(ckpt):
    """True for the dict kozistr's utils.save_model writes."""
    return isinstance(ckpt, dict) and {"e1", "e2", "decoder"} <= set(ckpt) \
        and "format_version" not in ckpt


def kozistr_encoder_name(key, n_blocks):
    """Encoder key -> kozistr's E1/E2 key: four modules (pad, conv, norm, act) per conv layer,
    then the residual blocks with named convs."""
    index, rest = re.match(r"net\.(\d+)\.(.*)", key).groups()
    index = int(index)
    if index <= n_blocks + 1:  # net.i = Sequential(pad, conv, norm, act)
        return f"model.{4 * index + 1}.{rest.removeprefix('1.')}"
    block = 4 * (n_blocks + 2) + index - (n_blocks + 2)
    return f"model.{block}.{rest.replace('body.1.', 'conv1.').replace('body.5.', 'conv2.')}"


def kozistr_decoder_name(key, n_res_blocks):
    """Decoder key -> kozistr's (`res_model` blocks, then `model`: up-sampling blocks, pad,
    conv, tanh)."""
    index, rest = re.match(r"net\.(\d+)\.(.*)", key).groups()
    index = int(index)
    if index < n_res_blocks:
        return f"res_model.{index}.{rest.replace('body.1.', 'conv1.').replace('body.5.', 'conv2.')}"
    rest = rest.replace("body.2.", "conv.").replace("body.3.", "norm.")
    return f"model.{index - n_res_blocks}.{rest}"


def kozistr_disc_name(key):
    """LatentDiscriminator key -> kozistr's Disc: old-style spectral norm (weight_orig and the
    power iteration's u, v) in `classify`."""
    key = key.replace("net.", "classify.", 1)
    return (key.replace("parametrizations.weight.original", "weight_orig")
            .replace("parametrizations.weight.0._u", "weight_u")
            .replace("parametrizations.weight.0._v", "weight_v"))


def kozistr_sizes(ckpt, what):
    """The CD architecture of a kozistr checkpoint, read from its tensors."""
    e1, e2, decoder = (ckpt[k] for k in ("e1", "e2", "decoder"))
    convs = [i for i in module_indices(e1, "model") if f"model.{i}.weight" in e1]
    res_blocks = [i for i in module_indices(e1, "model") if f"model.{i}.conv1.weight" in e1]
    n_blocks = len(convs) - 2
    e2_last = [i for i in module_indices(e2, "model") if f"model.{i}.weight" in e2][-1]
    code = require(decoder, "model.0.conv.weight", f"{what} decoder").shape[1]
    sep = e2[f"model.{e2_last}.weight"].shape[0]
    disc_in = require(ckpt["disc"], "classify.0.weight_orig", f"{what} disc").shape[1]
    side = math.isqrt(disc_in // max(code - sep, 1))
    return {"resize": side * 2 ** (n_blocks + 1), "sep": sep, "n_tot_feats": code,
            "n_blocks": n_blocks, "n_res_blocks": len(module_indices(decoder, "res_model")),
            "n_enc_res_blocks": len(res_blocks),
            "e2_feats": require(e2, "model.1.weight", f"{what} e2").shape[0]}


def kozistr_weights(ckpt, model, cfg, what):
    """This project's CD state dict from kozistr's e1, e2, decoder and disc."""
    parts = {"common_encoder": ("e1", lambda k: kozistr_encoder_name(k, cfg["n_blocks"])),
             "separate_encoder": ("e2", lambda k: kozistr_encoder_name(k, cfg["n_blocks"])),
             "decoder": ("decoder", lambda k: kozistr_decoder_name(k, cfg["n_res_blocks"])),
             "latent_disc": ("disc", kozistr_disc_name)}
    state = {}
    for part, (name, rename) in parts.items():
        expected = {rename(k): (f"{part}.{k}", tuple(v.shape))
                    for k, v in getattr(model, part).state_dict().items()}
        tensors = {k.removeprefix("module."): v for k, v in ckpt[name].items()}
        state.update(strict_rename(tensors, expected, f"{what} '{name}'"))
    return state


def kozistr_adam(saved, params, what):
    """kozistr's Adam state dict for this project's optimiser over `params` (same order): its
    moments and hyperparameters, with the flags of this project's Adam (train.adam)."""
    from train import adam
    group = adam([torch.zeros(1)], 1e-3).state_dict()["param_groups"][0]
    if len(saved.get("param_groups", ())) != 1:
        raise UserError(f"{what}: expected one parameter group")
    old = saved["param_groups"][0]
    group.update({k: old[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad") if k in old},
                 params=list(range(len(params))))
    if "initial_lr" in old:
        group["initial_lr"] = old["initial_lr"]
    order = {p: i for i, p in enumerate(old["params"])}
    state = {}
    for p, s in saved["state"].items():
        i = order.get(p, p)
        if not 0 <= i < len(params) or tuple(s["exp_avg"].shape) != tuple(params[i].shape):
            raise UserError(f"{what}: the moments of parameter {p} do not fit this architecture")
        state[i] = {**s, "step": torch.tensor(float(s["step"]))}
    return {"state": state, "param_groups": [group]}


def import_kozistr(ckpt, file):
    """This project's CD checkpoint dict from one written by kozistr's train.py."""
    from train import build_parser
    missing = [k for k in KOZISTR_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{file}: a kozistr checkpoint without {', '.join(missing)}")
    cfg = vars(build_parser().parse_args([]))  # kozistr's defaults (crop 178, lrs, ...)
    cfg.update(kozistr_sizes(ckpt, file), method="cd", root="", load="",
               out=os.path.join(os.path.dirname(os.path.abspath(file)), "continued"))
    with torch.device("meta"):
        shapes = build_cd(cfg)
    state = kozistr_weights(ckpt, shapes, cfg, file)
    optimizers = {"ae": kozistr_adam(ckpt["ae_opt"], shapes.autoencoder_parameters(),
                                     f"{file} ae_opt"),
                  "disc": kozistr_adam(ckpt["disc_opt"], list(shapes.latent_disc.parameters()),
                                       f"{file} disc_opt")}
    # kozistr saves after the step numbered `iters` (from 0), so iters + 1 steps are done
    return {"format_version": FORMAT_VERSION, "config": cfg, "step": int(ckpt["iters"]) + 1,
            "models": {"model": state}, "optimizers": optimizers,
            "rng": seeded_rng_state(cfg["seed"]), "imported_from": file}
