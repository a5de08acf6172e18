"""Face alignment, offline: find the face, take dlib's 68 landmarks, and warp the photo the way a
face dataset was made (SPEC Part G), so that a model meets faces framed as in its training data.

    python data.py align --root photos/ --dest aligned/ --size 256 --style ffhq
    python eval.py --load RUN --img me.jpg --reference ref.jpg --output out.png --align

Styles:
- ffhq (the ffhq and celebahq models): NVlabs/ffhq-dataset's recipe (download_ffhq.py). The eye
  centres and mouth corners define an oriented square, the quad. A photo much larger than the
  quad is first shrunk by an integer factor; it is cropped to the quad plus a 10% border; where
  the quad leaves the photo, it is padded by reflection, the pad blurred and faded toward the
  median colour; then the quad is resampled bilinearly to 4096 px and area-averaged to --size
  (the recipe: PIL's Lanczos). Output: size x size.
- celeba (the celeba model and CD): the framing of CelebA's img_align_celeba, a 178 x 218 frame
  made by a similarity transform that puts the two eye centres and the mouth centre at fixed
  points (CELEBA_POINTS). Output: the whole frame, `size` wide and celeba_height(size) tall;
  size 178 (its default) is the dataset's own frame, which data.py celeba and the models' crops
  expect (OverLORD's celeba preparation keeps its central 128 x 128 pixels).

Public interface (the face metrics reuse the landmarks):
    ALIGN_INSTALL                       the line printed when dlib or its model file is missing
    FaceLandmarks(landmarks_path=None)  dlib's HOG face detector + 68-point shape predictor (the
                                        given file, else the one in face-recognition-models);
                                        UserError naming ALIGN_INSTALL or the bad path
      .detect(rgb_uint8) -> [np.ndarray (68, 2) float64 of (x, y)], largest face first, [] if none
      .shapes(rgb_uint8) -> the same faces as dlib shapes (for dlib's face-recognition network)
    shape_points(shape) -> (68, 2)      a dlib shape's points
    packaged_model(name)                path of a model file shipped in face-recognition-models
    ffhq_quad(landmarks) -> (4, 2)      the recipe's quad: top-left, bottom-left, bottom-right,
                                        top-right corners
    ffhq_transform / celeba_transform(landmarks, size) -> 2x3 affine, input pixel -> output pixel
    align_ffhq(rgb, landmarks, size) -> (size, size, 3) uint8
    align_celeba(rgb, landmarks, size) -> (celeba_height(size), size, 3) uint8
    align_image(rgb, finder, size, style) -> (aligned uint8 or None, message; '' if all went well)
    align_folder(root, dest, size, style, landmarks_path)  the `data.py align` command
    model_framing(cfg, style=None) -> (style, size)  the framing of a model's training faces
    align_jobs(jobs, cfg, style, landmarks_path)     eval.py --align
Coordinates are in pixels with pixel centres at integers (dlib's and OpenCV's convention).
"""
import importlib.util
import math
import os
import sys

import cv2
import numpy as np
from tqdm import tqdm

from data import IMAGE_EXTENSIONS, natural_key, read_image, write_image
from utils import UserError

ALIGN_INSTALL = "pip install -r requirements-align.txt"
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
STYLES = ("ffhq", "celeba")
DEFAULT_SIZES = {"ffhq": 256, "celeba": 178}  # celeba: 178 = img_align_celeba's own width
DETECT_SIDE = 1280      # faces are searched for at most this large (landmarks at full size)
DETECT_THRESHOLD = 0.3  # dlib detector score; weaker hits are mostly patterns (a mission patch)
MAX_ENLARGEMENT = 2.0   # a face blown up more than this is a blur, not a face of the dataset's kind
MIN_DETECTABLE = 80     # dlib's detector finds faces of about 80 px (40 px when upsampling)
NO_FACE = "no face found"

# dlib's 68 points: eye contours 36-41 and 42-47 (image left, image right), mouth corners 48, 54
LEFT_EYE, RIGHT_EYE, MOUTH_LEFT, MOUTH_RIGHT = slice(36, 42), slice(42, 48), 48, 54

FFHQ_TRANSFORM_SIZE = 4096  # the recipe resamples the quad at this side, then downsizes

