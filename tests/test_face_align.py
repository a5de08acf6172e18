"""Face alignment: the FFHQ and CelebA geometry on given landmarks, then dlib on a real photograph
(scikit-image's astronaut), data.py align and eval.py --align as a user runs them."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import face_align as fa
from conftest import ROOT, TINY_CD, run_script
from data import read_image, write_image

HAS_DLIB = (importlib.util.find_spec("dlib") is not None
            and importlib.util.find_spec("face_recognition_models") is not None)
needs_dlib = pytest.mark.skipif(not HAS_DLIB, reason=f"needs dlib: {fa.ALIGN_INSTALL}")


def ffhq_canonical(size):
    """Where the recipe puts the eyes and the mouth centre of a face whose eyes are as far
    apart as the mouth is below them: the quad is 4 eye distances wide, its centre a tenth of
    the way from the eyes to the mouth (pixel centres at integers)."""
    eye_y = size * (0.5 - 0.1 / 4) - 0.5
    return np.array([(size * 3 / 8 - 0.5, eye_y), (size * 5 / 8 - 0.5, eye_y),
                     (size / 2 - 0.5, eye_y + size / 4)])


def landmarks_of(eye_left, eye_right, mouth_left, mouth_right):
    """(68, 2) landmarks with the given eye centres (six contour points each) and mouth corners;
    the other points are not used by the alignment."""
    lm = np.zeros((68, 2))
    ring = 3.0 * np.stack([np.cos(np.arange(6) * np.pi / 3), np.sin(np.arange(6) * np.pi / 3)], 1)
    lm[36:42], lm[42:48] = np.asarray(eye_left) + ring, np.asarray(eye_right) + ring
    lm[48], lm[54] = mouth_left, mouth_right
    return lm


def posed(points, angle, scale, shift):
    """Points rotated by `angle` degrees, scaled and shifted."""
    a = np.deg2rad(angle)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.asarray(points, dtype=np.float64) @ rotation.T * scale + shift


def ffhq_face(angle, scale, shift):
    """Landmarks of an upright face (eye distance 1, mouth 1 below the eyes) put in a pose."""
    eye_l, eye_r, mouth_l, mouth_r = posed([(-0.5, 0), (0.5, 0), (-0.4, 1), (0.4, 1)],
                                           angle, scale, shift)
    return landmarks_of(eye_l, eye_r, mouth_l, mouth_r), np.stack([eye_l, eye_r,
                                                                   (mouth_l + mouth_r) / 2])


def photo_with_marks(shape, marks, radius):
    """A grey photo with a red, a green and a blue disc at the three `marks`."""
    import cv2
    img = np.full((*shape, 3), 128, np.uint8)
    for (x, y), colour in zip(marks, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        cv2.circle(img, (int(round(x * 16)), int(round(y * 16))), int(radius * 16), colour, -1,
                   cv2.LINE_AA, shift=4)
    return img


def mark_centres(img, expected, window=12):
    """Centroids of the red, green and blue discs, each searched near its expected place."""
    found = []
    rgb = img.astype(np.float64)
    for channel, (x, y) in enumerate(expected):
        others = np.delete(rgb, channel, axis=2).max(2)
        weight = np.clip(rgb[..., channel] - others - 40, 0, None)
        x0, y0 = int(max(x - window, 0)), int(max(y - window, 0))
        w = weight[y0:int(y + window) + 1, x0:int(x + window) + 1]
        ys, xs = np.mgrid[y0:y0 + w.shape[0], x0:x0 + w.shape[1]]
        found.append((float((xs * w).sum() / w.sum()), float((ys * w).sum() / w.sum())))
    return np.array(found)


class GivenFaces:
    """A stand-in for FaceLandmarks that 'finds' the landmarks it was given."""

    def __init__(self, *faces):
        self.faces = list(faces)

    def detect(self, rgb):
        return self.faces


# ------------------------------------------------------------------------------------------------
# Geometry with given landmarks (no dlib)

@pytest.mark.parametrize("angle, scale, shift", [(0, 50, (200, 150)), (-35, 23.7, (61, 88)),
                                                 (160, 120, (-40, 700))])
def test_ffhq_transform_puts_the_face_at_the_recipe_positions_in_any_pose(angle, scale, shift):
    landmarks, marks = ffhq_face(angle, scale, shift)
    matrix = fa.ffhq_transform(landmarks, 256)
    placed = marks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(placed, ffhq_canonical(256), atol=1e-6)
    assert fa.enlargement(matrix) == pytest.approx(256 / (4 * scale))


@pytest.mark.parametrize("size, angle, scale, shift, shape", [
    (128, 25, 150, (500, 450), (1000, 1000)),  # a large face: shrunk first (recipe), no pad
    (96, -10, 30, (62, 50), (160, 200)),      # the quad leaves the photo: blurred reflection pad
])
def test_ffhq_warp_lands_marks_where_the_transform_says(size, angle, scale, shift, shape):
    landmarks, marks = ffhq_face(angle, scale, shift)
    photo = photo_with_marks(shape, marks, radius=scale / 8)
    aligned = fa.align_ffhq(photo, landmarks, size)
    assert aligned.shape == (size, size, 3) and aligned.dtype == np.uint8
    np.testing.assert_allclose(mark_centres(aligned, ffhq_canonical(size)),
                               ffhq_canonical(size), atol=1.0)
    # the padded corner is the photo's grey, faded, never black
    assert abs(aligned[:4, :4].astype(float).mean() - 128) < 12


def test_celeba_warp_puts_eyes_and_mouth_at_the_dataset_points():
    target = fa.CELEBA_POINTS
    eyes_mouth = posed(target - target.mean(0), 20, 1.8, (300, 240))
    offset = posed([(-16, 0), (16, 0)], 20, 1.8, (0, 0))  # mouth corners, either side
    landmarks = landmarks_of(eyes_mouth[0], eyes_mouth[1], eyes_mouth[2] + offset[0],
                             eyes_mouth[2] + offset[1])
    photo = photo_with_marks((500, 600), eyes_mouth, radius=7)
    for size in (178, 89):
        aligned = fa.align_celeba(photo, landmarks, size)
        assert aligned.shape == (fa.celeba_height(size), size, 3)
        expected = (target + 0.5) * size / 178 - 0.5
        np.testing.assert_allclose(mark_centres(aligned, expected), expected, atol=1.0)
    assert fa.celeba_height(178) == 218


def test_align_image_says_what_went_wrong():
    landmarks, _ = ffhq_face(0, 50, (200, 150))
    small, _ = ffhq_face(0, 10, (100, 100))
    photo = np.full((300, 400, 3), 100, np.uint8)
    aligned, note = fa.align_image(photo, GivenFaces(landmarks, small), 256, "ffhq")
    assert aligned.shape == (256, 256, 3) and note == "2 faces found; aligned the largest"
    assert fa.align_image(photo, GivenFaces(landmarks), 256, "celeba")[0].shape == (314, 256, 3)
    aligned, note = fa.align_image(photo, GivenFaces(small), 256, "ffhq")
    assert aligned is None and "too small for --size 256" in note and "6.4x" in note
    assert fa.align_image(photo[:50, :50], GivenFaces(), 256, "ffhq") == (
        None, "no face found (the image is 50x50 px; dlib finds faces of about 40 px and larger)")


def test_without_dlib_one_line_names_the_install(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "dlib.py").write_text("raise ImportError('blocked for the test')\n")
    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(str(photos / "a.png"), np.zeros((8, 8, 3), np.uint8))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "align", "--root",
                        str(photos), "--dest", str(tmp_path / "out")], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(blocker)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"error: face alignment needs dlib: {fa.ALIGN_INSTALL}"


# ------------------------------------------------------------------------------------------------
# A real photograph through dlib

@pytest.fixture(scope="module")
def astronaut():
    return pytest.importorskip("skimage.data").astronaut()


@pytest.fixture(scope="module")
def finder():
    if not HAS_DLIB:
        pytest.skip(f"needs dlib: {fa.ALIGN_INSTALL}")
    return fa.FaceLandmarks()


@needs_dlib
@pytest.mark.parametrize("style, size, canonical", [
    ("ffhq", 256, ffhq_canonical(256)[:2]),
    ("celeba", 178, fa.CELEBA_POINTS[:2]),
])
def test_the_astronauts_eyes_land_on_the_canonical_positions(astronaut, finder, style, size,
                                                             canonical):
    faces = finder.detect(astronaut)
    assert len(faces) == 1 and faces[0].shape == (68, 2) and faces[0].dtype == np.float64
    aligned, note = fa.align_image(astronaut, finder, size, style)
    assert note == "" and aligned.shape[:2] == fa.output_shape(style, size)
    again = finder.detect(aligned)
    assert len(again) == 1
    eyes = np.stack(fa.eyes_and_mouth(again[0])[:2])
    matrix = fa.TRANSFORMS[style](faces[0], size)
    predicted = np.stack(fa.eyes_and_mouth(faces[0])[:2]) @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(eyes, predicted, atol=1.5)    # the warp does what it says
    np.testing.assert_allclose(eyes, canonical, atol=3.0)    # and that is the dataset's framing


@needs_dlib
def test_data_align_command(astronaut, tmp_path):
    photos, dest = tmp_path / "photos", tmp_path / "aligned"
    (photos / "sub").mkdir(parents=True)
    write_image(str(photos / "astronaut.png"), astronaut)
    write_image(str(photos / "sub" / "twins.jpg"), np.hstack([astronaut, astronaut[:, ::-1]]))
    write_image(str(photos / "blank.png"), np.full((200, 200, 3), 128, np.uint8))
    (photos / "broken.png").write_bytes(b"not an image")
    before = (photos / "astronaut.png").read_bytes()
    r = run_script("data.py", "align", "--root", photos, "--dest", dest, "--size", "128")
    assert r.returncode == 0, r.stderr
    assert "aligned 2 of 4 images" in r.stdout and "1 had several faces" in r.stdout
    assert "1 no face, 1 undecodable" in r.stdout
    for name, problem in [("blank.png", "no face found"), ("broken.png", "cannot be decoded"),
                          (os.path.join("sub", "twins.jpg"), "2 faces found")]:
        assert f"{photos / name}: {problem}" in r.stderr
    assert sorted(os.listdir(dest)) == ["astronaut.png", "sub"]
    assert read_image(str(dest / "astronaut.png")).shape == (128, 128, 3)
    assert read_image(str(dest / "sub" / "twins.jpg")).shape == (128, 128, 3)
    assert (photos / "astronaut.png").read_bytes() == before
    r = run_script("data.py", "align", "--root", photos, "--dest", photos)
    assert r.returncode == 2 and "never overwrites" in r.stderr

    fa.align_folder(str(photos), str(tmp_path / "celeba"), style="celeba")
    assert read_image(str(tmp_path / "celeba" / "astronaut.png")).shape == (218, 178, 3)
    with pytest.raises(fa.UserError, match="no such file"):
        fa.FaceLandmarks(str(tmp_path / "missing.dat"))


@needs_dlib
def test_eval_align_frames_the_inputs_as_the_model_data(astronaut, two_domains, tmp_path):
    import train
    run = tmp_path / "run"
    train.main(["--root", two_domains, "--out", str(run), "--iters", "1", *TINY_CD])
    photo = tmp_path / "astronaut.png"
    write_image(str(photo), astronaut)
    out = tmp_path / "out" / "result.png"
    r = run_script("eval.py", "--load", run, "--img", photo, "--reference", photo, "--align",
                   "--output", out)
    assert r.returncode == 0, r.stderr
    assert read_image(str(out)).shape == (16, 16, 3)
    # CD's seeds train on img_align_celeba: the celeba frame, then the model's own crop
    for role in ("img", "reference"):
        assert read_image(str(tmp_path / "out" / f"result_aligned_{role}.png")).shape == \
            (218, 178, 3)
