"""The field's standard figures for image translation, offline, for `python eval.py --load RUN
--metrics --paper` (README: the papers' figures):

- FID and KID between the real images of a target domain (or label) and the translations into
  it, on InceptionV3's 2048-d pool features: images resized to 299 px and normalised as the
  weights expect (StarGAN-v2's evaluation, which OverLORD's evaluation/fid.py follows);
- LPIPS diversity: the mean LPIPS between every pair of several translations of one image (the
  `lpips` package's AlexNet heads, as StarGAN-v2 and OverLORD measure it);
- face metrics through dlib: identity (cosine of 128-d embeddings), 68-landmark error and head
  pose, with the faces that were not found counted.

Nothing is downloaded. InceptionV3 takes torchvision's `inception_v3_google-*.pth` or
pytorch-fid's `pt_inception-2015-12-05-*.pth` (its port of the TF graph behind published FIDs;
pytorch-fid's blocks), from --inception_weights or the torch hub cache; AlexNet takes
`alexnet-owt-*.pth` from --alexnet_weights or the cache. A figure whose network is missing is
"unavailable", with a note naming what supplies it, and the other figures still run.

Public interface:
    paper_networks(args, cfg) -> PaperNetworks       eval.py loads them first, then calls
    paper_section(model, ckpt, networks, cd_scored, args) -> (section, notes, settings)
    load_inception(path) / load_lpips(path)     networks from local weights, or UserError
    InceptionFeatures(variant, state, source)   [0, 1] images -> (N, 2048) pool features
    frechet_distance(mu1, cov1, mu2, cov2), fid(real, fake), kid(real, fake)
    lpips_diversity(net, groups)                (N, R, 3, H, W) -> (N,) mean pairwise LPIPS
    FaceMeter(landmarks_path), head_pose(landmarks, shape), face_scores(pairs)
"""
import glob
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as ev
from face_align import FaceLandmarks, packaged_model, shape_points
from models import IMAGENET_MEAN, IMAGENET_STD
from train import collate_items
from utils import UserError

METRICS_INSTALL = "pip install -r requirements-metrics.txt"

INCEPTION_SIDE = 299        # InceptionV3's input side: every image is resized to it
POOL_FEATURES = 2048        # width of its last average pool, the features FID and KID compare
# hub cache file patterns, in order of preference: pytorch-fid's port reproduces published FIDs
INCEPTION_FILES = {"pytorch-fid": "pt_inception-2015-12-05-*.pth",
                   "torchvision": "inception_v3_google-*.pth"}
INCEPTION_CLASSES = {"pytorch-fid": 1008, "torchvision": 1000}   # rows of each file's fc layer
# the input range each file was trained on: the TF graph's [-1, 1]; torchvision's file as
# StarGAN-v2 feeds it (ImageNet statistics, without torchvision's transform_input)
NORMALISATION = {"pytorch-fid": ((0.5,) * 3, (0.5,) * 3),
                 "torchvision": (IMAGENET_MEAN, IMAGENET_STD)}
ALEXNET_FILE = "alexnet-owt-*.pth"
FEATURE_BATCH = 8           # images per InceptionV3 pass (2-core AMD EPYC: 75 ms/image, 88 at 50)
KID_BLOCKS = 10             # disjoint subsets behind KID's standard error
KERNEL_ROWS = 1024          # KID's kernel matrices are summed this many rows at a time
LPIPS_IMAGES = 64           # content images translated LPIPS_TRANSLATIONS times each
LPIPS_TRANSLATIONS = 10     # translations per image (StarGAN-v2: 10)
LPIPS_MIN_SIDE = 32         # AlexNet's strides and poolings leave nothing of smaller images
LPIPS_IMAGES_PER_PASS = 8   # content images (each with its translations) per LPIPS pass
FACE_IMAGES = 32            # translations per direction or label whose faces are measured
                            # (dlib takes 0.1-0.2 s per face on a 2-core CPU)
FACE_PROBE_IMAGES = 16      # content images looked at to decide whether the data holds faces
FACE_MIN_SHARE = 0.5        # ... it does when dlib finds a face in at least this share
FACE_MIN_SIDE = 256         # smaller images are enlarged to this (dlib finds faces of ~80 px)
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"