# img_align_celeba: 178 x 218, made by a least-squares similarity that maps the eye centres and the
# mouth centre to these points: those of a MATLAB routine published as CelebA's alignment
# (align_face_celeba: (70.745, 112), (108.237, 112), (89.432, 153.514), 1-based), in 0-based
# pixels. The means of the dataset's list_landmarks_align_celeba.txt, as quoted in
# podgorskiy/ALAE's alignment script, agree to a pixel: eyes (69, 111) and (108, 111), mouth
# corners (72, 152) and (105, 152).
CELEBA_FRAME = (178, 218)  # width, height
CELEBA_POINTS = np.array([(69.745, 111.0), (107.237, 111.0), (88.432, 152.514)])


# ------------------------------------------------------------------------------------------------
# Landmarks (dlib, optional)

def packaged_model(name):
    """Path of model file `name` inside the face-recognition-models package, or UserError."""
    # found, not imported: the package's __init__ needs pkg_resources, gone from new setuptools
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the face models are not installed: {ALIGN_INSTALL} "
                        f"(or give --landmarks {PREDICTOR_FILE})")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", name)
    if not os.path.isfile(path):
        raise UserError(f"face-recognition-models has no {name}: {ALIGN_INSTALL}")
    return path


class FaceLandmarks:
    """Faces and their 68 landmarks, by dlib's HOG detector and shape predictor."""

    def __init__(self, landmarks_path=None):
        try:
            import dlib
        except ImportError:
            raise UserError(f"face alignment needs dlib: {ALIGN_INSTALL}") from None
        if landmarks_path and not os.path.isfile(landmarks_path):
            raise UserError(f"--landmarks {landmarks_path!r}: no such file")
        self.path = landmarks_path or packaged_model(PREDICTOR_FILE)
        try:
            self.predictor = dlib.shape_predictor(self.path)
        except RuntimeError:
            raise UserError(f"--landmarks {self.path!r}: not a dlib shape predictor") from None
        self.detector, self.dlib = dlib.get_frontal_face_detector(), dlib

    def faces(self, rgb):
        """dlib rectangles of the faces in `rgb`, largest first."""
        scale = min(1.0, DETECT_SIDE / max(rgb.shape[:2]))
        small = rgb if scale == 1.0 else cv2.resize(rgb, None, fx=scale, fy=scale,
                                                    interpolation=cv2.INTER_AREA)
        # upsampling finds smaller faces, but also faces in patterns: only when none was found
        for upsample in (0, 1):
            boxes, scores, _ = self.detector.run(small, upsample, DETECT_THRESHOLD)
            if len(boxes):
                break
        ranked = sorted(zip(boxes, scores), key=lambda b: (-b[0].area(), -b[1]))
        return [self.dlib.rectangle(*(int(round(v / scale)) for v in
                                      (b.left(), b.top(), b.right(), b.bottom())))
                for b, _ in ranked]

    def shapes(self, rgb):
        """dlib's 68-point shapes (full_object_detection) of the faces in HxWx3 uint8 `rgb`,
        largest first; `rgb` must be C-contiguous uint8."""
        found = []
        for box in self.faces(rgb):
            shape = self.predictor(rgb, box)
            if shape.num_parts != 68:
                raise UserError(f"--landmarks {self.path!r}: a {shape.num_parts}-point "
                                f"predictor, not dlib's 68-point {PREDICTOR_FILE}")
            found.append(shape)
        return found

    def detect(self, rgb):
        """[(68, 2) float64 (x, y) landmarks] of each face in HxWx3 uint8 `rgb`, largest first."""
        return [shape_points(shape)
                for shape in self.shapes(np.ascontiguousarray(rgb, dtype=np.uint8))]


def shape_points(shape):
    """(68, 2) float64 (x, y) points of a dlib shape."""
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# Geometry: landmarks -> transform (pure numpy, no dlib)

