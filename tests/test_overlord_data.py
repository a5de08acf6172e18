"""OverLORD labelled data in data.py: preparers, the prepared format, loading, the Dataset, the
command line (tiny synthetic files only)."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import run_script
from data import (CELEBA_ATTRIBUTES, DEMO_HAIR, HAIR_COLOURS, EndlessBatches, LabelledImages,
                  center_crop, domain_paths, endless_loader, list_images, load_prepared, main,
                  make_demo_labeled, make_parser, natural_key, prepare_afhq,
                  prepare_celeba_identities, prepare_celebahq, prepare_ffhq, prepare_labeled,
                  read_attributes, read_image, remap_labels, write_image)
from utils import UserError


def solid(colour, height=40, width=48):
    """An H x W x 3 uint8 image of one colour."""
    return np.full((height, width, 3), colour, np.uint8)


def save(path, img):
    """Write `img`, creating the folder first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_image(str(path), img)
    return str(path)


def colours(n):
    """n clearly different RGB colours."""
    return [((37 * i) % 256, (90 + 53 * i) % 256, (200 - 29 * i) % 256) for i in range(n)]


def check_format(folder, n, size, k, masks=False):
    """Assert the on-disk format of a prepared folder and return it loaded."""
    names = sorted(os.listdir(folder))
    expected = ["images.npy", "label_names.json", "labels.npy", "meta.json"]
    assert names == sorted(expected + (["masks.npy"] if masks else []))
    data = load_prepared(folder)
    assert isinstance(data.images, np.memmap) and data.images.dtype == np.uint8
    assert data.images.shape == (n, size, size, 3)
    assert data.labels.dtype == np.int64 and data.labels.shape == (n,)
    assert len(data.label_names) == k and set(data.labels.tolist()) == set(range(k))
    assert data.meta["count"] == n and data.meta["image_size"] == size
    assert data.meta["n_labels"] == k and data.meta["has_masks"] == masks
    if masks:
        assert data.masks.shape == (n, size, size) and data.masks.dtype == np.uint8
        assert set(np.unique(data.masks)) <= {0, 1}
    return data


# ------------------------------------------------------------------------------------------------
# Preparers

def make_ffhq(root):
    """Six images; ages 25.3, 47, none (empty list), none (no JSON), 21, 63."""
    ages = [25.3, 47.0, None, "missing", 21.0, 63.9]
    for i, (age, colour) in enumerate(zip(ages, colours(6))):
        save(root / "imgs" / f"{i:05d}.png", solid(colour))
        os.makedirs(root / "features", exist_ok=True)
        faces = [] if age is None else [{"faceAttributes": {"age": age, "gender": "male"}}]
        if age != "missing":
            (root / "features" / f"{i:05d}.json").write_text(json.dumps(faces))
    return root


def test_ffhq_age_decades_drop_faceless_and_remap(tmp_path, capsys):
    root = make_ffhq(tmp_path / "ffhq")
    data = check_format(prepare_ffhq(str(root), str(tmp_path / "out"), img_size=16), 4, 16, 3)
    # decades 2, 4, 2, 6 are remapped to 0..2 with their names kept
    assert data.label_names == ["20-29", "40-49", "60-69"]
    assert data.labels.tolist() == [0, 1, 0, 2]
    assert data.meta["label_attribute"] == "age" and data.meta["dropped_without_face"] == 2
    kept = [colours(6)[i] for i in (0, 1, 4, 5)]
    assert np.array_equal(data.images[:, 8, 8], np.array(kept, np.uint8))
    assert "dropped 2 of 6" in capsys.readouterr().err


def test_ffhq_missing_features_folder(tmp_path):
    root = make_ffhq(tmp_path / "ffhq")
    os.rename(root / "features", root / "elsewhere")
    with pytest.raises(UserError, match="features"):
        prepare_ffhq(str(root), str(tmp_path / "out"))