# a generic 3-D head (the points often used with solvePnP, in mm) in camera axes: x right,
# y down, z away from the camera; dlib points 30 nose tip, 8 chin, 36 and 45 outer eye corners,
# 48 and 54 mouth corners
POSE_POINTS = (30, 8, 36, 45, 48, 54)
GENERIC_FACE = np.array([(0.0, 0.0, 0.0), (0.0, 330.0, 65.0), (-225.0, -170.0, 135.0),
                         (225.0, -170.0, 135.0), (-150.0, 150.0, 125.0), (150.0, 150.0, 125.0)])
OUTER_EYE_CORNERS = (36, 45)   # the inter-ocular distance that normalises landmark errors


# ------------------------------------------------------------------------------------------------
# Weights on disk (never downloaded)

def hub_file(pattern):
    """The last-named file matching `pattern` in the torch hub cache's checkpoints, or None."""
    found = sorted(glob.glob(os.path.join(torch.hub.get_dir(), "checkpoints", pattern)))
    return found[-1] if found else None


def weights_file(path, patterns, flag):
    """`path` (UserError if it is not a file), else the first hub cache match of `patterns`,
    else None."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path!r}: no such file")
        return path
    return next((f for f in map(hub_file, patterns) if f), None)


def missing_weights(what, files, flag):
    """The note for a network whose weights are not on disk."""
    return (f"no {what} weights: give {flag} PATH ({' or '.join(files)}) or copy the file "
            f"into {os.path.join(torch.hub.get_dir(), 'checkpoints')}; nothing is downloaded")


class MissingPackage(UserError):
    """An optional package is not installed: its figures are unavailable, the rest still run."""


def read_state(path, what):
    """The state dict in the file at `path`, or UserError in one line; `what` names the
    network with its article ("an InceptionV3")."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and format errors alike: the file is not weights
        raise UserError(f"{path}: not {what} state dict ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: not {what} state dict")
    return state


def check_state(expected, state, path, what):
    """UserError in one line unless `state` has exactly the keys and shapes of `expected`."""
    for key, value in expected.items():
        if key not in state or state[key].shape != value.shape:
            raise UserError(f"{path}: not {what} state dict ({key} is missing or of another "
                            f"shape)")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"{path}: not {what} state dict (unexpected {extra[0]})")


# ------------------------------------------------------------------------------------------------
# InceptionV3 pool features

FEATURE_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                  "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                  "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                  "Mixed_7c", "avgpool")


def inception_network(variant):
    """torchvision's InceptionV3 built without weights; for pytorch-fid's file, with pytorch-fid's
    blocks (the TF graph's pooling) and its 1008-class head."""
    from torchvision.models import inception_v3
    if variant == "torchvision":
        return inception_v3(weights=None, aux_logits=True, init_weights=False)
    try:
        from pytorch_fid.inception import (FIDInceptionA, FIDInceptionC, FIDInceptionE_1,
                                           FIDInceptionE_2)
    except ImportError:
        raise MissingPackage(f"pytorch-fid's InceptionV3 file needs pytorch-fid: "
                             f"{METRICS_INSTALL}") from None
    net = inception_v3(weights=None, aux_logits=False, init_weights=False,
                       num_classes=INCEPTION_CLASSES["pytorch-fid"])
    blocks = {"Mixed_5b": FIDInceptionA(192, pool_features=32),
              "Mixed_5c": FIDInceptionA(256, pool_features=64),
              "Mixed_5d": FIDInceptionA(288, pool_features=64),
              "Mixed_6b": FIDInceptionC(768, channels_7x7=128),
              "Mixed_6c": FIDInceptionC(768, channels_7x7=160),
              "Mixed_6d": FIDInceptionC(768, channels_7x7=160),
              "Mixed_6e": FIDInceptionC(768, channels_7x7=192),
              "Mixed_7b": FIDInceptionE_1(1280), "Mixed_7c": FIDInceptionE_2(2048)}
    for name, block in blocks.items():
        setattr(net, name, block)
    return net


def fold_batch_norms(module):
    """Fold every eval-mode BatchNorm into the convolution before it (torchvision's BasicConv2d:
    conv, bn, relu), in place: the same function with one memory pass fewer per layer."""
    module.eval()
    for child in module.modules():
        if isinstance(getattr(child, "bn", None), nn.BatchNorm2d) and hasattr(child, "conv"):
            child.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(child.conv, child.bn)
            child.bn = nn.Identity()
    return module


