"""Shared fixtures: tiny synthetic two-domain datasets and CLI runners."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import draw_face, write_image  # noqa: E402

# a CD architecture small enough for tests: 16 px images, 4x4 codes of 32 channels
TINY_CD = ["--resize", "16", "--crop", "0", "--n_blocks", "1", "--n_tot_feats", "32",
           "--sep", "8", "--e2_feats", "8", "--n_enc_res_blocks", "1", "--n_res_blocks", "1",
           "--bs", "2", "--num_display", "3", "--n_threads", "0", "--device", "cpu"]


def make_two_domains(root, n_train=6, n_test=4, size=20, lists=False):
    """trainA/ trainB/ testA/ testB/ of drawn faces (A with glasses); optionally list files too."""
    rng = np.random.default_rng(0)
    for split in ("trainA", "trainB", "testA", "testB"):
        folder = os.path.join(root, split)
        os.makedirs(folder, exist_ok=True)
        count = n_train if split.startswith("train") else n_test
        paths = []
        for i in range(count):
            paths.append(os.path.join(folder, f"{i}.png"))
            write_image(paths[-1], draw_face(rng, size, glasses=split.endswith("A")))
        if lists:
            with open(os.path.join(root, f"{split}.txt"), "w") as f:
                f.write("\n".join(os.path.relpath(p, root) for p in paths))
    return str(root)


@pytest.fixture
def two_domains(tmp_path):
    return make_two_domains(tmp_path / "data")


def run_script(script, *args, cwd=ROOT):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)