def make_celeba(root):
    """Six 40x48 png images (the list says .jpg) whose central 32x32 window is white."""
    identities = ["10", "2", "7", "10", "2", "10"]
    for i in range(6):
        img = solid((0, 0, 0))
        img[4:36, 8:40] = 255  # the centered 32 x 32 window of a 40 x 48 image
        save(root / "img" / f"{i + 1:06d}.png", img)
    lines = [f"{i + 1:06d}.jpg {ident}" for i, ident in enumerate(identities)]
    (root / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    return root


def test_celeba_crop_and_sorted_identities(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    out = prepare_celeba_identities(str(root / "img"), str(root / "identity_CelebA.txt"),
                                    str(tmp_path / "out"), crop_size=32, img_size=16)
    data = check_format(out, 6, 16, 3)
    assert data.label_names == ["2", "7", "10"]  # sorted numerically, the same on every run
    assert data.labels.tolist() == [2, 0, 1, 2, 0, 2]
    assert data.images.min() == 255  # only the white window survives the crop


def test_celeba_crop_window_matches_spec():
    rows, cols = np.meshgrid(np.arange(218), np.arange(178), indexing="ij")
    crop = center_crop(np.stack([rows, cols], axis=2), 128)
    assert crop[0, 0].tolist() == [45, 25] and crop[-1, -1].tolist() == [172, 152]


def test_celeba_identity_order_ignores_file_order(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    lines = (root / "identity_CelebA.txt").read_text().splitlines()
    (root / "shuffled.txt").write_text("\n".join(lines[::-1]) + "\n")
    runs = [load_prepared(prepare_celeba_identities(str(root / "img"), str(root / name),
                                                    str(tmp_path / name), crop_size=32,
                                                    img_size=16))
            for name in ("identity_CelebA.txt", "shuffled.txt")]
    assert runs[0].label_names == runs[1].label_names == ["2", "7", "10"]
    assert runs[0].labels.tolist() == runs[1].labels.tolist()[::-1]


def test_celeba_identity_subset_is_seeded(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    picked = []
    for run in range(2):
        out = prepare_celeba_identities(str(root / "img"), str(root / "identity_CelebA.txt"),
                                        str(tmp_path / f"out{run}"), crop_size=32, img_size=16,
                                        n_identities=2, seed=3)
        data = load_prepared(out)
        assert data.n_labels == 2 and set(data.labels.tolist()) == {0, 1}
        picked.append((data.label_names, len(data)))
    assert picked[0] == picked[1]
    with pytest.raises(UserError, match="n_identities"):
        prepare_celeba_identities(str(root / "img"), str(root / "identity_CelebA.txt"),
                                  str(tmp_path / "bad"), crop_size=32, img_size=16,
                                  n_identities=4)


def test_celeba_image_smaller_than_crop(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    with pytest.raises(UserError, match="smaller than --crop_size 128"):
        prepare_celeba_identities(str(root / "img"), str(root / "identity_CelebA.txt"),
                                  str(tmp_path / "o"))


def test_afhq_domains_from_sorted_folders(tmp_path):
    root = tmp_path / "afhq"
    for domain, count in (("wild", 1), ("cat", 2), ("dog", 3)):
        for i in range(count):
            save(root / "train" / domain / f"{i}.jpg", solid((100, 100, 100)))
    data = check_format(prepare_afhq(str(root), str(tmp_path / "out"), img_size=16), 6, 16, 3)
    assert data.label_names == ["cat", "dog", "wild"]
    assert data.labels.tolist() == [0, 0, 1, 1, 1, 2]
    with pytest.raises(UserError, match="can be one of: train"):
        prepare_afhq(str(root), str(tmp_path / "out2"), split="test")


def make_celebahq(root):
    """Six 40x40 images; Male = 1,-1,...; hair masks: 2-D, 3-D, none, 0/1-valued."""
    anno = root / "CelebAMask-HQ"
    male = [1, -1, -1, 1, 1, -1]
    for i in range(6):
        save(root / "imgs" / f"{i}.jpg", solid((120, 80, 60), 40, 40))
    half = np.zeros((20, 20), np.uint8)
    half[:, :10] = 255  # left half of the image is hair
    masks = {0: half, 1: np.stack([half] * 3, axis=2), 3: half // 255, 4: half, 5: half}
    for i, mask in masks.items():
        save(anno / "CelebAMask-HQ-mask-anno" / str(i // 3) / f"{i:05d}_hair.png", mask)
    save(anno / "CelebAMask-HQ-mask-anno" / "0" / "00002_skin.png", half)  # another part
    header = ["5_o_Clock_Shadow", "Male", "Smiling"]
    rows = [f"{i}.jpg  -1 {m} 1" for i, m in enumerate(male)]
    (anno / "CelebAMask-HQ-attribute-anno.txt").write_text(
        "\n".join([str(len(male)), " ".join(header)] + rows) + "\n")
    return root


def test_celebahq_gender_and_masks(tmp_path):
    root = make_celebahq(tmp_path / "hq")
    data = check_format(prepare_celebahq(str(root), str(tmp_path / "out"), img_size=16), 6, 16, 2,
                        masks=True)
    assert data.label_names == ["female", "male"]
    assert data.labels.tolist() == [1, 0, 0, 1, 1, 0]
    expected = np.zeros((16, 16), np.uint8)
    expected[:, :8] = 1
    for i in (0, 1, 3, 4, 5):  # 2-D, 3-D and 0/1 masks all give the left half
        assert np.array_equal(data.masks[i], expected)
    assert data.masks[2].max() == 0  # no hair mask for image 2: zeros
    assert data.meta["mask_part"] == "hair" and data.meta["images_without_mask"] == 1


def test_celebahq_unknown_part(tmp_path):
    root = make_celebahq(tmp_path / "hq")
    with pytest.raises(UserError, match="check --part"):
        prepare_celebahq(str(root), str(tmp_path / "out"), part="hat")


def make_labeled(root):
    """Folders b/ (3 images) and a/ (2 images) of distinct solid colours, plus a stray file."""
    paths = []
    for i, (label, colour) in enumerate(zip("bbbaa", colours(5))):
        paths.append(save(root / label / f"{i}.png", solid(colour)))
    (root / "notes.txt").write_text("not an image")
    return paths


def test_labeled_folders_crop_and_resize(tmp_path):
    make_labeled(tmp_path / "set")
    data = check_format(prepare_labeled(str(tmp_path / "out"), root=str(tmp_path / "set"),
                                        img_size=16), 5, 16, 2)
    assert data.label_names == ["a", "b"] and data.labels.tolist() == [0, 0, 1, 1, 1]
    expected = [colours(5)[i] for i in (3, 4, 0, 1, 2)]
    assert np.array_equal(data.images[:, 0, 0], np.array(expected, np.uint8))


def test_labeled_enlarging_uses_centered_square(tmp_path):
    img = np.zeros((8, 12, 3), np.uint8)
    img[:, 2:10] = 200  # the centered 8 x 8 square
    save(tmp_path / "set" / "x" / "0.png", img)
    data = load_prepared(prepare_labeled(str(tmp_path / "out"), root=str(tmp_path / "set"),
                                         img_size=32))
    assert data.images.min() >= 195


def test_labeled_csv_header_relative_paths_and_remap(tmp_path):
    paths = make_labeled(tmp_path / "set")
    rel = [os.path.relpath(p, tmp_path) for p in paths]
    lines = ["path,label"] + [f"{p},{label}" for p, label in zip(rel, ["10", "9", "10", "9", "3"])]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n\n")
    data = check_format(prepare_labeled(str(tmp_path / "out"), csv_path=str(tmp_path / "list.csv"),
                                        img_size=16), 5, 16, 3)
    assert data.label_names == ["3", "9", "10"] and data.labels.tolist() == [2, 1, 2, 1, 0]


def test_labeled_csv_missing_path(tmp_path):
    paths = make_labeled(tmp_path / "set")
    (tmp_path / "list.csv").write_text(f"{paths[0]},a\nset/nowhere.png,b\n{paths[1]},b\n")
    with pytest.raises(UserError, match=r"1 of 3 images are missing: .*nowhere\.png "
                                        r"\(no such file\).*--skip_bad"):
        prepare_labeled(str(tmp_path / "out"), csv_path=str(tmp_path / "list.csv"))
    assert not os.path.exists(tmp_path / "out")
    data = load_prepared(prepare_labeled(str(tmp_path / "out"), csv_path=str(tmp_path / "list.csv"),
                                         img_size=16, skip_bad=True))
    assert len(data) == 2 and data.meta["skipped"] == 1


def test_labeled_csv_bad_row(tmp_path):
    (tmp_path / "list.csv").write_text("a.png,x,extra\n")
    with pytest.raises(UserError, match=r"list\.csv:1: expected 'path,label'"):
        prepare_labeled(str(tmp_path / "out"), csv_path=str(tmp_path / "list.csv"))


def test_labeled_needs_exactly_one_source(tmp_path):
    with pytest.raises(UserError, match="exactly one of --root"):
        prepare_labeled(str(tmp_path / "out"))


def test_undecodable_file_reported_or_skipped(tmp_path, capsys):
    make_labeled(tmp_path / "set")
    (tmp_path / "set" / "b" / "1.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"1 of 5 images are unusable: .*1\.png \(cannot be decoded"
                                        r"\).*--skip_bad"):
        prepare_labeled(str(tmp_path / "out"), root=str(tmp_path / "set"), img_size=16)
    assert not os.path.exists(tmp_path / "out")  # no partial files or new folder left behind
    out = prepare_labeled(str(tmp_path / "out"), root=str(tmp_path / "set"), img_size=16,
                          skip_bad=True)
    data = check_format(out, 4, 16, 2)
    assert "warning: left out 1 of 5 unusable images" in capsys.readouterr().err
    # rows stay aligned with their labels after the skipped row is cut out
    expected = [colours(5)[i] for i in (3, 4, 0, 2)]
    assert np.array_equal(data.images[:, 0, 0], np.array(expected, np.uint8))
    assert data.labels.tolist() == [0, 0, 1, 1]


PREPARE = {"ffhq": prepare_ffhq, "celeba": prepare_celeba_identities, "afhq": prepare_afhq,
           "celebahq": prepare_celebahq, "labeled": prepare_labeled}


@pytest.mark.parametrize("name", list(PREPARE))
def test_missing_root(tmp_path, name):
    kwargs = dict(root=str(tmp_path / "nowhere"), dest=str(tmp_path / "out"))
    if name == "celeba":
        kwargs["identities"] = str(tmp_path / "ids.txt")
    with pytest.raises(UserError, match="does not exist"):
        PREPARE[name](**kwargs)
    assert not os.path.exists(tmp_path / "out")


def test_refuses_foreign_dest_but_replaces_prepared(tmp_path):
    make_labeled(tmp_path / "set")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to write into .*notes.txt"):
        prepare_labeled(str(tmp_path / "busy"), root=str(tmp_path / "set"))
    demo = make_demo_labeled(str(tmp_path / "out"), n=6, size=16)
    assert load_prepared(demo).masks is not None
    good = (tmp_path / "set" / "b" / "0.png").read_bytes()
    (tmp_path / "set" / "b" / "0.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="unusable"):  # a failed preparation keeps the old set
        prepare_labeled(demo, root=str(tmp_path / "set"), img_size=16)
    check_format(demo, 6, 16, 3, masks=True)
    (tmp_path / "set" / "b" / "0.png").write_bytes(good)
    data = check_format(prepare_labeled(demo, root=str(tmp_path / "set"), img_size=16), 5, 16, 2)
    assert data.masks is None  # the old masks.npy went with the old dataset


def test_interrupted_preparation_leaves_no_complete_folder(tmp_path, monkeypatch):
    make_labeled(tmp_path / "set")
    calls = []

    def flaky(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return read_image(path)
    monkeypatch.setattr("data.read_image", flaky)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        prepare_labeled(str(tmp_path / "out"), root=str(tmp_path / "set"), img_size=16)
    assert os.listdir(tmp_path / "out") == []
    with pytest.raises(UserError, match="has no images.npy"):
        load_prepared(str(tmp_path / "out"))


def test_leftover_partials_mean_interrupted(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "images.npy.partial").write_bytes(b"")
    with pytest.raises(UserError, match="interrupted"):
        load_prepared(str(tmp_path / "out"))
    make_labeled(tmp_path / "set")  # a leftover does not block a new preparation
    check_format(prepare_labeled(str(tmp_path / "out"), root=str(tmp_path / "set"), img_size=16),
                 5, 16, 2)


def test_remap_labels_non_contiguous():
    labels, names = remap_labels([7, 2, 7, 9], name=lambda v: f"v{v}")
    assert labels.tolist() == [1, 0, 1, 2] and labels.dtype == np.int64
    assert names == ["v2", "v7", "v9"]


# ------------------------------------------------------------------------------------------------
# load_prepared

@pytest.fixture
def demo(tmp_path):
    """A small demo set with masks."""
    return make_demo_labeled(str(tmp_path / "demo"), n=9, size=32)


def test_load_missing_folder(tmp_path):
    with pytest.raises(UserError, match="no such folder.*--dest"):
        load_prepared(str(tmp_path / "nowhere"))


def test_load_missing_images(demo):
    os.remove(os.path.join(demo, "images.npy"))
    with pytest.raises(UserError, match="has no images.npy"):
        load_prepared(demo)


def test_load_label_count_mismatch(demo):
    np.save(os.path.join(demo, "labels.npy"), np.zeros(8, np.int64))
    with pytest.raises(UserError, match="8 labels but images.npy holds 9 images"):
        load_prepared(demo)


def test_load_label_out_of_range(demo):
    np.save(os.path.join(demo, "labels.npy"), np.full(9, 3, np.int64))
    with pytest.raises(UserError, match=r"outside 0\.\.2"):
        load_prepared(demo)


def test_load_mask_count_and_size_mismatch(demo):
    np.save(os.path.join(demo, "masks.npy"), np.zeros((8, 32, 32), np.uint8))
    with pytest.raises(UserError, match="8 masks but images.npy holds 9"):
        load_prepared(demo)
    np.save(os.path.join(demo, "masks.npy"), np.zeros((9, 16, 16), np.uint8))
    with pytest.raises(UserError, match="16x16 but the images are 32x32"):
        load_prepared(demo)


def test_load_missing_meta(demo):
    os.remove(os.path.join(demo, "meta.json"))
    with pytest.raises(UserError, match="has no meta.json"):
        load_prepared(demo)


# ------------------------------------------------------------------------------------------------
# Dataset

def test_dataset_keys_and_ranges(demo):
    data = LabelledImages(demo)
    sample = data[4]
    assert set(sample) == {"img", "label", "index"}
    assert sample["img"].shape == (3, 32, 32) and sample["img"].dtype == torch.float32
    assert 0 <= sample["img"].min() and sample["img"].max() <= 1 and sample["img"].max() > 0.5
    assert sample["label"].dtype == torch.int64 and sample["index"].item() == 4
    assert sample["label"].item() == load_prepared(demo).labels[4]
    expected = torch.from_numpy(np.array(load_prepared(demo).images[4])).permute(2, 0, 1) / 255
    assert torch.allclose(sample["img"], expected)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4, num_workers=1)))
    assert batch["img"].shape == (4, 3, 32, 32) and batch["label"].shape == (4,)


def test_dataset_pose_invariant_augmentation(demo):
    data = LabelledImages(demo, augment=dict(scale=(0.6, 1.0), rotation=0, flip_horizontal=True))
    sample = data[0]
    assert set(sample) == {"img", "label", "index", "img_augmented"}
    view = sample["img_augmented"]
    assert view.shape == (3, 32, 32) and 0 <= view.min() and view.max() <= 1
    torch.manual_seed(0)
    views = [data[0]["img_augmented"] for _ in range(4)]
    assert any(not torch.equal(views[0], v) for v in views[1:])  # random each time


def test_dataset_localized_masks_before_augmentation(demo):
    data = LabelledImages(demo, augment=dict(scale=(1.0, 1.0), flip_horizontal=False),
                          with_masks=True)
    sample = data[1]
    assert set(sample) == {"img", "label", "index", "img_augmented", "img_masked", "mask"}
    outside = sample["mask"][0] == 0
    assert outside.any() and (~outside).any()
    assert sample["img_masked"][:, outside].abs().max() == 0
    assert torch.equal(sample["img_masked"][:, ~outside], sample["img"][:, ~outside])
    assert sample["img_augmented"][:, outside].abs().max() == 0  # full crop, no flip: same view


def test_dataset_without_masks_refuses_localized(tmp_path):
    folder = make_demo_labeled(str(tmp_path / "plain"), n=3, size=16, masks=False)
    with pytest.raises(UserError, match="no masks.npy"):
        LabelledImages(folder, with_masks=True)


def test_dataset_pickles_without_image_data(demo):
    data = LabelledImages(demo, with_masks=True)
    data[0]  # opens the memory maps
    blob = pickle.dumps(data)
    assert len(blob) < 9 * 32 * 32 * 3
    assert torch.equal(pickle.loads(blob)[2]["img"], data[2]["img"])


# ------------------------------------------------------------------------------------------------
# Demo set

def test_demo_labels_masks_and_reuse(tmp_path, monkeypatch):
    folder = make_demo_labeled(str(tmp_path / "demo"), n=12, size=32)
    data = check_format(folder, 12, 32, 3, masks=True)
    assert data.label_names == ["black", "blonde", "red"]
    assert np.bincount(data.labels).tolist() == [4, 4, 4]
    for i in range(12):  # masked pixels carry the label's hair colour
        hair = HAIR_COLOURS[DEMO_HAIR[data.label_names[data.labels[i]]]]
        inside = data.images[i][data.masks[i] == 1].astype(int)
        assert len(inside) > 20
        assert np.abs(np.median(inside, axis=0) - hair).max() <= 2
    monkeypatch.setattr("data.draw_face", lambda *a, **k: pytest.fail("redrawn"))
    assert make_demo_labeled(str(tmp_path / "demo"), n=12, size=32) == folder
    monkeypatch.undo()
    make_demo_labeled(str(tmp_path / "demo"), n=6, size=32)  # other settings: redrawn
    assert len(load_prepared(folder)) == 6


# ------------------------------------------------------------------------------------------------
# Command line

def test_cli_registry_and_defaults(tmp_path, capsys):
    parser = make_parser()
    args = parser.parse_args(["celeba", "--root", "r", "--identities", "i", "--dest", "d"])
    assert (args.crop_size, args.img_size, args.n_identities, args.seed) == (128, 128, None, 0)
    args = parser.parse_args(["afhq", "--root", "r", "--dest", "d"])
    assert args.split == "train" and args.img_size == 256 and args.skip_bad is False
    args = parser.parse_args(["labeled", "--csv", "x.csv", "--dest", "d"])
    assert args.csv_path == "x.csv" and args.root is None and args.img_size == 64
    make_labeled(tmp_path / "set")
    main(["labeled", "--root", str(tmp_path / "set"), "--dest", str(tmp_path / "out"),
          "--img_size", "16"])
    assert "5 images of 16 px, 2 labels (label)" in capsys.readouterr().out
    main(["demo_labeled", "--dest", str(tmp_path / "demo"), "--n", "3", "--size", "16",
          "--no-masks"])
    assert "3 images of 16 px, 3 labels (hair_colour)" in capsys.readouterr().out


def write_attributes(path, names):
    """A list_attr_celeba.txt for `names` in which every other image is Bald."""
    rows = [f"{name} " + " ".join("1" if j == 4 and i % 2 == 0 else "-1" for j in range(40))
            for i, name in enumerate(names)]
    path.write_text(f"{len(names)}\n{' '.join(CELEBA_ATTRIBUTES)}\n" + "\n".join(rows) + "\n")
    return str(path)


def test_celeba_serves_both_methods(tmp_path, monkeypatch, capsys):
    root = make_celeba(tmp_path / "celeba")
    img, ids = str(root / "img"), str(root / "identity_CelebA.txt")
    main(["celeba", "--root", img, "--identities", ids, "--dest", str(tmp_path / "ol"),
          "--crop_size", "32", "--img_size", "16"])
    assert "6 images of 16 px, 3 labels (identity)" in capsys.readouterr().out
    check_format(str(tmp_path / "ol"), 6, 16, 3)

    attrs = write_attributes(tmp_path / "list_attr_celeba.txt",
                             [f"{i + 1:06d}.png" for i in range(6)])
    monkeypatch.chdir(tmp_path)  # --attributes without --dest writes the CD lists into ./bald
    main(["celeba", "--root", img, "--attributes", attrs, "--attr", "Bald", "--num_test_imgs", "1"])
    paths = domain_paths("bald")
    assert [len(paths[s]) for s in ("trainA", "testA", "trainB", "testB")] == [2, 1, 2, 1]

    for both_or_neither in (["--attributes", attrs, "--identities", ids], []):
        with pytest.raises(UserError, match="exactly one of --attributes .* or --identities"):
            main(["celeba", "--root", img, "--dest", "x", *both_or_neither])
    with pytest.raises(UserError, match="--identities needs --dest"):
        main(["celeba", "--root", img, "--identities", ids])
    r = run_script("data.py", "celeba", "--root", img)
    assert r.returncode == 2 and "--attributes" in r.stderr and "--identities" in r.stderr


def test_attribute_file_errors_name_the_line(tmp_path):
    (tmp_path / "attrs.txt").write_text("2\nBald Male\n000001.jpg 1 -1\n000002.jpg 1\n")
    with pytest.raises(UserError, match=r"attrs\.txt:4: expected an image name and 2 values"):
        list(read_attributes(str(tmp_path / "attrs.txt")))


# ------------------------------------------------------------------------------------------------
# Exact, worker-independent augmentation: (index, seed) items and the sampler that makes them

AUGMENT = dict(scale=(0.3, 1.0), rotation=10, flip_horizontal=True)


def test_seeded_item_is_exact_and_leaves_the_global_rng(demo):
    data = LabelledImages(demo, augment=AUGMENT, with_masks=True)
    state = torch.get_rng_state()
    first = data[(3, 1234)]
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator is untouched
    torch.manual_seed(99)  # whatever the global state is, the item's seed alone decides
    again = data[(np.int64(3), np.int64(1234))]
    assert set(first) == set(again) == {"img", "label", "index", "img_masked", "mask",
                                        "img_augmented"}
    for key in first:
        assert torch.equal(first[key], again[key]), key
    views = [data[(3, seed)]["img_augmented"] for seed in range(5)]
    assert any(not torch.equal(views[0], view) for view in views[1:])
    assert torch.equal(data[3]["img"], first["img"])  # plain int indices still work


def test_seeded_items_do_not_depend_on_workers(demo):
    data = LabelledImages(demo, augment=AUGMENT)
    batches = [[(i, 1000 + i) for i in range(start, start + 3)] for start in (0, 3, 6)]
    expected = torch.stack([data[item]["img_augmented"] for batch in batches for item in batch])
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=workers)
        got = torch.cat([batch["img_augmented"] for batch in loader])
        assert torch.equal(got, expected), f"{workers} workers"


def test_endless_batches_seeds_short_tail_and_resume():
    batches = iter(EndlessBatches(5, 2, seed=7, drop_last=False, item_seeds=True))
    epoch = [next(batches) for _ in range(3)]
    assert [len(b) for b in epoch] == [2, 2, 1]  # the short tail is kept
    assert sorted(i for b in epoch for i, _ in b) == [0, 1, 2, 3, 4]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for b in epoch for _, s in b)
    later = [next(batches) for _ in range(3)]
    assert later != epoch  # a new order and new seeds every epoch
    resumed = iter(EndlessBatches(5, 2, seed=7, start=4, drop_last=False, item_seeds=True))
    assert next(resumed) == later[1]
    # the CD default is unchanged: (index, flip) from the same draws, the tail dropped
    rng = np.random.default_rng([7, 0])
    order, flips = rng.permutation(5), rng.random(5) < 0.5
    cd = iter(EndlessBatches(5, 2, seed=7))
    assert [next(cd) for _ in range(2)] == [[(int(i), bool(flips[i])) for i in order[b:b + 2]]
                                            for b in (0, 2)]
    with pytest.raises(ValueError):
        EndlessBatches(1, 2, seed=0)
    assert len(next(iter(EndlessBatches(1, 2, seed=0, drop_last=False)))) == 1


def test_endless_loader_gives_labelled_images_seeded_items(demo):
    data = LabelledImages(demo, augment=AUGMENT)
    batch = next(endless_loader(data, 4, seed=1, start=0, workers=0, drop_last=False))
    items = next(iter(EndlessBatches(9, 4, 1, drop_last=False, item_seeds=True)))
    assert batch["index"].tolist() == [i for i, _ in items]
    assert torch.equal(batch["img_augmented"],
                       torch.stack([data[item]["img_augmented"] for item in items]))


# ------------------------------------------------------------------------------------------------
# Helpers shared with the CD code

def test_list_images_and_read_image(tmp_path):
    for name in ("img10.png", "img2.png", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"not an image")
    names = [os.path.basename(p) for p in list_images(str(tmp_path))]
    assert names == ["img10.png", "img2.png"]  # CD order: plain names
    names = [os.path.basename(p) for p in list_images(str(tmp_path), key=natural_key)]
    assert names == ["img2.png", "img10.png"]
    assert read_image(str(tmp_path / "img2.png")) is None
    assert read_image(str(tmp_path)) is None and read_image(str(tmp_path / "none.png")) is None