class InceptionFeatures(nn.Module):
    """InceptionV3's 2048-d pool features of [0, 1] images, bilinearly resized to 299 px and
    normalised as `variant`'s weights expect, from a state dict read from `source`."""

    def __init__(self, variant, state, source):
        super().__init__()
        with torch.device("meta"):   # built without initialising the weights the file replaces
            net = inception_network(variant)
        check_state(net.state_dict(), state, source, f"a {variant} InceptionV3")
        net.load_state_dict(state, assign=True)
        self.variant, self.source = variant, source
        self.layers = fold_batch_norms(nn.Sequential(*(getattr(net, n) for n in FEATURE_LAYERS)))
        mean, std = NORMALISATION[variant]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, x):
        x = F.interpolate(x, size=(INCEPTION_SIDE, INCEPTION_SIDE), mode="bilinear",
                          align_corners=False)
        # channels-last runs InceptionV3 about a quarter faster on the CPU (README Performance)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.layers(x).flatten(1)                                  # (N, 2048)


def inception_variant(state, path):
    """Which InceptionV3 file this state dict is, from its head; UserError for another network."""
    head = state.get("fc.weight")
    for variant, classes in INCEPTION_CLASSES.items():
        if head is not None and tuple(head.shape) == (classes, POOL_FEATURES):
            return variant
    raise UserError(f"{path}: not an InceptionV3 state dict (expected torchvision's "
                    f"{INCEPTION_FILES['torchvision']} or pytorch-fid's "
                    f"{INCEPTION_FILES['pytorch-fid']})")


def load_inception(path):
    """InceptionFeatures from the weights file at `path`; UserError in one line for a file that
    is not one of the two InceptionV3 files."""
    state = read_state(path, "an InceptionV3")
    return InceptionFeatures(inception_variant(state, path), state, source=path)


@torch.inference_mode()
def inception_features(net, images):
    """(N, 2048) float64 features of (N, 3, H, W) [0, 1] images, batch by batch on the network's
    device."""
    device = net.mean.device
    return torch.cat([net(images[i:i + FEATURE_BATCH].to(device)).double().cpu()
                      for i in range(0, len(images), FEATURE_BATCH)]).numpy()


# ------------------------------------------------------------------------------------------------
# FID and KID

def trace_sqrt_product(a, b):
    """tr((aᵀa bᵀb)^½) for factors a (n, d) and b (m, d): the nuclear norm of a bᵀ, since
    aᵀa bᵀb has the nonzero eigenvalues of (a bᵀ)(a bᵀ)ᵀ. A QR first keeps the matrices at
    min(n, d) rows (a = q r leaves a bᵀ's singular values to r bᵀ)."""
    if a.shape[0] > a.shape[1]:
        a = np.linalg.qr(a, mode="r")
    if b.shape[0] > b.shape[1]:
        b = np.linalg.qr(b, mode="r")
    return float(np.linalg.svd(a @ b.T, compute_uv=False).sum())


def psd_factor(cov):
    """A factor f with fᵀf = cov (its symmetric square root) for a covariance matrix."""
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """|mu1 - mu2|² + tr(cov1 + cov2 - 2 (cov1 cov2)^½): the Fréchet distance of two Gaussians,
    the matrix root's trace taken as the nuclear norm of one factor times the other (stable for
    singular covariances, where sqrtm of the product is not)."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root = trace_sqrt_product(psd_factor(cov1), psd_factor(cov2))
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * root)


def fid(real, fake):
    """FID of two feature sets (n, d) and (m, d): the Fréchet distance of their Gaussians (mean
    and unbiased covariance), from the centred features themselves (no d x d root)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    a, b = real - real.mean(0), fake - fake.mean(0)
    a, b = a / math.sqrt(len(a) - 1), b / math.sqrt(len(b) - 1)      # aᵀa, bᵀb: covariances
    diff = real.mean(0) - fake.mean(0)
    value = diff @ diff + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt_product(a, b)
    return max(float(value), 0.0)   # a negative rounding residue of identical sets is 0


