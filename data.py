"""Data: image decoding, two-domain (CD) and labelled (OverLORD) datasets, demos and preparation.

Preparation from the command line, one subcommand per source. The CD ones (content
disentanglement) write the list files trainA/trainB/testA/testB.txt into --dest:
    python data.py celeba --root img_align_celeba --attributes list_attr_celeba.txt --attr Bald
    python data.py folders --root DIR --dest ./mydata      # DIR/trainA, trainB, testA, testB
    python data.py demo --dest ./demo_data                 # the faces train.py uses without --root
(celeba --attributes writes into ./bald unless --dest says otherwise.) The OverLORD ones write one
prepared folder (images.npy, labels.npy, ...; the format heads data.py's "OverLORD" section):
    python data.py celeba --root img_align_celeba --identities identity_CelebA.txt --dest ol/celeba
    python data.py ffhq --root ffhq-dataset --dest ol/ffhq             # imgs/*.png, features/*.json
    python data.py afhq --root afhq --split train --dest ol/afhq       # afhq/train/<domain>/*
    python data.py celebahq --root celebahq --part hair --dest ol/celebahq_hair
    python data.py labeled --root DIR --dest ol/mine                   # DIR/<label>/*.png
    python data.py labeled --csv list.csv --dest ol/mine               # path,label lines
    python data.py demo_labeled --dest ol/demo           # synthetic faces, 3 hair colours, masks
Photos of faces, aligned first as FFHQ (ffhq, celebahq) or CelebA (celeba) were (face_align.py):
    python data.py align --root photos/ --dest aligned/ --size 256 --style ffhq
"""
import argparse
import csv
import inspect
import json
import math
import os
import re
import sys

import cv2
import numpy as np
from tqdm import tqdm

from utils import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------
# Decoding

def to_rgb_uint8(img):
    """Convert a decoded OpenCV array (gray, BGR, BGRA; 8 or 16 bit) to HxWx3 uint8 RGB."""
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img.astype(np.float32) * (255.0 if img.max() <= 1.0 else 1.0), 0, 255)
        img = img.astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(path):
    """Decode an image file to HxWx3 uint8 RGB; None if it is missing or cannot be decoded."""
    try:
        data = np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None
        if data is None or data.size == 0:
            return None
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        return None if img is None else to_rgb_uint8(img)
    except (OSError, cv2.error):  # unreadable file, or a layout OpenCV cannot convert
        return None


def write_image(path, rgb):
    """Write HxWx3 uint8 RGB to `path` (format from the extension); UserError if it cannot."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(os.path.splitext(path)[1] or ".png", bgr)
    if not ok:
        raise UserError(f"cannot encode an image as {path!r} (unknown extension?)")
    try:
        buf.tofile(path)
    except OSError as e:
        raise UserError(f"cannot write {path!r}: {e.strerror}") from None


# ------------------------------------------------------------------------------------------------
# Files, attribute tables and square geometry (both methods)

def natural_key(text):
    """Sort key that orders digit runs numerically ("img2" before "img10", "9" before "10")."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(text))]