def eyes_and_mouth(landmarks):
    """(left eye centre, right eye centre, mouth centre) of (68, 2) landmarks (left = image
    left)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return (lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0), (lm[MOUTH_LEFT] + lm[MOUTH_RIGHT]) / 2)


def ffhq_quad(landmarks):
    """The FFHQ recipe's oriented square: (4, 2) corners top-left, bottom-left, bottom-right,
    top-right, in input pixels."""
    eye_left, eye_right, mouth = eyes_and_mouth(landmarks)
    eyes = (eye_left + eye_right) / 2
    across, down = eye_right - eye_left, mouth - eyes
    # the horizontal axis leans between the eye line and the normal of the eyes-to-mouth line
    half_width = across + np.array([down[1], -down[0]])
    half_width *= max(2.0 * np.hypot(*across), 1.8 * np.hypot(*down)) / np.hypot(*half_width)
    half_height = np.array([-half_width[1], half_width[0]])
    centre = eyes + 0.1 * down
    return np.stack([centre - half_width - half_height, centre - half_width + half_height,
                     centre + half_width + half_height, centre + half_width - half_height])


def quad_to_square(quad, side):
    """2x3 affine taking output pixels of a side x side square to input pixels of `quad`, as
    PIL's QUAD transform samples it (the quad's corners are the output's outer pixel edges)."""
    top_left, bottom_left, _, top_right = quad
    right, down = (top_right - top_left) / side, (bottom_left - top_left) / side
    return np.array([[right[0], down[0], top_left[0] + 0.5 * (right[0] + down[0])],
                     [right[1], down[1], top_left[1] + 0.5 * (right[1] + down[1])]])