def kernel_total(p, q):
    """Σ_ij of KID's kernel (p_i·q_j / d + 1)³, KERNEL_ROWS rows of p at a time."""
    d = p.shape[1]
    return sum(float(((p[i:i + KERNEL_ROWS] @ q.T / d + 1) ** 3).sum())
               for i in range(0, len(p), KERNEL_ROWS))


def polynomial_mmd(x, y):
    """Unbiased MMD² of samples x (n, d) and y (m, d) under KID's kernel: the kernel's mean over
    distinct pairs within each sample, less twice its mean across them."""
    n, m, d = len(x), len(y), x.shape[1]

    def within(p):
        diagonal = float((((p * p).sum(1) / d + 1) ** 3).sum())
        return (kernel_total(p, p) - diagonal) / (len(p) * (len(p) - 1))

    return within(x) + within(y) - 2 * kernel_total(x, y) / (n * m)


def kid(real, fake, blocks=KID_BLOCKS, seed=0):
    """(KID, its standard error): the unbiased polynomial MMD² over all images, and the standard
    error of the mean of the same estimate over `blocks` disjoint random subsets, std /
    sqrt(blocks): an upper bound, as the all-image estimate uses more pairs (None when the sets
    are too small for two subsets of two)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    value = polynomial_mmd(real, fake)
    blocks = min(blocks, len(real) // 2, len(fake) // 2)
    if blocks < 2:
        return value, None
    rng = np.random.RandomState(seed)
    parts = zip(np.array_split(rng.permutation(len(real)), blocks),
                np.array_split(rng.permutation(len(fake)), blocks))
    estimates = [polynomial_mmd(real[i], fake[j]) for i, j in parts]
    return value, float(np.std(estimates, ddof=1) / math.sqrt(blocks))


# ------------------------------------------------------------------------------------------------
# LPIPS diversity

def load_lpips(path):
    """The `lpips` package's AlexNet LPIPS (its learned heads ship inside the package) with the
    AlexNet ImageNet weights at `path`; UserError for a wrong file."""
    try:
        import lpips
    except ImportError:
        raise MissingPackage(f"LPIPS needs the lpips package: {METRICS_INSTALL}") from None
    with warnings.catch_warnings():   # lpips asks torchvision for pretrained=False: deprecated
        warnings.simplefilter("ignore")
        net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    state = read_state(path, "a torchvision AlexNet")
    # lpips keeps AlexNet's layer features.i as slice{k}.i; the classifier is not used
    features = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    expected = {f"features.{name.split('.', 1)[1]}": (name, value)
                for name, value in net.net.state_dict().items()}
    check_state({k: v for k, (_, v) in expected.items()}, features, path, "a torchvision AlexNet")
    net.net.load_state_dict({name: features[k] for k, (name, _) in expected.items()})
    net.source = path
    return net.requires_grad_(False).eval()


@torch.inference_mode()
def lpips_diversity(net, groups):
    """(N,) mean LPIPS over every pair of each image's translations; groups (N, R, 3, H, W) in
    [0, 1] (StarGAN-v2's diversity). The distance is lpips.LPIPS.forward's, with each
    translation's AlexNet features computed once for its R - 1 pairs, not once per pair."""
    import lpips
    device = next(net.parameters()).device
    r = groups.shape[1]
    first, second = torch.triu_indices(r, r, 1)
    scores = []
    for chunk in groups.split(LPIPS_IMAGES_PER_PASS):
        x = net.scaling_layer(2 * chunk.flatten(0, 1).to(device) - 1)
        distance = 0
        for features, head in zip(net.net(x), net.lins):   # AlexNet's 5 ReLU outputs
            unit = lpips.normalize_tensor(features).unflatten(0, (len(chunk), r))
            squared = (unit[:, first] - unit[:, second]).flatten(0, 1) ** 2    # (n * pairs, ...)
            distance = distance + lpips.spatial_average(head(squared)).flatten()
        scores.append(distance.view(len(chunk), -1).mean(1).cpu())
    return torch.cat(scores)


# ------------------------------------------------------------------------------------------------
# Face metrics (dlib)

@dataclass
class FaceMeasure:
    """What dlib sees of the largest face in an image."""
    landmarks: np.ndarray   # (68, 2) x, y, in the (possibly enlarged) image's pixels
    embedding: np.ndarray   # (128,) dlib's face-recognition descriptor
    pose: np.ndarray        # (3,) yaw, pitch, roll in degrees


def rotation_angles(rotation):
    """(yaw, pitch, roll) in degrees of a rotation matrix R = Rz(roll) Ry(yaw) Rx(pitch) in camera
    axes: yaw turns the head left-right, pitch nods it, roll tilts it in the image plane."""
    yaw = math.asin(float(np.clip(-rotation[2, 0], -1.0, 1.0)))
    pitch = math.atan2(rotation[2, 1], rotation[2, 2])
    roll = math.atan2(rotation[1, 0], rotation[0, 0])
    return np.degrees([yaw, pitch, roll])


def head_pose(landmarks, image_shape):
    """(yaw, pitch, roll) in degrees: the rotation cv2.solvePnP fits between GENERIC_FACE and six
    of the 68 landmarks, through a pinhole camera of focal length = the image width, centred."""
    h, w = image_shape[:2]
    camera = np.array([[w, 0, (w - 1) / 2], [0, w, (h - 1) / 2], [0, 0, 1]], np.float64)
    points = np.ascontiguousarray(np.asarray(landmarks, np.float64)[list(POSE_POINTS)])
    _, rotation, _ = cv2.solvePnP(GENERIC_FACE, points, camera, None,
                                  flags=cv2.SOLVEPNP_ITERATIVE)
    return rotation_angles(cv2.Rodrigues(rotation)[0])


class FaceMeter:
    """dlib's face detector, 68-point predictor and face-recognition ResNet (both files ship in
    face-recognition-models); UserError naming the install when they are missing."""

    def __init__(self, landmarks_path=None):
        self.finder = FaceLandmarks(landmarks_path)
        self.recognition_path = packaged_model(RECOGNITION_FILE)
        self.recogniser = self.finder.dlib.face_recognition_model_v1(self.recognition_path)

    def measure(self, rgb):
        """FaceMeasure of the largest face in HxWx3 uint8 `rgb`, or None when none is found."""
        scale = FACE_MIN_SIDE / min(rgb.shape[:2])
        if scale > 1:
            rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        shapes = self.finder.shapes(rgb)
        if not shapes:
            return None
        landmarks = shape_points(shapes[0])
        embedding = np.array(self.recogniser.compute_face_descriptor(rgb, shapes[0]))
        return FaceMeasure(landmarks, embedding, head_pose(landmarks, rgb.shape))


def wrapped_degrees(a, b):
    """|a - b| in degrees, wrapped into [0, 180]."""
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


def face_comparison(content, translation, identity):
    """The face figures of one translation, from the FaceMeasures of its content image, itself
    and its identity source."""
    i, j = OUTER_EYE_CORNERS
    interocular = np.linalg.norm(content.landmarks[i] - content.landmarks[j])
    shift = np.linalg.norm(translation.landmarks - content.landmarks, axis=1).mean()
    cosine = identity.embedding @ translation.embedding / (
        np.linalg.norm(identity.embedding) * np.linalg.norm(translation.embedding))
    yaw, pitch, roll = wrapped_degrees(translation.pose, content.pose)
    return {"identity_cosine": float(cosine), "landmark_error": float(shift / interocular),
            "yaw_error": float(yaw), "pitch_error": float(pitch), "roll_error": float(roll)}


def face_scores(triples):
    """Mean face figures over (content, translation, identity source) FaceMeasure triples (None
    where no face was found), with the count scored and the faces not found, by role."""
    roles = ("content", "translation", "identity_source")
    no_face = {role: sum(t[k] is None for t in triples) for k, role in enumerate(roles)}
    rows = [face_comparison(*t) for t in triples if all(m is not None for m in t)]
    means = {name: float(np.mean([row[name] for row in rows])) if rows else None
             for name in ("identity_cosine", "landmark_error", "yaw_error", "pitch_error",
                          "roll_error")}
    return {**means, "pairs": len(triples), "scored": len(rows), "no_face": no_face}


# ------------------------------------------------------------------------------------------------
# The translations scored: CD's two directions, OverLORD's target labels

@dataclass
class Direction:
    """Translations into one domain or label. Images are [0, 1]; `real`, `content` and
    `identity` are (pool name, index tensor) rows of the pools they come from."""
    name: str
    real: tuple                       # the real images of the target
    fake: torch.Tensor                # (M, 3, H, W) translations
    content: tuple                    # the content image of each translation (M rows)
    identity: Optional[tuple]         # the identity source of each (M rows); None: unknown
    diverse: Optional[torch.Tensor]   # (N, R, 3, H, W): R translations of N images, or None


def quantised(x):
    """[0, 1] images rounded to 8 bits, as the protocols' PNG files hold them."""
    return (x.clamp(0, 1) * 255).round() / 255


def cd_directions(model, images, kept):
    """(pools, [add, remove]) of a CD model: eval.cd_metrics' translations of the test images
    (`kept` by it): add = B_j with A_(j mod n_A)'s separate code (B->A, against real testA),
    remove = A_i with the zero code (A->B, against real testB). Add's diversity: each of the
    first B images with several A images' codes."""
    device = next(model.parameters()).device
    x_a, x_b = images["testA"].to(device), images["testB"].to(device)
    n_a, n_b = len(x_a), len(x_b)
    common_b, separate_a = kept["common_b"], kept["separate_a"]
    n, r = min(LPIPS_IMAGES, n_b), min(LPIPS_TRANSLATIONS, n_a)
    diverse = None
    if r > 1:
        many = ev.cd_add(model, common_b[:n].repeat_interleave(r, 0),  # mask models: onto B
                         separate_a[ev.reference_indices(n, r, n_a, device)],
                         x_b[:n].repeat_interleave(r, 0))
        diverse = quantised(many.view(n, r, *many.shape[1:]))
    rows_a, rows_b = torch.arange(n_a), torch.arange(n_b)
    pools = {"testA": quantised(x_a), "testB": quantised(x_b)}
    return pools, [
        Direction("add", ("testA", rows_a), quantised(kept["added"]), ("testB", rows_b),
                  ("testB", rows_b), diverse),
        Direction("remove", ("testB", rows_b), quantised(kept["removed"]), ("testA", rows_a),
                  ("testA", rows_a), None)]


def overlord_direction(model, cfg, held_in, held_out, label, name):
    """The held-out images of other labels translated to `label` (by the label table, or by
    held-in references of that label for correlated configs, as eval.overlord_transfer), or
    None when a correlated config has no reference of that label."""
    sources = (held_out["label"] != label).nonzero().flatten()
    pool = (held_in["label"] == label).nonzero().flatten()
    if not len(sources) or (cfg["correlation"] and not len(pool)):
        return None
    x = held_out["img"][sources]
    references = pool[torch.arange(len(sources), device=pool.device) % len(pool)] \
        if len(pool) else None
    fake = ev.translations_to(model, x, label, held_in["img"][references]
                              if cfg["correlation"] else None)
    diverse = None
    n, r = min(LPIPS_IMAGES, len(sources)), min(LPIPS_TRANSLATIONS, len(pool))
    if cfg["correlation"] and r > 1:
        many = ev.translations_to(model, x[:n].repeat_interleave(r, 0), label,
                                  held_in["img"][pool[ev.reference_indices(n, r, len(pool),
                                                                           pool.device)]])
        diverse = quantised(many.view(n, r, *many.shape[1:]))
    # identity labels (celeba): the identity comes from the label's images, else from the input
    if cfg.get("labeled_attribute") == "identity":
        identity = ("held_in", references.cpu()) if references is not None else None
    else:
        identity = ("held_out", sources.cpu())
    return Direction(f"to_{name}", ("held_out", (held_out["label"] == label).nonzero().flatten()
                                    .cpu()), quantised(fake), ("held_out", sources.cpu()),
                     identity, diverse)


def overlord_directions(model, cfg, args):
    """(pools, directions) of an amortised OverLORD model: eval.overlord_metrics' held-out
    split, translated to each of its target labels."""
    device = next(model.parameters()).device
    dataset = ev.overlord_dataset(cfg, args.data)
    held_in_ids, held_out_ids = ev.held_out_split(len(dataset), args.metrics_images)
    held_in = collate_items(dataset, held_in_ids, device)
    held_out = collate_items(dataset, held_out_ids, device)
    names = dataset.data.label_names or []
    directions = []
    for k in ev.target_labels(cfg["n_labels"]):
        name = names[k] if k < len(names) else str(k)
        direction = overlord_direction(model, cfg, held_in, held_out, k, name)
        if direction is not None:
            directions.append(direction)
    pools = {"held_in": quantised(held_in["img"]), "held_out": quantised(held_out["img"])}
    return pools, directions


def rows_of(pools, rows):
    """The images of (pool name, indices) rows."""
    pool, index = rows
    return pools[pool][index.to(pools[pool].device)]


# ------------------------------------------------------------------------------------------------
# The section

def with_mean(values, errors=False):
    """{direction: value} plus "mean" over the numbers among them (None when there are none);
    errors=True: they are standard errors, and "mean" is that of the directions' mean."""
    numbers = [v for v in values.values() if isinstance(v, float)]
    if not numbers:
        return {**values, "mean": None}
    mean = math.sqrt(sum(v * v for v in numbers)) / len(numbers) if errors else np.mean(numbers)
    return {**values, "mean": float(mean)}


def fid_kid_figures(net, pools, directions):
    """{"fid", "kid", "kid_std_error"}: {direction: value, "mean": ...} each; the real images'
    features are computed once per pool and shared by every direction and by KID."""
    pool_features = {name: inception_features(net, images) for name, images in pools.items()
                     if any(d.real[0] == name for d in directions)}
    figures = {"fid": {}, "kid": {}, "kid_std_error": {}}
    for d in directions:
        real = pool_features[d.real[0]][d.real[1].numpy()]
        fake = inception_features(net, d.fake)
        if len(real) < 2 or len(fake) < 2:
            value = error = distance = None
        else:
            distance = fid(real, fake)
            value, error = kid(real, fake)
        figures["fid"][d.name], figures["kid"][d.name] = distance, value
        figures["kid_std_error"][d.name] = error
    return {name: with_mean(values, errors=name == "kid_std_error")
            for name, values in figures.items()}


def lpips_figures(net, directions):
    """{direction: mean pairwise LPIPS, or None where the direction has one output per image}."""
    return with_mean({d.name: float(lpips_diversity(net, d.diverse).mean())
                      if d.diverse is not None else None for d in directions})


def face_figures(meter, pools, directions):
    """(face scores over the first FACE_IMAGES translations of every direction that has identity
    sources, note): None with the reason when the content images hold no faces dlib finds."""
    cache = {}

    def measured(pool, index):
        key = (pool, int(index))
        if key not in cache:
            cache[key] = meter.measure(ev.to_uint8(pools[pool][int(index)], low=0.0))
        return cache[key]

    probe = directions[0].content
    probe_rows = probe[1][:FACE_PROBE_IMAGES]
    found = sum(measured(probe[0], i) is not None for i in probe_rows)
    if found < FACE_MIN_SHARE * len(probe_rows):
        return None, (f"face metrics skipped: dlib found a face in {found} of the first "
                      f"{len(probe_rows)} content images, so this is not face data")
    triples, note = [], None
    for d in (d for d in directions if d.identity is not None):
        for t in range(min(FACE_IMAGES, len(d.fake))):
            triples.append((measured(d.content[0], d.content[1][t]),
                            meter.measure(ev.to_uint8(d.fake[t], low=0.0)),
                            measured(d.identity[0], d.identity[1][t])))
    unmatched = [d.name for d in directions if d.identity is None]
    if unmatched:
        note = (f"face metrics leave out {', '.join(unmatched)}: no held-in image of that "
                f"identity to compare with")
    return (face_scores(triples) if triples else None), note


def inception_or_reason(path):
    """(InceptionFeatures or None, reason it is unavailable)."""
    found = weights_file(path, INCEPTION_FILES.values(), "--inception_weights")
    if found is None:
        return None, missing_weights("InceptionV3", INCEPTION_FILES.values(),
                                     "--inception_weights")
    try:
        return load_inception(found), None
    except MissingPackage as e:
        return None, str(e)


def lpips_or_reason(path, side):
    """(LPIPS network or None, reason it is unavailable)."""
    if side < LPIPS_MIN_SIDE:
        return None, f"images under {LPIPS_MIN_SIDE} px are too small for AlexNet"
    found = weights_file(path, [ALEXNET_FILE], "--alexnet_weights")
    if found is None:
        return None, missing_weights("AlexNet", [ALEXNET_FILE], "--alexnet_weights")
    try:
        return load_lpips(found), None
    except MissingPackage as e:
        return None, str(e)


def face_meter_or_reason(args):
    """(FaceMeter or None, reason it is unavailable or skipped)."""
    if args.no_face:
        return None, "face metrics skipped (--no_face)"
    try:
        return FaceMeter(args.landmarks), None
    except UserError as e:
        if args.landmarks:   # a file the user named is wrong: say so, as --align does
            raise
        return None, f"face metrics unavailable: {e}"   # the message names ALIGN_INSTALL


def paper_settings(inception, lpips_net, meter):
    """Which weights and protocol constants produced the section."""
    return {"inception_weights": inception.source if inception else "unavailable",
            "inception_variant": inception.variant if inception else None,
            "inception_side": INCEPTION_SIDE, "kid_kernel": "(x.y / 2048 + 1)^3",
            "kid_blocks": KID_BLOCKS,
            "alexnet_weights": lpips_net.source if lpips_net else "unavailable",
            "lpips_images": LPIPS_IMAGES, "lpips_translations": LPIPS_TRANSLATIONS,
            "face_models": [meter.finder.path, meter.recognition_path] if meter
            else "unavailable", "face_images": FACE_IMAGES}


@dataclass
class PaperNetworks:
    """The networks of the section, each None with the reason it is unavailable."""
    inception: Optional[InceptionFeatures]
    lpips: Optional[nn.Module]
    meter: Optional[FaceMeter]
    why_not: dict   # {"fid" | "lpips" | "face": reason}


def paper_networks(args, cfg):
    """PaperNetworks from --inception_weights, --alexnet_weights, --landmarks and --no_face;
    UserError for a file that was named but is missing or wrong."""
    inception, why_not_fid = inception_or_reason(args.inception_weights)
    lpips_net, why_not_lpips = lpips_or_reason(args.alexnet_weights, ev.image_side(cfg))
    meter, why_not_face = face_meter_or_reason(args)
    return PaperNetworks(inception, lpips_net, meter,
                         {"fid": why_not_fid, "lpips": why_not_lpips, "face": why_not_face})


def paper_section(model, ckpt, networks, cd_scored=None, args=None):
    """(section, notes, settings) of eval.py --metrics --paper: CD on cd_scored = (images of
    eval.cd_metric_images, the translations eval.cd_metrics kept), OverLORD on
    eval.overlord_metrics' held-out split (from --data and --metrics_images in `args`)."""
    cfg, notes = ckpt["config"], []
    if cfg["method"] == "overlord" and "amortization" not in ckpt["done"]:
        return None, ["paper: the translations need the amortisation stage"], {}
    device = next(model.parameters()).device
    if cfg["method"] == "cd":
        pools, directions = cd_directions(model, *cd_scored)
    else:
        pools, directions = overlord_directions(model, cfg, args)
    if not directions:
        return None, ["paper: no target label has references to translate with"], {}

    section, nets = {}, networks
    if nets.inception is not None:
        section.update(fid_kid_figures(nets.inception.to(device), pools, directions))
        notes.append(f"paper: FID/KID on {nets.inception.variant} InceptionV3 features "
                     f"({nets.inception.source}); FID is biased upward at these counts (compare "
                     f"it only at equal image counts), KID is not")
    else:
        section.update({"fid": "unavailable", "kid": "unavailable",
                        "kid_std_error": "unavailable"})
        notes.append(f"paper: FID and KID unavailable: {nets.why_not['fid']}")
    if nets.lpips is not None:
        section["lpips"] = lpips_figures(nets.lpips.to(device), directions)
        if any(d.diverse is None for d in directions):
            notes.append("paper: lpips is null where a direction gives one output per image "
                         "(CD's removal; OverLORD by label)")
    else:
        section["lpips"] = "unavailable"
        notes.append(f"paper: LPIPS diversity unavailable: {nets.why_not['lpips']}")
    section["face"], why_not_face = None, nets.why_not["face"]
    if nets.meter is not None:
        section["face"], why_not_face = face_figures(nets.meter, pools, directions)
    if why_not_face:
        notes.append(f"paper: {why_not_face}")
    return section, notes, paper_settings(nets.inception, nets.lpips, nets.meter)