def list_images(folder, key=None):
    """Image files directly inside `folder` (hidden ones skipped), sorted by name or by `key`."""
    names = [name for name in os.listdir(folder)
             if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    return [os.path.join(folder, name) for name in sorted(names, key=key)]


def require_dir(path, what):
    """Return `path` if it is a folder, else raise a UserError naming `what` it should hold."""
    if not os.path.isdir(path):
        raise UserError(f"{what}: folder {path!r} does not exist")
    return path


def require_file(path, what):
    """Return `path` if it is a file, else raise a UserError naming `what` it should be."""
    if not os.path.isfile(path):
        raise UserError(f"{what}: file {path!r} does not exist")
    return path


def read_attributes(path):
    """Yield (image name, {attribute: value}) per row of a CelebA attribute file."""
    with open(path, encoding="utf-8") as f:
        f.readline()  # the image count
        names = f.readline().split()
        if not names:
            raise UserError(f"{path!r} is not an attribute file (a count line, then names)")
        for line_no, line in enumerate(f, 3):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != len(names) + 1:
                raise UserError(f"{path}:{line_no}: expected an image name and {len(names)} values")
            try:
                yield tokens[0], dict(zip(names, map(int, tokens[1:])))
            except ValueError:
                raise UserError(f"{path}:{line_no}: attribute values must be integers") from None


def center_crop(img, crop):
    """Central crop x crop square (crop 0 = the largest central square)."""
    h, w = img.shape[:2]
    crop = crop or min(h, w)
    top, left = (h - crop) // 2, (w - crop) // 2
    return img[top:top + crop, left:left + crop]


INTERPOLATIONS = ("area", "bilinear")  # ours; the seeds' (torchvision's Resize on PIL images)


def resize_bilinear_like_pil(img, side):
    """PIL's bilinear resize (what the seeds' torchvision Resize does): a triangle filter
    widened by the shrink factor, so shrinking is antialiased; rounded back to uint8."""
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()  # copy: may be read-only
    y = F.interpolate(x, (side, side), mode="bilinear", antialias=True, align_corners=False)
    return y[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def resize_square(img, side, enlarge=cv2.INTER_CUBIC, interpolation="area"):
    """Resize a square image: "area" shrinks by pixel areas and enlarges with `enlarge`;
    "bilinear" is PIL's bilinear both ways (the seeds')."""
    if img.shape[0] == side and img.shape[1] == side:
        return img
    if interpolation == "bilinear":
        return resize_bilinear_like_pil(img, side)
    shrink = img.shape[0] > side
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA if shrink else enlarge)


def to_tensor(rgb, signed=True):
    """HxWx3 uint8 -> 3xHxW float tensor in [-1, 1] (CD), or in [0, 1] when not `signed`."""
    import torch
    img = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()
    return img.div_(127.5).sub_(1) if signed else img.div_(255)


# ------------------------------------------------------------------------------------------------
# Synthetic faces (the demo data of both methods)

SKIN_TONES = ((255, 224, 196), (234, 192, 160), (198, 148, 112), (141, 98, 70), (250, 210, 180))
HAIR_COLOURS = ((40, 30, 25), (110, 70, 40), (220, 190, 110), (170, 70, 40), (150, 150, 150))
GLASSES_COLOURS = ((20, 20, 20), (200, 30, 30), (30, 60, 200), (20, 150, 60))


def face_parameters(rng, hair=None):
    """Everything random about one cartoon face (no glasses), drawn from `rng` (a numpy
    Generator) in a fixed order; `hair` forces one of HAIR_COLOURS by index. Coordinates are in
    a 64-px frame."""
    p = {"top": rng.integers(120, 256, 3), "bottom": rng.integers(60, 220, 3),
         "cx": 32 + rng.uniform(-2.5, 2.5), "cy": 35 + rng.uniform(-2.0, 2.0),
         "fw": rng.uniform(14, 17), "fh": rng.uniform(18, 21),
         "skin": int(rng.integers(len(SKIN_TONES)))}
    p["hair"] = int(rng.integers(len(HAIR_COLOURS))) if hair is None else hair
    p["fringe"] = rng.uniform(4, 8)
    p["eye_y"], p["eye_dx"] = p["cy"] - 3 + rng.uniform(-1, 1), rng.uniform(6, 7.5)
    p["smile"] = rng.uniform(0.5, 3.0)
    p["mouth"] = rng.uniform(3.5, 6)
    return p


def glasses_parameters(rng):
    """The random part of a pair of glasses: colour (index into GLASSES_COLOURS), lens radius.
    Where they sit follows the face they are drawn on (its eyes and width)."""
    return {"colour": int(rng.integers(len(GLASSES_COLOURS))), "lens": rng.uniform(3.5, 4.5)}


def render_face(face, glasses=None, size=64):
    """Draw a face of face_parameters, wearing glasses of glasses_parameters if given
    (HxWx3 uint8 RGB). Drawn at 4x and shrunk for anti-aliased edges."""
    s = 4 * size
    u = s / 64.0  # drawing unit: coordinates below are in a 64-px frame

    def pt(x, y):
        return int(round(x * u)), int(round(y * u))

    ramp = np.linspace(0.0, 1.0, s)[:, None, None]
    img = face["top"] * (1 - ramp) + face["bottom"] * ramp
    img = np.ascontiguousarray(img.repeat(s, 1).astype(np.uint8))
    cx, cy, fw, fh = face["cx"], face["cy"], face["fw"], face["fh"]
    skin = tuple(int(c) for c in SKIN_TONES[face["skin"]])
    hair_colour = tuple(int(c) for c in HAIR_COLOURS[face["hair"]])
    cv2.ellipse(img, pt(cx, cy - 4), pt(fw + 3, fh + 2), 0, 180, 360, hair_colour, -1, cv2.LINE_AA)
    cv2.ellipse(img, pt(cx, cy), pt(fw, fh), 0, 0, 360, skin, -1, cv2.LINE_AA)
    cv2.ellipse(img, pt(cx, cy - fh + 4), pt(fw + 1, face["fringe"]), 0, 180, 360, hair_colour,
                -1, cv2.LINE_AA)
    eye_y, eye_dx = face["eye_y"], face["eye_dx"]
    for side in (-1, 1):
        cv2.circle(img, pt(cx + side * eye_dx, eye_y), int(1.6 * u), (30, 30, 40), -1, cv2.LINE_AA)
    cv2.line(img, pt(cx, eye_y + 2), pt(cx - 1, eye_y + 7), tuple(int(c * 0.8) for c in skin),
             max(1, int(0.8 * u)), cv2.LINE_AA)
    cv2.ellipse(img, pt(cx, cy + 9), pt(face["mouth"], face["smile"]), 0, 0, 180, (150, 40, 50),
                max(1, int(u)), cv2.LINE_AA)
    if glasses is not None:
        colour = tuple(int(c) for c in GLASSES_COLOURS[glasses["colour"]])
        lens = glasses["lens"]
        for side in (-1, 1):
            cv2.circle(img, pt(cx + side * eye_dx, eye_y), int(lens * u), colour, -1, cv2.LINE_AA)
        cv2.line(img, pt(cx - eye_dx + lens, eye_y), pt(cx + eye_dx - lens, eye_y), colour,
                 max(1, int(1.2 * u)), cv2.LINE_AA)
        for side in (-1, 1):
            cv2.line(img, pt(cx + side * (eye_dx + lens), eye_y),
                     pt(cx + side * (fw + 0.5), eye_y - 1), colour, max(1, int(u)), cv2.LINE_AA)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def draw_face(rng, size=64, glasses=False, hair=None):
    """Draw a random cartoon face (HxWx3 uint8 RGB); `glasses` adds the accessory of domain A.

    Pose, skin, hair, background and expression vary with `rng` (a numpy Generator); `hair`
    forces one of HAIR_COLOURS by index."""
    return render_face(*draw_face_parameters(rng, glasses, hair), size)


def draw_face_parameters(rng, glasses=False, hair=None):
    """(face parameters, glasses parameters or None) as draw_face draws them from `rng`."""
    face = face_parameters(rng, hair)
    return face, glasses_parameters(rng) if glasses else None


# ------------------------------------------------------------------------------------------------
# Two-domain data (CD): list files or folders

SPLITS = ("trainA", "trainB", "testA", "testB")


def read_list(list_file, image_root=""):
    """Image paths of a list file: one per line; blank lines skipped; relative paths resolved
    against the list's folder; a missing absolute path is re-rooted under `image_root` if given."""
    base = os.path.dirname(os.path.abspath(list_file))
    with open(list_file, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    paths = []
    for line in filter(None, lines):
        path = line if os.path.isabs(line) else os.path.join(base, line)
        if image_root and not os.path.exists(path):
            path = os.path.join(image_root, os.path.basename(line))
        paths.append(path)
    return paths


def domain_paths(root, image_root="", splits=SPLITS):
    """{split: [paths]} for each split, from list files or, failing that, folders."""
    if not root or not os.path.isdir(root):
        raise UserError(f"data folder {root!r} does not exist (expected list files "
                        f"{', '.join(s + '.txt' for s in splits)} or folders of those names)")
    paths = {}
    for split in splits:
        list_file, folder = os.path.join(root, f"{split}.txt"), os.path.join(root, split)
        if os.path.isfile(list_file):
            paths[split] = read_list(list_file, image_root)
        elif os.path.isdir(folder):
            paths[split] = list_images(folder)
        else:
            raise UserError(f"{root} has neither {split}.txt nor a {split}/ folder "
                            f"(make them with: python data.py folders|celeba ...)")
        if not paths[split]:
            raise UserError(f"{split} in {root} holds no images: every domain needs some")
    return paths


def preprocess(rgb, crop, resize, signed=True, interpolation="area"):
    """Center crop (0 = largest square), resize, tensor in [-1, 1] (CD) or [0, 1] (OverLORD)."""
    return to_tensor(resize_square(center_crop(rgb, crop), resize,
                                   interpolation=interpolation), signed)


def _inspect(path, crop, resize=0, interpolation="area"):
    img = read_image(path)
    if img is None:
        return "bad", None
    if crop and min(img.shape[:2]) < crop:
        return "small", img.shape[:2]
    if not resize:
        return "ok", None
    return "ok", resize_square(center_crop(img, crop), resize, interpolation=interpolation)


def check_images(paths, crop, name, skip_bad=False, workers=4, cache_file=None, resize=0,
                 interpolation="area"):
    """Decode every image once; raise a UserError naming the unreadable or too-small ones, or
    drop them with a warning when `skip_bad`. Returns the usable paths. With `cache_file`, the
    same pass writes each usable image, cropped and resized, as a row of a uint8 array there."""
    from concurrent.futures import ThreadPoolExecutor
    rows = None
    if cache_file:
        rows = np.lib.format.open_memmap(f"{cache_file}.partial", mode="w+", dtype=np.uint8,
                                         shape=(len(paths), resize, resize, 3))
    statuses = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda p: _inspect(p, crop, resize if rows is not None else 0,
                                              interpolation), paths)
        for i, (status, value) in enumerate(tqdm(results, total=len(paths), leave=False,
                                                 desc=f"checking {name}",
                                                 disable=len(paths) < 2000)):
            statuses.append((status, value if status == "small" else None))
            if status == "ok" and rows is not None:
                rows[i] = value
    if rows is not None:
        rows.flush()
        del rows
    bad = [p for p, (status, _) in zip(paths, statuses) if status == "bad"]
    small = [(p, size) for p, (status, size) in zip(paths, statuses) if status == "small"]
    problems = []
    if bad:
        problems.append(f"{len(bad)} of {len(paths)} images in {name} are missing or cannot be "
                        f"decoded (e.g. {', '.join(bad[:3])})")
    if small:
        (p, (h, w)) = small[0]
        problems.append(f"{len(small)} of {len(paths)} images in {name} are smaller than --crop "
                        f"{crop} (e.g. {p} is {w}x{h}; use a smaller --crop, or --crop 0 for the "
                        f"largest central square)")
    if problems and not skip_bad:
        if cache_file:
            os.remove(f"{cache_file}.partial")
        raise UserError("; ".join(problems) + "; pass --skip_bad to train without them")
    if cache_file:
        os.replace(f"{cache_file}.partial", cache_file)
    if not problems:
        return paths
    print("warning: " + "; ".join(problems) + "; skipped (--skip_bad)", file=sys.stderr)
    drop = set(bad) | {p for p, _ in small}
    kept = [p for p in paths if p not in drop]
    if not kept:
        raise UserError(f"no usable image left in {name}")
    return kept


class ImageFiles:
    """Dataset over image files; an item is asked for as (index, flip) so that the sampler, not a
    worker's random state, decides the flip (which makes resumed runs exact)."""

    def __init__(self, paths, crop, resize, interpolation="area"):
        self.paths, self.crop, self.resize = list(paths), crop, resize
        self.interpolation = interpolation

    def __len__(self):
        return len(self.paths)

    def image(self, index):
        """HxWx3 uint8 of item `index`, cropped and resized."""
        img = read_image(self.paths[index])
        if img is None:
            raise UserError(f"cannot decode {self.paths[index]} (it changed after the start?)")
        return resize_square(center_crop(img, self.crop), self.resize,
                             interpolation=self.interpolation)

    def __getitem__(self, item):
        index, flip = item
        img = self.image(index)
        return to_tensor(img[:, ::-1] if flip else img)

    def batch(self, indices):
        """A (len(indices), 3, R, R) tensor of un-flipped images, for grids."""
        import torch
        return torch.stack([self[(i, False)] for i in indices])


class CachedImages(ImageFiles):
    """ImageFiles read from the uint8 rows check_images cached: no decoding after the first pass.
    The memory map is opened lazily, so each DataLoader worker opens its own."""

    def __init__(self, paths, cache_file, rows):
        super().__init__(paths, 0, 0)
        self.cache_file, self.rows, self._array = cache_file, list(rows), None

    def image(self, index):
        if self._array is None:
            self._array = np.load(self.cache_file, mmap_mode="r")
        return self._array[self.rows[index]]

    def __getstate__(self):
        return {**self.__dict__, "_array": None}


def cache_signature(paths, crop, resize, skip_bad, interpolation="area"):
    """A digest of the image files (paths, sizes, modification times) and the transform."""
    import hashlib
    extra = "" if interpolation == "area" else f" {interpolation}"  # old caches stay valid
    digest = hashlib.sha1(f"{crop} {resize} {skip_bad}{extra}".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path} missing\n".encode())
    return digest.hexdigest()


def open_image_set(paths, crop, resize, name, skip_bad=False, workers=4, cache_dir="",
                   cache_gb=0.0, interpolation="area"):
    """Check a split's images and return its dataset: decoded once into a uint8 cache under
    `cache_dir` when that takes at most `cache_gb` GB (reused while the files are unchanged),
    else decoded on every access."""
    if not cache_dir or len(paths) * resize * resize * 3 > cache_gb * 1e9:
        return ImageFiles(check_images(paths, crop, name, skip_bad, workers), crop, resize,
                          interpolation)
    os.makedirs(cache_dir, exist_ok=True)
    signature = cache_signature(paths, crop, resize, skip_bad, interpolation)
    tag = f"{resize}" if interpolation == "area" else f"{resize}_{interpolation}"
    cache_file = os.path.join(cache_dir, f"{name}_{tag}.npy")
    index_file = os.path.join(cache_dir, f"{name}_{tag}.json")
    if os.path.isfile(index_file) and os.path.isfile(cache_file):
        with open(index_file) as f:
            index = json.load(f)
        if index.get("signature") == signature:
            return CachedImages(index["paths"], cache_file, index["rows"])
    kept = check_images(paths, crop, name, skip_bad, workers, cache_file, resize, interpolation)
    position = {p: i for i, p in enumerate(paths)}
    rows = [position[p] for p in kept]
    with open(f"{index_file}.partial", "w") as f:
        json.dump({"signature": signature, "paths": kept, "rows": rows}, f)
    os.replace(f"{index_file}.partial", index_file)
    return CachedImages(kept, cache_file, rows)


# ------------------------------------------------------------------------------------------------
# Endless batches (both methods): a resumable sampler and one persistent DataLoader

class EndlessBatches:
    """Batches of (index, flip), or of (index, seed) with `item_seeds`, forever: epoch e is a
    permutation drawn from (seed, e), its short tail dropped when `drop_last`, and `start` batches
    are skipped, so a run can resume mid-epoch exactly. `batch_size` is the global batch: process
    `rank` of `world` gets its share of every batch, so the order is the same at any world size."""

    def __init__(self, n, batch_size, seed, start=0, drop_last=True, item_seeds=False, rank=0,
                 world=1, per_epoch=None):
        if n == 0 or (drop_last and n < batch_size):
            raise ValueError(f"{n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.drop_last, self.item_seeds, self.rank, self.world = drop_last, item_seeds, rank, world
        self.per_epoch = per_epoch

    def batches_per_epoch(self):
        """Full batches, plus the tail unless dropped (or too short to give every process one);
        or the `per_epoch` first batches of each permutation, when given (the seeds' zip of two
        loaders ends every epoch at the smaller domain)."""
        if self.per_epoch is not None:
            return self.per_epoch
        tail = self.n % self.batch_size
        return self.n // self.batch_size + int(not self.drop_last and tail >= self.world)

    def __iter__(self):
        per_epoch = self.batches_per_epoch()
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.n)
            if self.item_seeds:
                extras = rng.integers(2**63, size=self.n)
            else:
                extras = rng.random(self.n) < 0.5
            for b in range(offset, per_epoch):
                chunk = order[b * self.batch_size:(b + 1) * self.batch_size]
                chunk = np.array_split(chunk, self.world)[self.rank]
                yield [(int(i), extras[i].item()) for i in chunk]
            epoch, offset = epoch + 1, 0


def _worker_init(_):
    """Each DataLoader worker: one OpenCV thread, and deaf to SIGINT and SIGTERM. A cluster's
    scancel, `timeout` or systemd signals the whole process group; a worker that died of it
    would make the main process raise inside the training step, so the step could neither
    finish nor be saved. The main process ends its workers itself once it has saved, and a
    worker exits on its own when the main process is gone."""
    import signal
    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def endless_loader(dataset, batch_size, seed, start, workers, pin_memory=False, drop_last=True,
                   rank=0, world=1, per_epoch=None):
    """One persistent DataLoader yielding this process's share of global batches forever, from
    batch `start` on; a LabelledImages gets (index, seed) items, an ImageFiles (index, flip)."""
    import torch
    from torch.utils.data import DataLoader
    batches = EndlessBatches(len(dataset), batch_size, seed, start, drop_last,
                             item_seeds=isinstance(dataset, LabelledImages), rank=rank,
                             world=world, per_epoch=per_epoch)
    # its own generator: starting the workers must not draw from the global RNG, which a
    # resumed run has just restored for the training step's noise
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=pin_memory,
                        worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(seed))
    return iter(loader)


