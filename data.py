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
