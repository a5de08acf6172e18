"""Data: image decoding, list-file datasets, the synthetic demo set and dataset preparation.

Preparation from the command line:
    python data.py celeba --root img_align_celeba --attributes list_attr_celeba.txt --dest ./bald --attr Bald
    python data.py folders --root DIR --dest ./mydata      # DIR/trainA, trainB, testA, testB
    python data.py demo --dest ./demo_data                 # the synthetic faces train.py uses without --root
"""
import os

import cv2
import numpy as np

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
    data = np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None
    if data is None or data.size == 0:
        return None
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    return None if img is None else to_rgb_uint8(img)


def write_image(path, rgb):
    """Write HxWx3 uint8 RGB to `path` (format from the extension); UserError if it cannot."""
    ok, buf = cv2.imencode(os.path.splitext(path)[1] or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise UserError(f"cannot encode an image as {path!r} (unknown extension?)")
    try:
        buf.tofile(path)
    except OSError as e:
        raise UserError(f"cannot write {path!r}: {e.strerror}") from None


# ------------------------------------------------------------------------------------------------
# Synthetic faces (the demo data of both methods)

SKIN_TONES = ((255, 224, 196), (234, 192, 160), (198, 148, 112), (141, 98, 70), (250, 210, 180))
HAIR_COLOURS = ((40, 30, 25), (110, 70, 40), (220, 190, 110), (170, 70, 40), (150, 150, 150))
GLASSES_COLOURS = ((20, 20, 20), (200, 30, 30), (30, 60, 200), (20, 150, 60))


def draw_face(rng, size=64, glasses=False, hair=None):
    """Draw a cartoon face (HxWx3 uint8 RGB); `glasses` adds the accessory of domain A.

    Pose, skin, hair, background and expression vary with `rng` (a numpy Generator); `hair`
    forces one of HAIR_COLOURS by index. Drawn at 4x and shrunk for anti-aliased edges.
    """
    s = 4 * size
    u = s / 64.0  # drawing unit: coordinates below are in a 64-px frame

    def pt(x, y):
        return int(round(x * u)), int(round(y * u))

    top, bottom = rng.integers(120, 256, 3), rng.integers(60, 220, 3)
    ramp = np.linspace(0.0, 1.0, s)[:, None, None]
    img = np.ascontiguousarray((top * (1 - ramp) + bottom * ramp).repeat(s, 1).astype(np.uint8))
    cx, cy = 32 + rng.uniform(-2.5, 2.5), 35 + rng.uniform(-2.0, 2.0)
    fw, fh = rng.uniform(14, 17), rng.uniform(18, 21)
    skin = tuple(int(c) for c in SKIN_TONES[rng.integers(len(SKIN_TONES))])
    hair_colour = tuple(int(c) for c in HAIR_COLOURS[rng.integers(len(HAIR_COLOURS)) if hair is None
                                                     else hair])
    cv2.ellipse(img, pt(cx, cy - 4), pt(fw + 3, fh + 2), 0, 180, 360, hair_colour, -1, cv2.LINE_AA)
    cv2.ellipse(img, pt(cx, cy), pt(fw, fh), 0, 0, 360, skin, -1, cv2.LINE_AA)
    cv2.ellipse(img, pt(cx, cy - fh + 4), pt(fw + 1, rng.uniform(4, 8)), 0, 180, 360, hair_colour,
                -1, cv2.LINE_AA)
    eye_y, eye_dx = cy - 3 + rng.uniform(-1, 1), rng.uniform(6, 7.5)
    for side in (-1, 1):
        cv2.circle(img, pt(cx + side * eye_dx, eye_y), int(1.6 * u), (30, 30, 40), -1, cv2.LINE_AA)
    cv2.line(img, pt(cx, eye_y + 2), pt(cx - 1, eye_y + 7), tuple(int(c * 0.8) for c in skin),
             max(1, int(0.8 * u)), cv2.LINE_AA)
    smile = rng.uniform(0.5, 3.0)
    cv2.ellipse(img, pt(cx, cy + 9), pt(rng.uniform(3.5, 6), smile), 0, 0, 180, (150, 40, 50),
                max(1, int(u)), cv2.LINE_AA)
    if glasses:
        colour = tuple(int(c) for c in GLASSES_COLOURS[rng.integers(len(GLASSES_COLOURS))])
        lens = rng.uniform(3.5, 4.5)
        for side in (-1, 1):
            cv2.circle(img, pt(cx + side * eye_dx, eye_y), int(lens * u), colour, -1, cv2.LINE_AA)
        cv2.line(img, pt(cx - eye_dx + lens, eye_y), pt(cx + eye_dx - lens, eye_y), colour,
                 max(1, int(1.2 * u)), cv2.LINE_AA)
        for side in (-1, 1):
            cv2.line(img, pt(cx + side * (eye_dx + lens), eye_y),
                     pt(cx + side * (fw + 0.5), eye_y - 1), colour, max(1, int(u)), cv2.LINE_AA)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


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


def list_images(folder):
    """Sorted image files directly inside `folder`."""
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.lower().endswith(IMAGE_EXTENSIONS))


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