# ------------------------------------------------------------------------------------------------
# Preparation: the four list files

def write_list(path, paths, base):
    """Write one path per line, relative to `base` so the dataset folder can move."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(os.path.relpath(p, base) for p in paths) + "\n")


def write_splits(dest, splits):
    """Write trainA/trainB/testA/testB.txt into `dest` and report the counts."""
    os.makedirs(dest, exist_ok=True)
    for split in SPLITS:
        write_list(os.path.join(dest, f"{split}.txt"), splits[split], os.path.abspath(dest))
    print(", ".join(f"{split}: {len(splits[split])}" for split in SPLITS) + f" -> {dest}")


def make_demo(dest, n_train=2000, n_test=64, size=64, seed=0):
    """Draw the synthetic two-domain demo set (A = faces with glasses) once; reuse it after."""
    if all(os.path.isfile(os.path.join(dest, f"{s}.txt")) for s in SPLITS):
        return dest
    rng = np.random.default_rng(seed)
    splits = {}
    for split in SPLITS:
        folder = os.path.join(dest, split)
        os.makedirs(folder, exist_ok=True)
        count = n_train if split.startswith("train") else n_test
        splits[split] = []
        for i in tqdm(range(count), desc=f"drawing demo {split}", leave=False):
            path = os.path.join(folder, f"{i:05d}.png")
            write_image(path, draw_face(rng, size, glasses=split.endswith("A")))
            splits[split].append(path)
    write_splits(dest, splits)  # the list files last: their presence marks a complete set
    return dest


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def _beard_domain(v):
    if v["Male"] == 1 and v["5_o_Clock_Shadow"] == -1 and (
            v["Mustache"] == 1 or v["Goatee"] == 1 or v["No_Beard"] == -1):
        return "A"
    if v["Male"] == 1 and v["No_Beard"] == 1 and v["5_o_Clock_Shadow"] == -1:
        return "B"
    return None


# preset name -> rule giving 'A', 'B' or None (dropped) from {attribute: +1/-1}
CELEBA_PRESETS = {
    "glasses": lambda v: "A" if v["Eyeglasses"] == 1 else "B",
    "mouth": lambda v: "A" if v["Mouth_Slightly_Open"] == 1 else "B",
    "beard": _beard_domain,
}


def celeba_rule(attr):
    """Domain rule for a preset name, a CelebA attribute name or a 1-based column number."""
    if attr in CELEBA_PRESETS:
        return CELEBA_PRESETS[attr]
    name = attr
    if str(attr).isdigit():
        column = int(attr)
        if not 1 <= column <= len(CELEBA_ATTRIBUTES):
            raise UserError(f"--custom {attr}: CelebA attribute columns are 1..40")
        name = CELEBA_ATTRIBUTES[column - 1]
    if name not in CELEBA_ATTRIBUTES:
        raise UserError(f"unknown CelebA attribute {attr!r}; use one of {', '.join(CELEBA_PRESETS)}"
                        f", a column 1..40 or a name: {', '.join(CELEBA_ATTRIBUTES)}")
    return lambda v: "A" if v[name] == 1 else "B"


# where `celeba --attributes` writes its list files unless --dest says otherwise (the seed's ./bald)
CELEBA_DOMAINS_DEST = "./bald"


def prepare_celeba_domains(args):
    """Split CelebA by an attribute into A (has it) and B; the first num_test_imgs of each: test."""
    require_file(args.attributes, "--attributes (list_attr_celeba.txt)")
    require_dir(args.root, "--root (img_align_celeba)")
    rule = celeba_rule(args.attr if args.attr else args.custom)
    domains = {"A": [], "B": []}
    for name, values in read_attributes(args.attributes):
        domain = rule(values)
        if domain:
            domains[domain].append(os.path.join(args.root, name))
    n = args.num_test_imgs
    splits = {"trainA": domains["A"][n:], "testA": domains["A"][:n],
              "trainB": domains["B"][n:], "testB": domains["B"][:n]}
    for split, paths in splits.items():
        if not paths:
            raise UserError(f"{split} would be empty: the attribute splits too few images")
    write_splits(args.dest or CELEBA_DOMAINS_DEST, splits)


def prepare_folders(args):
    """List files for ROOT/trainA, trainB, testA, testB (image files, sorted)."""
    splits = {}
    for split in SPLITS:
        folder = os.path.join(args.root, split)
        if not os.path.isdir(folder):
            raise UserError(f"--root {args.root!r} has no {split}/ folder")
        splits[split] = list_images(folder)
        if not splits[split]:
            raise UserError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    write_splits(args.dest, splits)


# ------------------------------------------------------------------------------------------------
# OverLORD: labelled data
#
# Prepared-dataset format (format_version 1), one folder holding:
#   images.npy        uint8 (N, S, S, 3) RGB. Written row by row through np.lib.format.open_memmap
#                     and opened with np.load(mmap_mode="r"), so sets larger than RAM still train.
#   labels.npy        int64 (N,) in 0..K-1. Label k is the k-th distinct original value in sorted
#                     order (numbers and digit strings compare numerically); every k has images.
#   label_names.json  JSON list of K strings: the original value of each label ("20-29" for an FFHQ
#                     age decade, the CelebA identity, the AFHQ folder, "female"/"male").
#   masks.npy         optional uint8 (N, S, S) in {0, 1}: the part mask (1 = hair for celebahq).
#   meta.json         {"format": "overlord-labelled", "format_version": 1, "source": preparer name,
#                     "count": N, "image_size": S, "n_labels": K, "label_attribute": "age" |
#                     "identity" | "domain" | "gender" | "label" | "hair_colour", "has_masks",
#                     "skipped": files left out by --skip_bad, plus the preparer's own settings}.
# Every file is first written as NAME.partial and renamed at the end, meta.json last: a folder
# without meta.json is an interrupted preparation, and load_prepared refuses it. A destination that
# holds any file other than these (or their .partial leftovers) is never written into.
#
# Images are center-cropped to a square (CelebA: the fixed --crop_size window of SPEC B2), then
# resized with area interpolation when shrinking and bicubic when enlarging. Masks are reduced to
# one channel (max over channels), resized the same way (nearest when enlarging), kept where >= 128.

FORMAT_NAME = "overlord-labelled"
FORMAT_VERSION = 1
PREPARED_FILES = ("images.npy", "labels.npy", "label_names.json", "masks.npy", "meta.json")
PARTIAL = ".partial"
GROUND_TRUTH_DIR = "ground_truth"  # a demo set's ground truth (ground_truth.py), kept on redraws
SHOWN_PROBLEMS = 3  # how many unusable files an error message names


def label_sort_key(value):
    """Sort key for raw label values: numbers numerically, strings naturally."""
    if isinstance(value, (int, np.integer)):
        return (0, [(0, int(value), "")])
    return (1, natural_key(value))


def remap_labels(values, name=str):
    """Map raw label values to 0..K-1 in sorted order; returns (int64 labels, K names)."""
    distinct = sorted(set(values), key=label_sort_key)
    index = {value: k for k, value in enumerate(distinct)}
    return np.array([index[v] for v in values], dtype=np.int64), [str(name(v)) for v in distinct]


def binary_mask(mask, size):
    """A 2-D or 3-D part mask of any size as size x size uint8 in {0, 1} (>= 128 after resizing)."""
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.max() <= 1:  # a mask stored as 0/1 rather than 0/255
        mask = mask * np.uint8(255)
    mask = resize_square(center_crop(mask, 0), size, enlarge=cv2.INTER_NEAREST)
    return (mask >= 128).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# OverLORD: writing a prepared folder

def is_own_file(name):
    """True for the prepared-dataset files, the .partial leftovers of an interrupted run and
    the demo's ground-truth folder."""
    return name == GROUND_TRUTH_DIR or any(
        name == f or (name.startswith(f + ".") and name.endswith(PARTIAL)) for f in PREPARED_FILES)


