"""Bad input to ``ugi-register``: one clear line on stderr, the BIDS-App exit code, no traceback,
and no output left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests import realdata
from ugi_bids.engine import cli_register
from ugi_bids.engine.volume import load_volume

NETWORK_SIZE = 68


@pytest.fixture(scope="module")
def good_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "brain.nii.gz"
    brain = realdata.downsampled(load_volume(realdata.mni2009c_brain_path()), 4.0)
    nib.save(brain.to_nifti(), path)
    return str(path)


def _write(folder, name, data, affine=None):
    path = folder / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return str(path)


def _run(args, folder):
    """Run the console entry point in a subprocess (as a user would) from ``folder``."""
    command = [sys.executable, "-m", "ugi_bids.engine.cli_register", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=300)


def _assert_clean_failure(result, code, folder, phrase):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and phrase in lines[0].lower(), result.stderr
    leftovers = [p for p in os.listdir(folder / "out")] if (folder / "out").exists() else []
    assert leftovers == []


def _args(fixed, moving, weights, prefix="out/pair"):
    return ["--fixed", fixed, "--moving", moving, "--fixed-modality", "mri",
            "--moving-modality", "mri", "--out-prefix", prefix, "--weights", weights,
            "--network-size", str(NETWORK_SIZE), "--io-iterations", "0"]


@pytest.mark.parametrize("case, code, phrase", [
    ("constant", 65, "constant"),
    ("nan", 65, "nan"),
    ("four_d", 65, "3d volume"),
    ("missing", 66, "not found"),
    ("corrupt", 65, "cannot read"),
])
def test_bad_images_are_refused(tmp_path, good_image, random_checkpoint, case, code, phrase):
    shape = (20, 22, 24)
    if case == "constant":
        bad = _write(tmp_path, "bad.nii.gz", np.full(shape, 7.0, np.float32))
    elif case == "nan":
        data = np.random.default_rng(0).random(shape).astype(np.float32)
        data[3, 4, 5] = np.nan
        bad = _write(tmp_path, "bad.nii.gz", data)
    elif case == "four_d":
        bad = _write(tmp_path, "bad.nii.gz", np.random.default_rng(0).random(shape + (3,)).astype(np.float32))
    elif case == "missing":
        bad = str(tmp_path / "does_not_exist.nii.gz")
    else:
        bad = str(tmp_path / "bad.nii.gz")
        with open(good_image, "rb") as source:
            payload = source.read()
        with open(bad, "wb") as target:
            target.write(payload[: len(payload) // 3])
    result = _run(_args(good_image, bad, random_checkpoint), tmp_path)
    _assert_clean_failure(result, code, tmp_path, phrase)


def test_wrong_weights_are_refused(tmp_path, good_image):
    truncated = tmp_path / "Step_2_final.trch"
    truncated.write_bytes(b"PK\x03\x04 not really a checkpoint")
    result = _run(_args(good_image, good_image, str(truncated)), tmp_path)
    _assert_clean_failure(result, 66, tmp_path, "truncated or not a unigradicon checkpoint")


def test_missing_weights_name_the_url_and_the_fetch_command(tmp_path, good_image, monkeypatch):
    env = dict(os.environ, UGI_BIDS_HOME=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "ugi_bids.engine.cli_register", "--fixed", good_image,
               "--moving", good_image, "--fixed-modality", "mri", "--moving-modality", "mri",
               "--out-prefix", "out/pair"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    _assert_clean_failure(result, 66, tmp_path, "ugi-bids-weights fetch unigradicon")
    assert "https://github.com/uncbiag/uniGradICON/releases" in result.stderr


def test_a_failure_after_some_outputs_leaves_nothing(tmp_path, good_image, random_checkpoint,
                                                     monkeypatch):
    def broken_warp(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("ugi_bids.engine.warp.apply_transform", broken_warp)
    monkeypatch.chdir(tmp_path)
    code = cli_register.main(_args(good_image, good_image, random_checkpoint) + ["-q"])
    assert code == 1
    assert os.listdir(tmp_path / "out") == []


def test_uncreatable_output_folder_exits_73(tmp_path, good_image, random_checkpoint):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    result = _run(_args(good_image, good_image, random_checkpoint, prefix="out/sub/pair"), tmp_path)
    assert result.returncode == 73, result.stderr
    assert "Traceback" not in result.stderr