def invert_affine(matrix):
    """The inverse of a 2x3 affine map."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def ffhq_transform(landmarks, size):
    """2x3 affine: input pixel -> pixel of the size x size FFHQ-aligned output."""
    return invert_affine(quad_to_square(ffhq_quad(landmarks), size))


def similarity(source, target):
    """Least-squares rotation + uniform scale + shift (no reflection) taking source to target
    points, as a 2x3 affine."""
    rows, values = [], []
    for (x, y), (u, v) in zip(source, target):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        values += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(values), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def pixel_scale(sx, sy=None):
    """3x3 map of a resize by (sx, sy) on pixel centres: p -> (p + 0.5) * s - 0.5."""
    sy = sx if sy is None else sy
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])


def celeba_height(size):
    """Height of a CelebA frame `size` px wide."""
    return int(round(size * CELEBA_FRAME[1] / CELEBA_FRAME[0]))


def celeba_transform(landmarks, size):
    """2x3 affine: input pixel -> pixel of the CelebA frame scaled to `size` px wide."""
    frame = similarity(np.stack(eyes_and_mouth(landmarks)), CELEBA_POINTS)
    return (pixel_scale(size / CELEBA_FRAME[0]) @ np.vstack([frame, [0, 0, 1]]))[:2]


def enlargement(matrix):
    """How much an affine map magnifies (the square root of its area scale)."""
    return math.sqrt(abs(np.linalg.det(np.asarray(matrix)[:, :2])))


# ------------------------------------------------------------------------------------------------
# Warps

def shrink(rgb, factor):
    """Area-downsize by an integer `factor` (rounded sizes, as the recipe); factor <= 1: as is."""
    if factor <= 1:
        return rgb
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (int(np.rint(w / factor)), int(np.rint(h / factor))),
                      interpolation=cv2.INTER_AREA)


def quad_bounds(quad):
    """(left, top, right, bottom) integer bounds of a quad: floor of the mins, ceil of the
    maxes."""
    return (*np.floor(quad.min(0)).astype(int), *np.ceil(quad.max(0)).astype(int))


def blurred_reflection_pad(rgb, pad, qsize):
    """The recipe's padding: reflect (left, top, right, bottom) pixels; toward the outer edge the
    pad is blurred and faded to the median colour, so the model never sees a hard border."""
    left, top, right, bottom = (int(p) for p in pad)
    img = np.pad(rgb.astype(np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    y, x = np.ogrid[:h, :w]
    x, y = x.astype(np.float32), y.astype(np.float32)
    outside = np.maximum(1.0 - np.minimum(x / left, (w - 1 - x) / right),
                         1.0 - np.minimum(y / top, (h - 1 - y) / bottom))[..., None]
    sigma = qsize * 0.02
    radius = int(4.0 * sigma + 0.5)  # the 4-sigma support of the recipe's Gaussian
    blurred = cv2.GaussianBlur(img, (2 * radius + 1,) * 2, sigma, borderType=cv2.BORDER_REFLECT)
    img += (blurred - img) * np.clip(outside * 3.0 + 1.0, 0.0, 1.0)
    img += (np.median(img.reshape(-1, 3), axis=0) - img) * np.clip(outside, 0.0, 1.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def align_ffhq(rgb, landmarks, size):
    """FFHQ-align the face with these (68, 2) landmarks: (size, size, 3) uint8."""
    quad = ffhq_quad(landmarks)
    qsize = np.hypot(*(quad[3] - quad[0]))
    factor = int(np.floor(qsize / size * 0.5))
    if factor > 1:
        rgb = shrink(rgb, factor)
        quad, qsize = quad / factor, qsize / factor
    # crop to the quad and a border
    border = max(int(np.rint(qsize * 0.1)), 3)
    left, top, right, bottom = quad_bounds(quad)
    h, w = rgb.shape[:2]
    left, top = max(left - border, 0), max(top - border, 0)
    right, bottom = min(right + border, w), min(bottom + border, h)
    rgb, quad = rgb[top:bottom, left:right], quad - (left, top)
    # pad where the quad (and its border) leaves the photo
    left, top, right, bottom = quad_bounds(quad)
    h, w = rgb.shape[:2]
    pad = np.maximum([border - left, border - top, right - w + border, bottom - h + border], 0)
    if pad.max() > border - 4:
        pad = np.maximum(pad, max(int(np.rint(qsize * 0.3)), 1))
        rgb = blurred_reflection_pad(rgb, pad, qsize)
        quad = quad + pad[:2]
    # resample the quad to a square, large, then area-average it down
    work = max(FFHQ_TRANSFORM_SIZE, size)
    square = cv2.warpAffine(rgb, quad_to_square(quad, work), (work, work),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)
    return square if work == size else cv2.resize(square, (size, size),
                                                  interpolation=cv2.INTER_AREA)


def align_celeba(rgb, landmarks, size):
    """CelebA-align the face with these (68, 2) landmarks: the img_align_celeba frame `size` px
    wide, (celeba_height(size), size, 3) uint8."""
    matrix = celeba_transform(landmarks, size)
    # shrink first, as the FFHQ recipe does, so that the cubic warp never skips input pixels
    factor = int(np.floor(0.5 / enlargement(matrix)))
    if factor > 1:
        h, w = rgb.shape[:2]
        rgb = shrink(rgb, factor)
        matrix = matrix @ pixel_scale(w / rgb.shape[1], h / rgb.shape[0])  # small px -> input px
    # cubic, with edge pixels repeated outside the photo: as CelebA's MATLAB imtransform
    return cv2.warpAffine(rgb, matrix, (size, celeba_height(size)), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REPLICATE)


ALIGNERS = {"ffhq": align_ffhq, "celeba": align_celeba}
TRANSFORMS = {"ffhq": ffhq_transform, "celeba": celeba_transform}


def output_shape(style, size):
    """(height, width) of an aligned image."""
    return (size, size) if style == "ffhq" else (celeba_height(size), size)


def align_image(rgb, finder, size, style="ffhq"):
    """(aligned HxWx3 uint8 or None, message): the largest face of `rgb` aligned in `style`; the
    message says what went wrong (None) or what to know (several faces), else it is ''."""
    faces = finder.detect(rgb)
    if not faces:
        h, w = rgb.shape[:2]
        hint = (f" (the image is {w}x{h} px; dlib finds faces of about {MIN_DETECTABLE // 2} px "
                f"and larger)" if min(h, w) < MIN_DETECTABLE else "")
        return None, NO_FACE + hint
    landmarks = faces[0]
    magnified = enlargement(TRANSFORMS[style](landmarks, size))
    if magnified > MAX_ENLARGEMENT:
        return None, (f"the face is too small for --size {size}: it would be enlarged "
                      f"{magnified:.1f}x (at most {MAX_ENLARGEMENT:g}x); a smaller --size "
                      f"aligns it")
    note = f"{len(faces)} faces found; aligned the largest" if len(faces) > 1 else ""
    return ALIGNERS[style](rgb, landmarks, size), note


# ------------------------------------------------------------------------------------------------
# The `data.py align` command

def image_files(root, skip):
    """Image files under `root` (recursively, hidden ones and the folder `skip` left out),
    as paths relative to root, in natural order."""
    found = []
    skip = os.path.realpath(skip)
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) != skip]
        found += [os.path.relpath(os.path.join(folder, n), root) for n in names
                  if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    return sorted(found, key=natural_key)


def align_folder(root, dest, size=None, style="ffhq", landmarks_path=None):
    """Align every photo under `root` into `dest` (same relative names); returns the count
    aligned. One line per problem file, the others go on, and a summary at the end."""
    if style not in STYLES:
        raise UserError(f"--style {style!r}: use one of {', '.join(STYLES)}")
    size = size or DEFAULT_SIZES[style]
    if size < 8:
        raise UserError(f"--size {size} is too small (at least 8 px)")
    if not os.path.isdir(root):
        raise UserError(f"--root {root!r}: no such folder")
    if os.path.realpath(root) == os.path.realpath(dest):
        raise UserError("--dest must differ from --root: alignment never overwrites its inputs")
    names = image_files(root, dest)
    if not names:
        raise UserError(f"--root {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    finder = FaceLandmarks(landmarks_path)
    counts = {"aligned": 0, "several faces": 0, "no face": 0, "too small": 0,
              "undecodable": 0}
    for name in tqdm(names, desc=f"aligning ({style})", unit="img", dynamic_ncols=True):
        rgb = read_image(os.path.join(root, name))
        aligned, message = (None, "cannot be decoded") if rgb is None else \
            align_image(rgb, finder, size, style)
        if message:
            tqdm.write(f"{os.path.join(root, name)}: {message}", file=sys.stderr)
        if aligned is None:
            counts["undecodable" if rgb is None else
                   "no face" if message.startswith(NO_FACE) else "too small"] += 1
            continue
        counts["aligned"] += 1
        counts["several faces"] += bool(message)
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        write_image(target, aligned)
    height, width = output_shape(style, size)
    skipped = [f"{counts[k]} {k}" for k in ("no face", "too small", "undecodable") if counts[k]]
    print(f"aligned {counts['aligned']} of {len(names)} images into {dest} ({style}, "
          f"{width}x{height} px)"
          + (f"; {counts['several faces']} had several faces (the largest was taken)"
             if counts["several faces"] else "")
          + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    if not counts["aligned"]:
        raise UserError(f"no face was aligned from {root!r}")
    return counts["aligned"]


def add_align_arguments(p):
    """The flags of `data.py align`."""
    p.add_argument("--root", required=True, help="folder of photos (searched recursively)")
    p.add_argument("--dest", required=True, help="output folder; the photos' relative names "
                   "are kept (the inputs are never overwritten)")
    p.add_argument("--size", type=int, default=None, help="output width in px (default: "
                   + ", ".join(f"{s} {n}" for s, n in DEFAULT_SIZES.items()) + "); celeba "
                   "frames are 218/178 times as tall")
    p.add_argument("--style", choices=STYLES, default="ffhq", help="framing: ffhq (the ffhq and "
                   "celebahq models) or celeba (img_align_celeba's 178x218 frame)")
    p.add_argument("--landmarks", default=None, help=f"dlib {PREDICTOR_FILE} to use (default: "
                   "the one in face-recognition-models)")


def run_align(args):
    """`data.py align`: align_folder with the parsed flags."""
    align_folder(args.root, args.dest, args.size, args.style, args.landmarks)


# ------------------------------------------------------------------------------------------------
# eval.py --align: a model's inputs framed as its training data

def model_framing(cfg, style=None):
    """(style, size) of a model's training faces: celeba for CD (its seeds train on
    img_align_celeba) and OverLORD's celeba preset, else ffhq; ffhq squares at the side the model
    crops, celeba frames at 178 px (the model's own crop then applies)."""
    if style is None:
        celeba = cfg["method"] == "cd" or cfg.get("preset") == "celeba"
        style = "celeba" if celeba else "ffhq"
    if style == "celeba":
        return style, DEFAULT_SIZES["celeba"]
    side = cfg.get("crop") or (cfg["resize"] if cfg["method"] == "cd" else cfg["img_shape"][0])
    return style, side


def align_jobs(jobs, cfg, style=None, landmarks_path=None):
    """(img, reference, output) jobs with each input replaced by its aligned copy, written beside
    the output as OUTPUT-STEM_aligned_img.png and _aligned_reference.png."""
    style, size = model_framing(cfg, style)
    finder, done = FaceLandmarks(landmarks_path), {}

    def aligned(path, output, role):
        if not path:
            return path
        target = f"{os.path.splitext(output)[0]}_aligned_{role}.png"
        if path not in done:
            rgb = read_image(path)
            if rgb is None:
                raise UserError(f"{role} {path!r}: missing or not a decodable image")
            face, message = align_image(rgb, finder, size, style)
            if face is None:
                raise UserError(f"--align: {path}: {message}")
            if message:
                print(f"--align: {path}: {message}", file=sys.stderr)
            done[path] = face
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        write_image(target, done[path])
        return target

    return [(aligned(img, output, "img"), aligned(ref, output, "reference"), output)
            for img, ref, output in jobs]