def check_dest(dest):
    """Create `dest`, or make sure it holds nothing but a prepared dataset; UserError otherwise."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise UserError(f"--dest {dest!r} is a file, not a folder")
    try:
        os.makedirs(dest, exist_ok=True)
        foreign = sorted(n for n in os.listdir(dest) if not is_own_file(n))
    except OSError as e:
        raise UserError(f"cannot use --dest {dest!r}: {e.strerror}") from None
    if foreign:
        others = f" and {len(foreign) - 1} other entries" if len(foreign) > 1 else ""
        raise UserError(f"refusing to write into {dest!r}: it holds {foreign[0]!r}{others} and is "
                        "not a prepared dataset; choose a new or empty --dest")
    return dest


class PreparedWriter:
    """Streams rows into DEST/*.partial memmaps; `finish` renames them into place (format above)."""

    def __init__(self, dest, capacity, size, with_masks=False):
        self.created = not os.path.isdir(dest)
        self.dest, self.size, self.count, self.values = check_dest(dest), size, 0, []
        self.arrays = {}
        try:
            self.arrays["images.npy"] = np.lib.format.open_memmap(
                self.partial("images.npy"), "w+", np.uint8, (capacity, size, size, 3))
            if with_masks:
                self.arrays["masks.npy"] = np.lib.format.open_memmap(
                    self.partial("masks.npy"), "w+", np.uint8, (capacity, size, size))
        except OSError as e:
            self.abort()
            raise UserError(f"cannot write into {dest!r}: {e.strerror}") from None

    def partial(self, name):
        """The temporary path of prepared file `name`."""
        return os.path.join(self.dest, name + PARTIAL)

    def add(self, img, value, mask=None):
        """Append one S x S x 3 uint8 image with its raw label value (and S x S mask; None = 0)."""
        self.arrays["images.npy"][self.count] = img
        if "masks.npy" in self.arrays:
            self.arrays["masks.npy"][self.count] = 0 if mask is None else mask
        self.values.append(value)
        self.count += 1

    def cut(self, name):
        """Shrink the .partial array `name` to the rows written, copying in chunks (never all)."""
        source = np.load(self.partial(name), mmap_mode="r")
        if len(source) == self.count:
            return
        target = np.lib.format.open_memmap(self.partial(name + ".cut"), "w+", source.dtype,
                                           (self.count,) + source.shape[1:])
        step = max(1, (64 << 20) // max(1, source[0].nbytes))
        for start in range(0, self.count, step):
            stop = min(start + step, self.count)
            target[start:stop] = source[start:stop]
        target.flush()
        del source, target
        os.replace(self.partial(name + ".cut"), self.partial(name))

    def write_json(self, name, obj):
        """Write `obj` as the .partial of prepared file `name`."""
        with open(self.partial(name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)

    def finish(self, source, label_attribute, name=str, **extra):
        """Remap labels, write labels/names/meta and move every file into place; returns dest."""
        if self.count == 0:
            raise UserError(f"no usable images for {source}; nothing was written to {self.dest!r}")
        for array_name in list(self.arrays):
            self.arrays.pop(array_name).flush()
            self.cut(array_name)
        has_masks = os.path.exists(self.partial("masks.npy"))
        labels, names = remap_labels(self.values, name)
        with open(self.partial("labels.npy"), "wb") as f:
            np.save(f, labels)
        self.write_json("label_names.json", names)
        self.write_json("meta.json", dict(
            format=FORMAT_NAME, format_version=FORMAT_VERSION, source=source, count=self.count,
            image_size=self.size, n_labels=len(names), label_attribute=label_attribute,
            has_masks=has_masks, **extra))
        # drop the completeness marker first, so a crash mid-swap leaves an incomplete folder
        final = {n: os.path.join(self.dest, n) for n in PREPARED_FILES}
        if os.path.exists(final["meta.json"]):
            os.remove(final["meta.json"])
        for n in PREPARED_FILES[:-1]:
            if os.path.exists(self.partial(n)):
                os.replace(self.partial(n), final[n])
            elif os.path.exists(final[n]):
                os.remove(final[n])  # masks.npy of an earlier preparation into the same folder
        os.replace(self.partial("meta.json"), final["meta.json"])
        return self.dest

    def abort(self):
        """Remove the .partial files (a complete earlier dataset stays) and a folder we created."""
        self.arrays.clear()
        for n in os.listdir(self.dest):
            if n.endswith(PARTIAL) and is_own_file(n):
                os.remove(os.path.join(self.dest, n))
        if self.created and not os.listdir(self.dest):
            os.rmdir(self.dest)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None:
            self.abort()
        return False


def name_problems(problems):
    """The first few unusable files, each with why, as one line."""
    shown = "; ".join(f"{path} ({why})" for path, why in problems[:SHOWN_PROBLEMS])
    more = len(problems) - SHOWN_PROBLEMS
    return shown + (f"; and {more} more" if more > 0 else "")


def prepare_from_files(dest, items, img_size, source, label_attribute, name=str, skip_bad=False,
                       crop=0, with_masks=False, **extra):
    """Decode, center-crop (`crop` 0: the largest square) and resize `items` [(path, raw label,
    mask path or None)] into `dest`."""
    problems = [(path, "no such file") for path, _, _ in items if not os.path.isfile(path)]
    if problems and not skip_bad:
        raise UserError(f"{len(problems)} of {len(items)} images are missing: "
                        f"{name_problems(problems)}; fix the paths, or pass --skip_bad to leave "
                        "them out")
    missing = {path for path, _ in problems}
    todo = [item for item in items if item[0] not in missing]
    if not todo:
        raise UserError(f"none of the {len(items)} listed images exists, e.g. {items[0][0]}")
    short_sides = set()
    with PreparedWriter(dest, len(todo), img_size, with_masks) as writer:
        for path, value, mask_path in tqdm(todo, desc=f"preparing {source}", unit="img"):
            try:
                img = read_image(path)
                if img is None:
                    raise ValueError("cannot be decoded")
                short_sides.add(min(img.shape[:2]))
                if crop and min(img.shape[:2]) < crop:
                    raise ValueError(f"{img.shape[1]}x{img.shape[0]} px is smaller than "
                                     f"--crop_size {crop}")
                img = resize_square(center_crop(img, crop), img_size)
                mask = None
                if mask_path is not None:
                    mask = read_image(mask_path)
                    if mask is None:
                        raise ValueError(f"its mask {mask_path} cannot be decoded")
                    mask = binary_mask(mask, img_size)
            except ValueError as e:
                problems.append((path, str(e)))
                continue
            writer.add(img, value, mask)
        if problems and not skip_bad:
            raise UserError(f"{len(problems)} of {len(items)} images are unusable: "
                            f"{name_problems(problems)}; fix or remove them, or pass --skip_bad "
                            "to leave them out")
        if problems:
            print(f"warning: left out {len(problems)} of {len(items)} unusable images: "
                  f"{name_problems(problems)}", file=sys.stderr)
        # the framing, so that manipulation crops a new photo as these were cropped: `crop` px
        # of images whose shorter side was `crop_of` px (None when the sizes varied)
        crop_of = short_sides.pop() if len(short_sides) == 1 else None
        return writer.finish(source, label_attribute, name=name, skipped=len(problems),
                             **{"crop": crop, "crop_of": crop_of, **extra})


# ------------------------------------------------------------------------------------------------
# OverLORD: preparers (SPEC B2, with the fixes of B9)

def decade_name(decade):
    """Name of an age decade: 2 -> "20-29"."""
    return f"{10 * decade}-{10 * decade + 9}"


def ffhq_features_path(features_dir, img_path):
    """An FFHQ image's features JSON: STEM.json, else its trailing number as NNNNN.json; or None."""
    stem = os.path.splitext(os.path.basename(img_path))[0]
    digits = re.search(r"(\d+)$", stem)
    for candidate in [stem] + ([f"{int(digits.group(1)):05d}"] if digits else []):
        path = os.path.join(features_dir, candidate + ".json")
        if os.path.isfile(path):
            return path
    return None


def ffhq_age(features_path):
    """Age of the first face in an ffhq-features-dataset JSON; None when it lists no face."""
    try:
        with open(features_path, encoding="utf-8") as f:
            faces = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read features file {features_path!r}: {e}") from None
    if not faces:
        return None
    try:
        return float(faces[0]["faceAttributes"]["age"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise UserError(f"{features_path!r} is not a list of faces with faceAttributes.age "
                        "(ffhq-features-dataset format)") from None


def prepare_ffhq(root, dest, img_size=256, skip_bad=False):
    """FFHQ labelled by age decade (ffhq-features-dataset); images with no detected face dropped."""
    require_dir(root, "FFHQ root")
    img_dir = require_dir(os.path.join(root, "imgs"), "FFHQ images (imgs/*.png)")
    features_dir = require_dir(os.path.join(root, "features"),
                               "FFHQ features (features/NNNNN.json of ffhq-features-dataset)")
    # counted, not assumed to be 70,000 (seed bug B9 #9)
    paths = list_images(img_dir, key=natural_key)
    if not paths:
        raise UserError(f"no images in {img_dir!r}")
    items, dropped = [], []
    for path in tqdm(paths, desc="reading ffhq features", unit="file"):
        features_path = ffhq_features_path(features_dir, path)
        age = None if features_path is None else ffhq_age(features_path)
        if age is None:
            dropped.append(path)
        else:
            items.append((path, int(math.floor(age)) // 10, None))
    if not items:
        raise UserError(f"none of the {len(paths)} images in {img_dir!r} has a face in "
                        f"{features_dir!r} (missing or empty JSON files)")
    if dropped:
        print(f"note: dropped {len(dropped)} of {len(paths)} images whose features JSON is missing "
              f"or lists no face, e.g. {dropped[0]}", file=sys.stderr)
    return prepare_from_files(dest, items, img_size, "ffhq", "age", name=decade_name,
                              skip_bad=skip_bad, root=os.path.abspath(root),
                              dropped_without_face=len(dropped))


def read_identities(path):
    """(image name, identity string) pairs of a CelebA identity file ("000001.jpg 2295" lines)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 2:
                raise UserError(f"{path}:{line_no}: expected 'IMAGE_NAME IDENTITY', "
                                f"got {line.strip()!r}")
            pairs.append((tokens[0], tokens[1]))
    if not pairs:
        raise UserError(f"identity file {path!r} lists no images")
    return pairs


def prepare_celeba_identities(root, identities, dest, crop_size=128, img_size=128,
                              n_identities=None, seed=0, skip_bad=False):
    """CelebA aligned faces labelled by identity: fixed center crop, then resize."""
    require_dir(root, "CelebA images (img_align_celeba)")
    require_file(identities, "CelebA identity list (identity_CelebA.txt)")
    # the list names .jpg files; the folder may hold the .png release: match by stem
    by_stem = {}
    for path in list_images(root):
        by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], path)
    pairs = read_identities(identities)
    items = [(by_stem.get(os.path.splitext(n)[0], os.path.join(root, n)), ident, None)
             for n, ident in pairs]
    if n_identities is not None:
        # sorted ids and a seeded choice, so a subset is the same on every run (seed bug B9 #1)
        distinct = sorted({ident for _, ident in pairs}, key=label_sort_key)
        if not 0 < n_identities <= len(distinct):
            raise UserError(f"--n_identities must be between 1 and {len(distinct)}, "
                            f"the number of identities in {identities!r}")
        picked = np.random.default_rng(seed).choice(len(distinct), n_identities, replace=False)
        chosen = {distinct[i] for i in picked}
        items = [item for item in items if item[1] in chosen]
    return prepare_from_files(dest, items, img_size, "celeba", "identity", skip_bad=skip_bad,
                              crop=crop_size, root=os.path.abspath(root), crop_size=crop_size,
                              n_identities=n_identities, seed=seed)


def folder_items(folder):
    """(path, label) items of FOLDER/<label>/<image>, labels being the sorted subfolder names."""
    labels = sorted((n for n in os.listdir(folder)
                     if not n.startswith(".") and os.path.isdir(os.path.join(folder, n))),
                    key=natural_key)
    if not labels:
        raise UserError(f"{folder!r} has no subfolders; expected one subfolder of images per label")
    items = [(path, label, None) for label in labels
             for path in list_images(os.path.join(folder, label), key=natural_key)]
    if not items:
        raise UserError(f"the label subfolders of {folder!r} hold no images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return items


def prepare_afhq(root, dest, split="train", img_size=256, skip_bad=False):
    """AFHQ labelled by domain (the sorted folders of SPLIT/, e.g. cat, dog, wild)."""
    require_dir(root, "AFHQ root")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        found = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
        choices = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise UserError(f"AFHQ split folder {split_dir!r} does not exist; "
                        f"--split can be one of: {choices or 'nothing (no subfolders)'}")
    return prepare_from_files(dest, folder_items(split_dir), img_size, "afhq", "domain",
                              skip_bad=skip_bad, root=os.path.abspath(root), split=split)


def part_masks(mask_dir, part):
    """Map 5-digit image id -> path of its `part` mask in CelebAMask-HQ-mask-anno/*/ID_PART.png."""
    masks = {}
    for sub in sorted(os.listdir(mask_dir)):
        sub_dir = os.path.join(mask_dir, sub)
        if os.path.isdir(sub_dir):
            for n in os.listdir(sub_dir):
                image_id, _, rest = n.partition("_")
                if rest == f"{part}.png":
                    masks[image_id] = os.path.join(sub_dir, n)
    if not masks:
        raise UserError(f"no *_{part}.png masks under {mask_dir!r}; check --part "
                        "(e.g. hair, skin, hat, l_brow)")
    return masks


def prepare_celebahq(root, dest, part="hair", img_size=256, skip_bad=False):
    """CelebA-HQ labelled by gender (attribute Male), with part masks (zeros where none)."""
    require_dir(root, "CelebA-HQ root")
    anno = os.path.join(root, "CelebAMask-HQ")
    img_dir = os.path.join(root, "imgs")
    if not os.path.isdir(img_dir):
        img_dir = require_dir(os.path.join(anno, "CelebA-HQ-img"),
                              f"CelebA-HQ images (neither {img_dir!r} nor this)")
    attr_path = require_file(os.path.join(anno, "CelebAMask-HQ-attribute-anno.txt"),
                             "CelebAMask-HQ attributes")
    masks = part_masks(require_dir(os.path.join(anno, "CelebAMask-HQ-mask-anno"),
                                   "CelebAMask-HQ masks"), part)
    male = {os.path.splitext(name)[0]: values.get("Male")
            for name, values in read_attributes(attr_path)}
    if None in male.values():
        raise UserError(f"{attr_path!r} has no 'Male' column")
    paths = list_images(img_dir, key=natural_key)
    if not paths:
        raise UserError(f"no images in {img_dir!r}")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    unlisted = [p for p, s in zip(paths, stems) if s not in male]
    if unlisted:
        raise UserError(f"{len(unlisted)} images have no row in {attr_path!r}, e.g. {unlisted[0]}")
    items = [(p, int(male[s] == 1), masks.get(f"{int(s):05d}" if s.isdigit() else s))
             for p, s in zip(paths, stems)]
    return prepare_from_files(dest, items, img_size, "celebahq", "gender",
                              name=lambda v: ("female", "male")[v], skip_bad=skip_bad,
                              with_masks=True, root=os.path.abspath(root), mask_part=part,
                              images_without_mask=sum(m is None for _, _, m in items))


def csv_items(csv_path):
    """(path, label) items of a CSV of path,label lines; relative paths start at its folder."""
    base = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), 1) if any(c.strip() for c in row)]
    items = []
    for row_index, (line_no, row) in enumerate(rows):
        if len(row) != 2:
            raise UserError(f"{csv_path}:{line_no}: expected 'path,label', got {','.join(row)!r}")
        path, label = os.path.join(base, row[0].strip()), row[1].strip()
        header = not os.path.isfile(path) and not path.lower().endswith(IMAGE_EXTENSIONS)
        if row_index == 0 and header:
            continue
        if not label:
            raise UserError(f"{csv_path}:{line_no}: the label is empty")
        items.append((path, label, None))
    if not items:
        raise UserError(f"{csv_path!r} lists no images")
    return items


def prepare_labeled(dest, root=None, csv_path=None, img_size=64, skip_bad=False):
    """Any labelled images: DIR/<label>/<image> under --root, or --csv lines of path,label."""
    if (root is None) == (csv_path is None):
        raise UserError("give exactly one of --root (one subfolder per label) or --csv "
                        "(path,label lines)")
    if csv_path is not None:
        items = csv_items(require_file(csv_path, "--csv"))
        origin = dict(csv=os.path.abspath(csv_path))
    else:
        items = folder_items(require_dir(root, "--root"))
        origin = dict(root=os.path.abspath(root))
    return prepare_from_files(dest, items, img_size, "labeled", "label", skip_bad=skip_bad,
                              **origin)


# ------------------------------------------------------------------------------------------------
# OverLORD: the synthetic labelled demo (faces labelled by hair colour, with hair masks)

HAIR_NAMES = {"black": 0, "brown": 1, "blonde": 2, "red": 3, "grey": 4}  # -> HAIR_COLOURS index
DEMO_HAIR = {"black": 0, "blonde": 2, "red": 3}  # the demo's labels by default (name -> index)
DEMO_VERSION = 1  # bump when the drawing changes, so stale demo folders are redrawn


def draw_demo_face(seed, index, size, glasses, hair, with_mask=True):
    """Face `index` of the demo with the given hair colour, and its hair mask (or None)."""
    img = draw_face(np.random.default_rng([seed, index]), size, glasses=glasses, hair=hair)
    if not with_mask:
        return img, None
    # the same random stream with a contrasting hair colour differs exactly where hair shows;
    # the difference scales with the hair's coverage of each pixel, so half the full gap is 50%
    other = 2 if hair == 0 else 0
    reference = draw_face(np.random.default_rng([seed, index]), size, glasses=glasses, hair=other)
    gap = np.abs(img.astype(np.int16) - reference).max(axis=2)
    full = np.abs(np.subtract(HAIR_COLOURS[hair], HAIR_COLOURS[other])).max()
    return img, (2 * gap >= full).astype(np.uint8)


def demo_hair(hair):
    """The labelled demo's labels, name -> HAIR_COLOURS index, from names ('black,red' or a
    sequence); None = DEMO_HAIR."""
    if hair is None:
        return dict(DEMO_HAIR)
    names = [h.strip() for h in hair.split(",")] if isinstance(hair, str) else list(hair)
    unknown = [h for h in names if h not in HAIR_NAMES]
    if unknown or len(set(names)) != len(names) or len(names) < 2:
        raise UserError(f"--hair {','.join(names)}: give two or more different colours of "
                        f"{', '.join(HAIR_NAMES)}, separated by commas")
    return {h: HAIR_NAMES[h] for h in names}


def make_demo_labeled(dest, n=512, size=64, seed=0, masks=True, hair=None):
    """Synthetic faces labelled by hair colour (default: black, blonde, red) with hair masks;
    reused if they match."""
    colours = demo_hair(hair)
    settings = dict(n=n, size=size, seed=seed, masks=masks, version=DEMO_VERSION)
    if colours != DEMO_HAIR:  # the default's settings stay as before, so old folders are reused
        settings["hair"] = list(colours)
    try:
        if load_prepared(dest).meta.get("demo") == settings:
            return dest
    except UserError:
        pass  # absent, incomplete or different: (re)draw it
    if n < len(colours):
        raise UserError(f"the demo needs at least {len(colours)} images (one per hair colour)")
    names = list(colours)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(names))  # balanced labels
    glasses = rng.random(n) < 0.5  # an unlabelled attribute the per-image code must carry
    with PreparedWriter(dest, n, size, with_masks=masks) as writer:
        for i in tqdm(range(n), desc="drawing demo faces", unit="img"):
            img, mask = draw_demo_face(seed, i, size, bool(glasses[i]), colours[names[labels[i]]],
                                       with_mask=masks)
            writer.add(img, int(labels[i]), mask)
        return writer.finish("demo", "hair_colour", name=lambda k: names[k], demo=settings)


# ------------------------------------------------------------------------------------------------
# OverLORD: loading a prepared folder, augmentation, the Dataset

class Prepared:
    """A validated prepared dataset; images and masks are memory-mapped, lazily in each process."""

    def __init__(self, folder):
        self.folder, self._images, self._masks = folder, None, None
        if not os.path.isdir(folder):
            raise UserError(f"no prepared dataset at {folder!r} (no such folder); create one with "
                            f"`python data.py SOURCE ... --dest {folder}` (python data.py -h)")
        interrupted = any(n.endswith(PARTIAL) for n in os.listdir(folder))
        for n in ("images.npy", "labels.npy", "label_names.json", "meta.json"):
            if not os.path.isfile(os.path.join(folder, n)):
                hint = ("its preparation was interrupted; run it again"
                        if interrupted or n == "meta.json" else "is it a prepared dataset?")
                raise UserError(f"{folder!r} has no {n}: {hint}")
        self.meta = self.read_json("meta.json")
        if not isinstance(self.meta, dict):
            raise UserError(f"{self.path('meta.json')!r} is not a JSON object")
        self.label_names = self.read_json("label_names.json")
        if not (isinstance(self.label_names, list) and self.label_names
                and all(isinstance(n, str) for n in self.label_names)):
            raise UserError(f"{self.path('label_names.json')!r} is not a non-empty list of strings")
        n, size = self.validate_images()
        self.labels = self.validate_labels(n)
        has_masks = os.path.isfile(self.path("masks.npy"))
        if self.meta.get("has_masks") and not has_masks:
            raise UserError(f"{folder!r} has no masks.npy, but its meta.json says it has masks")
        if has_masks:
            self.validate_masks(n, size)

    def path(self, name):
        """Path of file `name` of this dataset."""
        return os.path.join(self.folder, name)

    def read_json(self, name):
        """Parse one of the JSON files; UserError if it is unreadable."""
        try:
            with open(self.path(name), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {self.path(name)!r}: {e}") from None

    def open_array(self, name):
        """np.load one .npy file memory-mapped; UserError if it is unreadable."""
        try:
            return np.load(self.path(name), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {self.path(name)!r}: {e}") from None

    def validate_images(self):
        """Check images.npy is uint8 N x H x W x 3 and agrees with meta.json; gives (N, (H, W))."""
        images = self.images
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise UserError(f"{self.path('images.npy')!r} holds {images.dtype} {images.shape}; "
                            "expected uint8 N x H x W x 3")
        if self.meta.get("count", len(images)) != len(images):
            raise UserError(f"{self.path('images.npy')!r} holds {len(images)} images but meta.json "
                            f"says {self.meta['count']}")
        return len(images), images.shape[1:3]

    def validate_labels(self, n):
        """Load labels.npy as int64 and check its count and its range 0..K-1."""
        labels = np.array(self.open_array("labels.npy"))
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise UserError(f"{self.path('labels.npy')!r} holds {labels.dtype} {labels.shape}; "
                            "expected a 1-D integer array")
        if len(labels) != n:
            raise UserError(f"{self.path('labels.npy')!r} holds {len(labels)} labels but "
                            f"images.npy holds {n} images")
        k = len(self.label_names)
        if n and (labels.min() < 0 or labels.max() >= k):
            raise UserError(f"{self.path('labels.npy')!r} has labels {labels.min()}.."
                            f"{labels.max()} outside 0..{k - 1} (label_names.json names {k})")
        return labels.astype(np.int64)

    def validate_masks(self, n, size):
        """Check masks.npy is uint8 N x H x W matching the images."""
        masks = self.masks
        if masks.dtype != np.uint8 or masks.ndim != 3:
            raise UserError(f"{self.path('masks.npy')!r} holds {masks.dtype} {masks.shape}; "
                            "expected uint8 N x H x W")
        if len(masks) != n:
            raise UserError(f"{self.path('masks.npy')!r} holds {len(masks)} masks but images.npy "
                            f"holds {n} images")
        if masks.shape[1:] != size:
            raise UserError(f"{self.path('masks.npy')!r} masks are {masks.shape[2]}x"
                            f"{masks.shape[1]} but the images are {size[1]}x{size[0]}")

    @property
    def images(self):
        """uint8 (N, H, W, 3) memory map."""
        if self._images is None:
            self._images = self.open_array("images.npy")
        return self._images

    @property
    def masks(self):
        """uint8 (N, H, W) memory map, or None when the dataset has no masks."""
        if self._masks is None and os.path.isfile(self.path("masks.npy")):
            self._masks = self.open_array("masks.npy")
        return self._masks

    @property
    def image_size(self):
        """Side S of the (square) images."""
        return self.images.shape[1]

    @property
    def n_labels(self):
        """Number of labels K."""
        return len(self.label_names)

    def __len__(self):
        return len(self.labels)

    def config_fields(self):
        """The fields training derives from the data (SPEC B2): img_shape, n_imgs, n_labels,
        and the preparation's framing (input_crop px of a shorter side of input_crop_of px;
        0 = the largest central square), which manipulation applies to new images."""
        return dict(img_shape=list(self.images.shape[1:]), n_imgs=len(self), n_labels=self.n_labels,
                    input_crop=int(self.meta.get("crop") or 0),
                    input_crop_of=self.meta.get("crop_of"))

    def __getstate__(self):
        # memory maps are reopened in each DataLoader worker rather than pickled (copied) whole
        return dict(self.__dict__, _images=None, _masks=None)


def load_prepared(folder):
    """Open and validate a prepared dataset folder; UserError with one clear line if it is bad."""
    return Prepared(folder)


class CorrelationAugment:
    """The view the correlated encoder sees (SPEC B1): random square crop, rotation, h-flip."""

    def __init__(self, size, scale, rotation=0.0, flip_horizontal=True):
        from torchvision.transforms import v2
        steps = [v2.RandomResizedCrop(size, scale=tuple(scale), ratio=(1.0, 1.0), antialias=True)]
        if rotation:
            steps.append(v2.RandomRotation(rotation))
        if flip_horizontal:
            steps.append(v2.RandomHorizontalFlip(0.5))
        self.transform = v2.Compose(steps)

    def __call__(self, img, seed=None):
        """Augment a (3, H, W) float image in [0, 1]; draws from `seed` alone if given."""
        if seed is None:  # torch's global CPU generator (seeded per DataLoader worker)
            return self.transform(img).clamp_(0.0, 1.0)
        import torch
        # torchvision draws from the global CPU generator: seed it in a fork that is undone after;
        # default_generator rather than torch.manual_seed, which would reseed the GPUs too
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            return self(img)


class LabelledImages:
    """Samples of a prepared dataset: img (3,H,W) in [0,1], label, index; optional views (B1)."""

    def __init__(self, prepared, augment=None, with_masks=False):
        self.data = prepared if isinstance(prepared, Prepared) else load_prepared(prepared)
        if with_masks and self.data.masks is None:
            raise UserError(f"{self.data.folder!r} has no masks.npy, which the localized "
                            "correlation needs; prepare it with masks (e.g. celebahq --part hair)")
        if isinstance(augment, dict):
            augment = CorrelationAugment(self.data.image_size, **augment)
        self.augment, self.with_masks = augment, with_masks

    def __len__(self):
        return len(self.data)

    def __getitem__(self, item):
        """Sample `item` = index, or (index, seed) to draw the augmentation from that seed alone."""
        import torch
        index, seed = item if isinstance(item, (tuple, list)) else (item, None)
        index = int(index)
        img = to_tensor(self.data.images[index], signed=False)  # (3, H, W), a copy of the row
        sample = dict(img=img, label=torch.tensor(self.data.labels[index], dtype=torch.int64),
                      index=torch.tensor(index, dtype=torch.int64))
        view = img
        if self.with_masks:
            mask = torch.from_numpy(np.array(self.data.masks[index]) > 0).float()[None]  # (1, H, W)
            view = sample["img_masked"] = img * mask  # masked before augmentation (localized)
            sample["mask"] = mask
        if self.augment is not None:
            sample["img_augmented"] = self.augment(view, None if seed is None else int(seed))
        return sample


# ------------------------------------------------------------------------------------------------
# Command line: one subcommand per source; an OverLORD preparer's flag defaults come from its
# signature

SKIP_BAD_HELP = "leave out missing or undecodable images instead of stopping"


def add_flag(parser, function, name, flag=None, **kwargs):
    """Add the flag of `function`'s parameter `name`; its default comes from the signature."""
    default = inspect.signature(function).parameters[name].default
    if default is inspect.Parameter.empty:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
        if default is not None and not isinstance(default, bool):
            kwargs["help"] += " (default: %(default)s)"
    parser.add_argument(flag or f"--{name}", dest=name, **kwargs)