def center_crop(img, crop):
    """Central crop x crop square (crop 0 = the largest central square)."""
    h, w = img.shape[:2]
    crop = crop or min(h, w)
    top, left = (h - crop) // 2, (w - crop) // 2
    return img[top:top + crop, left:left + crop]


def resize_square(img, side):
    """Resize a square image; area interpolation when shrinking (close to PIL's antialiasing)."""
    if img.shape[0] == side and img.shape[1] == side:
        return img
    shrink = img.shape[0] > side
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def to_tensor(rgb):
    """HxWx3 uint8 -> 3xHxW float tensor in [-1, 1]."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(127.5).sub_(1)


def preprocess(rgb, crop, resize):
    """The CD transform without the flip: center crop, resize, [-1, 1] tensor."""
    return to_tensor(resize_square(center_crop(rgb, crop), resize))


def _inspect(path, crop):
    img = read_image(path)
    if img is None:
        return "bad", None
    return ("small", img.shape[:2]) if crop and min(img.shape[:2]) < crop else ("ok", None)


def check_images(paths, crop, name, skip_bad=False, workers=4):
    """Decode every image once; raise a UserError naming the unreadable or too-small ones, or
    drop them with a warning when `skip_bad`. Returns the usable paths."""
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(tqdm(pool.map(lambda p: _inspect(p, crop), paths, chunksize=64),
                            total=len(paths), desc=f"checking {name}", leave=False,
                            disable=len(paths) < 2000))
    bad = [p for p, (status, _) in zip(paths, results) if status == "bad"]
    small = [(p, size) for p, (status, size) in zip(paths, results) if status == "small"]
    problems = []
    if bad:
        problems.append(f"{len(bad)} of {len(paths)} images in {name} are missing or cannot be "
                        f"decoded (e.g. {', '.join(bad[:3])})")
    if small:
        (p, (h, w)) = small[0]
        problems.append(f"{len(small)} of {len(paths)} images in {name} are smaller than --crop "
                        f"{crop} (e.g. {p} is {w}x{h}; use a smaller --crop, or --crop 0 for the "
                        f"largest central square)")
    if not problems:
        return paths
    if not skip_bad:
        raise UserError("; ".join(problems) + "; pass --skip_bad to train without them")
    import sys
    print("warning: " + "; ".join(problems) + "; skipped (--skip_bad)", file=sys.stderr)
    drop = set(bad) | {p for p, _ in small}
    kept = [p for p in paths if p not in drop]
    if not kept:
        raise UserError(f"no usable image left in {name}")
    return kept


class ImageFiles:
    """Dataset over image files; an item is asked for as (index, flip) so that the sampler, not a
    worker's random state, decides the flip (which makes resumed runs exact)."""

    def __init__(self, paths, crop, resize):
        self.paths, self.crop, self.resize = list(paths), crop, resize

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, flip = item
        img = read_image(self.paths[index])
        if img is None:
            raise UserError(f"cannot decode {self.paths[index]} (it changed after the start?)")
        img = resize_square(center_crop(img, self.crop), self.resize)
        return to_tensor(img[:, ::-1] if flip else img)

    def batch(self, indices):
        """A (len(indices), 3, R, R) tensor of un-flipped images, for grids."""
        import torch
        return torch.stack([self[(i, False)] for i in indices])