def add_celeba_arguments(p):
    p.add_argument("--root", required=True, help="CelebA image folder (img_align_celeba)")
    p.add_argument("--dest", help=f"output folder (with --attributes: {CELEBA_DOMAINS_DEST} if not "
                   "given; with --identities: required)")
    cd = p.add_argument_group("CD two-domain split (list files)")
    cd.add_argument("--attributes", help="path of list_attr_celeba.txt")
    cd.add_argument("--attr", default="", help="attribute name (e.g. Bald, Eyeglasses) or a "
                    "preset: glasses, mouth, beard; overrides --custom")
    cd.add_argument("--custom", type=int, default=5, help="1-based attribute column (5 = Bald)")
    cd.add_argument("--num_test_imgs", type=int, default=64, help="test images per domain")
    ol = p.add_argument_group("OverLORD identity-labelled set (prepared folder)")
    ol.add_argument("--identities", help="path of identity_CelebA.txt ('IMAGE ID' lines)")
    add_flag(ol, prepare_celeba_identities, "crop_size", type=int, help="side of the center crop")
    add_flag(ol, prepare_celeba_identities, "img_size", type=int, help="output image side")
    add_flag(ol, prepare_celeba_identities, "n_identities", type=int,
             help="keep a random subset of this many identities (all if not given)")
    add_flag(ol, prepare_celeba_identities, "seed", type=int,
             help="seed of the --n_identities subset")
    add_flag(ol, prepare_celeba_identities, "skip_bad", action="store_true", help=SKIP_BAD_HELP)


def add_folders_arguments(p):
    p.add_argument("--root", required=True, help="folder with trainA/ trainB/ testA/ testB/")
    p.add_argument("--dest", required=True, help="output folder for the four list files")


def add_demo_arguments(p):
    p.add_argument("--dest", default="./demo_data", help="output folder")
    p.add_argument("--n_train", type=int, default=2000, help="training images per domain")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--ground_truth", action="store_true", help="also draw the perfect transfers "
                   "and removals of the first test images, and their masks, into "
                   "DEST/ground_truth (eval.py --ground_truth scores against them)")


def make_demo_command(args):
    """data.py demo: the two-domain demo set, and with --ground_truth its ground truth."""
    print(make_demo(args.dest, args.n_train, size=args.size))
    if args.ground_truth:
        from ground_truth import write_ground_truth
        print(write_ground_truth(args.dest, args.n_train, size=args.size))


def add_ffhq_arguments(p):
    add_flag(p, prepare_ffhq, "root", help="folder with imgs/*.png and features/NNNNN.json")
    add_flag(p, prepare_ffhq, "img_size", type=int, help="output image side")


def add_afhq_arguments(p):
    add_flag(p, prepare_afhq, "root", help="AFHQ folder holding SPLIT/<domain>/*")
    add_flag(p, prepare_afhq, "split", help="split subfolder: train, test or val")
    add_flag(p, prepare_afhq, "img_size", type=int, help="output image side")