class EndlessBatches:
    """Batches of (index, flip) forever: epoch e is a permutation drawn from (seed, e), the short
    tail is dropped, and `start` batches are skipped, so a run can resume mid-epoch exactly."""

    def __init__(self, n, batch_size, seed, start=0):
        if n < batch_size:
            raise ValueError(f"{n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start

    def __iter__(self):
        per_epoch = self.n // self.batch_size
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order, flips = rng.permutation(self.n), rng.random(self.n) < 0.5
            for b in range(offset, per_epoch):
                chunk = order[b * self.batch_size:(b + 1) * self.batch_size]
                yield [(int(i), bool(flips[i])) for i in chunk]
            epoch, offset = epoch + 1, 0


def _worker_init(_):
    cv2.setNumThreads(1)


def endless_loader(dataset, batch_size, seed, start, workers, pin_memory=False):
    """One persistent DataLoader per domain, yielding batches forever from batch `start` on."""
    from torch.utils.data import DataLoader
    loader = DataLoader(dataset, batch_sampler=EndlessBatches(len(dataset), batch_size, seed, start),
                        num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=pin_memory, worker_init_fn=_worker_init)
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
    from tqdm import tqdm
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


def prepare_celeba(args):
    """Split CelebA by an attribute into A (has it) and B; the first num_test_imgs of each are test."""
    if not os.path.isfile(args.attributes):
        raise UserError(f"--attributes {args.attributes!r}: no such file (list_attr_celeba.txt)")
    if not os.path.isdir(args.root):
        raise UserError(f"--root {args.root!r}: no such folder (img_align_celeba)")
    rule = celeba_rule(args.attr if args.attr else args.custom)
    with open(args.attributes, encoding="utf-8") as f:
        lines = f.read().splitlines()
    names = lines[1].split()
    domains = {"A": [], "B": []}
    for line in lines[2:]:
        tokens = line.split()
        if len(tokens) != len(names) + 1:
            continue
        domain = rule(dict(zip(names, map(int, tokens[1:]))))
        if domain:
            domains[domain].append(os.path.join(args.root, tokens[0]))
    n = args.num_test_imgs
    splits = {"trainA": domains["A"][n:], "testA": domains["A"][:n],
              "trainB": domains["B"][n:], "testB": domains["B"][:n]}
    for split, paths in splits.items():
        if not paths:
            raise UserError(f"{split} would be empty: the attribute splits too few images")
    write_splits(args.dest, splits)


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


def add_celeba_arguments(p):
    p.add_argument("--root", required=True, help="CelebA image folder (img_align_celeba)")
    p.add_argument("--attributes", required=True, help="path of list_attr_celeba.txt")
    p.add_argument("--dest", default="./bald", help="output folder for the four list files")
    p.add_argument("--attr", default="", help="attribute name (e.g. Bald, Eyeglasses) or a "
                   "preset: glasses, mouth, beard; overrides --custom")
    p.add_argument("--custom", type=int, default=5, help="1-based attribute column (5 = Bald)")
    p.add_argument("--num_test_imgs", type=int, default=64, help="test images per domain")


def add_folders_arguments(p):
    p.add_argument("--root", required=True, help="folder with trainA/ trainB/ testA/ testB/")
    p.add_argument("--dest", required=True, help="output folder for the four list files")


def add_demo_arguments(p):
    p.add_argument("--dest", default="./demo_data", help="output folder")
    p.add_argument("--n_train", type=int, default=2000, help="training images per domain")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")


# subcommand -> (what it does, adds its flags, runs it)
PREPARERS = {
    "celeba": (prepare_celeba.__doc__, add_celeba_arguments, prepare_celeba),
    "folders": (prepare_folders.__doc__, add_folders_arguments, prepare_folders),
    "demo": (make_demo.__doc__, add_demo_arguments,
             lambda a: print(make_demo(a.dest, a.n_train, size=a.size))),
}


def main():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (doc, add_arguments, run) in PREPARERS.items():
        add_arguments(sub.add_parser(name, help=doc.splitlines()[0]))
    args = parser.parse_args()
    PREPARERS[args.command][2](args)


if __name__ == "__main__":
    from utils import run_cli
    run_cli(main)