def add_celebahq_arguments(p):
    add_flag(p, prepare_celebahq, "root",
             help="folder with imgs/<id>.jpg and CelebAMask-HQ/ (attributes, mask-anno)")
    add_flag(p, prepare_celebahq, "part", help="mask part name, as in ID_PART.png")
    add_flag(p, prepare_celebahq, "img_size", type=int, help="output image side")


def add_labeled_arguments(p):
    add_flag(p, prepare_labeled, "root", help="folder with one subfolder of images per label")
    add_flag(p, prepare_labeled, "csv_path", flag="--csv",
             help="instead of --root: CSV of path,label lines (paths relative to the CSV)")
    add_flag(p, prepare_labeled, "img_size", type=int, help="output image side")


def add_demo_labeled_arguments(p):
    add_flag(p, make_demo_labeled, "n", type=int, help="number of faces")
    add_flag(p, make_demo_labeled, "size", type=int, help="image side")
    add_flag(p, make_demo_labeled, "seed", type=int, help="drawing seed")
    add_flag(p, make_demo_labeled, "masks", action=argparse.BooleanOptionalAction,
             help="also write hair masks (for the localized correlation)")
    add_flag(p, make_demo_labeled, "hair", help="the labels: hair colours separated by commas, "
             f"of {', '.join(HAIR_NAMES)} (default: {','.join(DEMO_HAIR)})")
    p.add_argument("--ground_truth", action="store_true", help="also draw held-out faces with "
                   "every hair colour into DEST/ground_truth (eval.py --ground_truth scores an "
                   "OverLORD model's translations against them)")


def make_demo_labeled_command(args):
    """data.py demo_labeled: the labelled demo set, and with --ground_truth its ground truth."""
    run_labelled(make_demo_labeled, args)
    if args.ground_truth:
        from ground_truth import write_overlord_ground_truth
        print(write_overlord_ground_truth(args.dest, args.size, args.seed, hair=args.hair))


def run_labelled(prepare, args):
    """Call an OverLORD preparer with the flags that belong to it; print what it wrote."""
    params = inspect.signature(prepare).parameters
    data = load_prepared(prepare(**{k: v for k, v in vars(args).items() if k in params}))
    print(f"{data.folder}: {len(data)} images of {data.image_size} px, {data.n_labels} labels "
          f"({data.meta['label_attribute']})" + (", with masks" if data.masks is not None else ""))


def labelled_preparer(prepare, add_arguments):
    """The PREPARERS entry of an OverLORD preparer: its flags, plus --dest and --skip_bad."""
    def add_all(p):
        add_arguments(p)
        add_flag(p, prepare, "dest", help="output folder (a new, empty or prepared one)")
        if "skip_bad" in inspect.signature(prepare).parameters:
            add_flag(p, prepare, "skip_bad", action="store_true", help=SKIP_BAD_HELP)
    return prepare.__doc__, add_all, lambda args: run_labelled(prepare, args)


def prepare_celeba(args):
    """CelebA: --attributes splits two CD domains; --identities prepares OverLORD identities."""
    if (args.attributes is None) == (args.identities is None):
        raise UserError("celeba needs exactly one of --attributes list_attr_celeba.txt (the CD "
                        "two-domain split) or --identities identity_CelebA.txt (the OverLORD "
                        "identity-labelled set)")
    if args.attributes is not None:
        prepare_celeba_domains(args)
    elif not args.dest:
        raise UserError("celeba --identities needs --dest, the folder to write the prepared set to")
    else:
        run_labelled(prepare_celeba_identities, args)


def align_faces(args):
    """Faces in photos aligned as FFHQ or CelebA were (dlib; requirements-align.txt)."""
    import face_align  # imported here, not at the top: face_align builds on this module
    face_align.run_align(args)


def add_align_arguments(p):
    import face_align
    face_align.add_align_arguments(p)


# subcommand -> (what it does, adds its flags, runs it)
PREPARERS = {
    "celeba": (prepare_celeba.__doc__, add_celeba_arguments, prepare_celeba),
    "folders": (prepare_folders.__doc__, add_folders_arguments, prepare_folders),
    "demo": (make_demo.__doc__, add_demo_arguments, lambda a: make_demo_command(a)),
    "ffhq": labelled_preparer(prepare_ffhq, add_ffhq_arguments),
    "afhq": labelled_preparer(prepare_afhq, add_afhq_arguments),
    "celebahq": labelled_preparer(prepare_celebahq, add_celebahq_arguments),
    "labeled": labelled_preparer(prepare_labeled, add_labeled_arguments),
    "demo_labeled": (*labelled_preparer(make_demo_labeled, add_demo_labeled_arguments)[:2],
                     make_demo_labeled_command),
    "align": (align_faces.__doc__, add_align_arguments, align_faces),
}


def make_parser():
    """The argument parser: one subcommand per PREPARERS entry."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="DATASET")
    for name, (doc, add_arguments, _) in PREPARERS.items():
        add_arguments(sub.add_parser(name, help=doc.splitlines()[0], allow_abbrev=False))
    return parser


def main(argv=None):
    """Prepare the dataset the command line names."""
    args = make_parser().parse_args(argv)
    PREPARERS[args.command][2](args)


if __name__ == "__main__":
    from utils import run_cli
    run_cli(main)
