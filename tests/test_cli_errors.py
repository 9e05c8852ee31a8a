"""Bad input to ``ugi-register`` and ``ugi-warp``: one clear line on stderr, the BIDS-App exit
code, no traceback, and no output left behind; and the guard every console script runs under
(:func:`ugi_bids.errors.guarded`).

The error paths call ``main(argv)`` in this process (no workflow runs, so a subprocess would only
add an interpreter start); one subprocess per console script proves the installed entry point
reaches the same code and exit status."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests import realdata
from ugi_bids.cli import register as cli_register
from ugi_bids.engine.spatial.volume import load_volume
from ugi_bids.errors import (
    EXIT_CODES,
    InputDataError,
    MissingInputError,
    UgiError,
    guarded,
)

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


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def _assert_clean_failure(code, stderr, expected_code, folder, phrase, prog="ugi-register"):
    """Exit code, exactly one ``<prog>: error: ...`` line naming ``phrase``, no traceback, and
    nothing left in ``folder/out``."""
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert phrase in lines[0].lower(), lines[0]
    leftovers = os.listdir(folder / "out") if (folder / "out").exists() else []
    assert leftovers == []


def _args(fixed, moving, weights, prefix="out/pair"):
    return ["--fixed", fixed, "--moving", moving, "--fixed-modality", "mri",
            "--moving-modality", "mri", "--out-prefix", prefix, "--weights", weights,
            "--network-size", str(NETWORK_SIZE), "--io-iterations", "0", "-q"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from ``tmp_path`` (the relative output prefixes land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- ugi-register

@pytest.mark.parametrize("case, code, phrase", [
    ("constant", 65, "constant"),
    ("nan", 65, "nan"),
    ("four_d", 65, "3d volume"),
    ("missing", 66, "not found"),
    ("corrupt", 65, "truncated"),
])
def test_bad_images_are_refused(in_tmp, good_image, random_checkpoint, capsys, case, code,
                                phrase):
    shape = (20, 22, 24)
    if case == "constant":
        bad = _write(in_tmp, "bad.nii.gz", np.full(shape, 7.0, np.float32))
    elif case == "nan":
        data = np.random.default_rng(0).random(shape).astype(np.float32)
        data[3, 4, 5] = np.nan
        bad = _write(in_tmp, "bad.nii.gz", data)
    elif case == "four_d":
        bad = _write(in_tmp, "bad.nii.gz",
                     np.random.default_rng(0).random(shape + (3,)).astype(np.float32))
    elif case == "missing":
        bad = str(in_tmp / "does_not_exist.nii.gz")
    else:
        bad = str(in_tmp / "bad.nii.gz")
        payload = Path(good_image).read_bytes()
        Path(bad).write_bytes(payload[: len(payload) // 3])
    exit_code = cli_register.main(_args(good_image, bad, random_checkpoint))
    _assert_clean_failure(exit_code, capsys.readouterr().err, code, in_tmp, phrase)


def test_wrong_weights_are_refused(in_tmp, good_image, capsys):
    truncated = in_tmp / "Step_2_final.trch"
    truncated.write_bytes(b"PK\x03\x04 not really a checkpoint")
    exit_code = cli_register.main(_args(good_image, good_image, str(truncated)))
    _assert_clean_failure(exit_code, capsys.readouterr().err, 66, in_tmp,
                          "truncated or not a unigradicon checkpoint")


def test_missing_weights_name_the_url_and_the_fetch_command(in_tmp, good_image, capsys,
                                                            monkeypatch):
    monkeypatch.setenv("UGI_BIDS_HOME", str(in_tmp / "cache"))
    exit_code = cli_register.main(["--fixed", good_image, "--moving", good_image,
                                   "--fixed-modality", "mri", "--moving-modality", "mri",
                                   "--out-prefix", "out/pair"])
    stderr = capsys.readouterr().err
    _assert_clean_failure(exit_code, stderr, 66, in_tmp, "ugi-bids-weights fetch unigradicon")
    assert "https://github.com/uncbiag/uniGradICON/releases" in stderr


def test_a_failure_after_some_outputs_leaves_nothing(in_tmp, good_image, random_checkpoint,
                                                     capsys, monkeypatch):
    """The transforms are staged when resampling fails: nothing is renamed into place."""
    def broken_warp(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("ugi_bids.engine.spatial.warp.apply_transform", broken_warp)
    exit_code = cli_register.main(_args(good_image, good_image, random_checkpoint)
                                  + ["--prealign", "header"])
    stderr = capsys.readouterr().err
    assert exit_code == 1
    assert _error_lines(stderr) == [
        ("ugi-register: error: unexpected OSError: disk full (simulated) "
         "(set UGI_BIDS_DEBUG=1 for a traceback)")]
    assert os.listdir(in_tmp / "out") == []


def test_uncreatable_output_folder_exits_73(in_tmp, good_image, random_checkpoint, capsys):
    (in_tmp / "out").write_text("a file where the output folder should be")
    exit_code = cli_register.main(_args(good_image, good_image, random_checkpoint,
                                        prefix="out/sub/pair"))
    stderr = capsys.readouterr().err
    assert exit_code == 73, stderr
    assert "Traceback" not in stderr
    assert _error_lines(stderr) == [(f"ugi-register: error: cannot create output folder "
                                     f"{in_tmp / 'out' / 'sub'}: {in_tmp / 'out'} is not a "
                                     "folder")]
    assert (in_tmp / "out").read_text() == "a file where the output folder should be"


def test_usage_errors_exit_2(in_tmp, good_image, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli_register.main(["--fixed", good_image, "--moving", good_image,
                           "--fixed-modality", "xray", "--moving-modality", "mri",
                           "--out-prefix", "out/pair"])
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    assert "argument --fixed-modality" in stderr and "invalid choice: 'xray'" in stderr
    assert not (in_tmp / "out").exists()


def test_prealign_dof_outside_its_choices_exits_2(in_tmp, good_image, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli_register.main(["--fixed", good_image, "--moving", good_image,
                           "--fixed-modality", "mri", "--moving-modality", "mri",
                           "--out-prefix", "out/pair", "--prealign-dof", "5"])
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    assert "argument --prealign-dof: invalid choice: 5 (choose from 6, 7, 9, 12)" in stderr
    assert not (in_tmp / "out").exists()
    assert cli_register.build_parser().parse_args(
        ["--fixed", "f", "--moving", "m", "--fixed-modality", "mri", "--moving-modality", "mri",
         "--out-prefix", "p"]).prealign_dof == 12


# --------------------------------------------------------------------------- ugi-warp

def _warp_args(reference, moving, out, *extra):
    return ["--fixed", reference, "--moving", moving, "--out", out, *extra]


def test_warp_missing_transform_exits_66(in_tmp, good_image, capsys):
    exit_code = cli_register.warp_main(_warp_args(good_image, good_image, "out/warped.nii.gz",
                                                  "--transform", "no_such_xfm.h5"))
    _assert_clean_failure(exit_code, capsys.readouterr().err, 66, in_tmp, "no_such_xfm.h5",
                          prog="ugi-warp")


def test_warp_corrupt_transform_exits_65(in_tmp, good_image, capsys):
    corrupt = in_tmp / "xfm.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n but nothing after the signature")
    exit_code = cli_register.warp_main(_warp_args(good_image, good_image, "out/warped.nii.gz",
                                                  "--transform", str(corrupt)))
    _assert_clean_failure(exit_code, capsys.readouterr().err, 65, in_tmp,
                          "cannot read transform file", prog="ugi-warp")


def test_warp_4d_moving_image_exits_65(in_tmp, good_image, capsys):
    bad = _write(in_tmp, "bad.nii.gz", np.ones((8, 9, 10, 2), np.float32))
    exit_code = cli_register.warp_main(_warp_args(good_image, bad, "out/warped.nii.gz"))
    _assert_clean_failure(exit_code, capsys.readouterr().err, 65, in_tmp, "3d volume",
                          prog="ugi-warp")


def test_warp_identity_writes_the_image(in_tmp, good_image, capsys):
    """The one success path of ``ugi-warp`` here: identity onto its own grid."""
    assert cli_register.warp_main(_warp_args(good_image, good_image, "out/warped.nii.gz")) == 0
    assert capsys.readouterr().err == ""
    assert os.listdir(in_tmp / "out") == ["warped.nii.gz"]
    warped = nib.load(in_tmp / "out" / "warped.nii.gz")
    original = nib.load(good_image)
    assert np.allclose(warped.affine, original.affine, atol=1e-6)
    assert np.abs(warped.get_fdata() - original.get_fdata()).max() <= 1e-5


# --------------------------------------------------------------------------- installed scripts

def _console_script(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"console script {name} is not installed (pip install -e .)")
    return path


def test_ugi_register_entry_point_is_installed(tmp_path, good_image):
    """The installed ``ugi-register`` reaches ``main`` and returns its exit status."""
    missing = str(tmp_path / "missing.nii.gz")
    result = subprocess.run(
        [_console_script("ugi-register"), "--fixed", missing, "--moving", good_image,
         "--fixed-modality", "mri", "--moving-modality", "mri", "--out-prefix", "out/pair"],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    _assert_clean_failure(result.returncode, result.stderr, 66, tmp_path, "not found")
    assert missing in _error_lines(result.stderr)[0]


def test_ugi_warp_entry_point_is_installed(tmp_path, good_image):
    """The installed ``ugi-warp`` reaches ``warp_main`` and returns its exit status."""
    missing = str(tmp_path / "missing.nii.gz")
    result = subprocess.run(
        [_console_script("ugi-warp"), "--fixed", good_image, "--moving", missing,
         "--out", "out/warped.nii.gz"],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    _assert_clean_failure(result.returncode, result.stderr, 66, tmp_path, "not found",
                          prog="ugi-warp")


# --------------------------------------------------------------------------- guarded()

def _raise(error: BaseException):
    def action():
        raise error
    return action


@pytest.mark.parametrize("returned, code", [(None, 0), (0, 0), (3, 3)])
def test_guarded_returns_the_actions_code(capsys, returned, code):
    assert guarded("prog", lambda: returned) == code
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("error, code", [
    (UgiError("plain failure"), 1),
    (InputDataError("image is constant"), 65),
    (MissingInputError("file x not found"), 66),
])
def test_guarded_ugi_error_is_its_code_and_one_line(capsys, monkeypatch, error, code):
    monkeypatch.setenv("UGI_BIDS_DEBUG", "1")  # user errors never get a traceback
    assert guarded("prog", _raise(error)) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"prog: error: {error}\n"


def test_guarded_ugi_error_message_is_folded_to_one_line(capsys):
    error = InputDataError("ITK ERROR: ImageIO(0x55d0): cannot read\n  the file\n")
    assert guarded("prog", _raise(error)) == 65
    assert capsys.readouterr().err == "prog: error: cannot read the file\n"


def test_guarded_keyboard_interrupt_is_130(capsys):
    assert guarded("prog", _raise(KeyboardInterrupt())) == 130
    assert EXIT_CODES["interrupted"] == 130
    assert capsys.readouterr().err == "prog: error: interrupted\n"


def test_guarded_other_exception_is_one_line_and_1(capsys, monkeypatch):
    monkeypatch.delenv("UGI_BIDS_DEBUG", raising=False)
    assert guarded("prog", _raise(ValueError("bad\nvalue"))) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("prog: error: unexpected ValueError: bad value "
                            "(set UGI_BIDS_DEBUG=1 for a traceback)\n")


def test_guarded_other_exception_without_text_names_its_type(capsys, monkeypatch):
    monkeypatch.delenv("UGI_BIDS_DEBUG", raising=False)
    assert guarded("prog", _raise(RuntimeError())) == 1
    assert capsys.readouterr().err == ("prog: error: unexpected RuntimeError: RuntimeError "
                                       "(set UGI_BIDS_DEBUG=1 for a traceback)\n")


def test_guarded_other_exception_gives_the_traceback_with_ugi_bids_debug(capsys, monkeypatch):
    monkeypatch.setenv("UGI_BIDS_DEBUG", "1")
    error = ValueError("a bug")
    with pytest.raises(ValueError) as raised:
        guarded("prog", _raise(error))
    assert raised.value is error
    assert raised.traceback[-1].name == "action"  # the original traceback, not a new one
    assert capsys.readouterr().err == ""


def test_guarded_lets_system_exit_through(capsys):
    """argparse's ``--help``, ``--version`` and usage errors keep their own exit."""
    with pytest.raises(SystemExit) as stopped:
        guarded("prog", _raise(SystemExit(2)))
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ""


def test_guarded_debug_traceback_in_a_console_script(tmp_path, good_image):
    """End to end: a bug in ``ugi-warp`` prints one line, or the traceback when
    ``UGI_BIDS_DEBUG=1`` asks for it (same exit status 1 either way)."""
    probe = ("import sys; from ugi_bids.cli import register as r; "
             "r.run_warp = lambda args: 1 / 0; "
             f"sys.exit(r.warp_main(['--fixed', {good_image!r}, '--moving', {good_image!r}, "
             "'--out', 'w.nii.gz']))")
    env = {k: v for k, v in os.environ.items() if k != "UGI_BIDS_DEBUG"}
    quiet = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=120)
    assert quiet.returncode == 1
    assert quiet.stderr == ("ugi-warp: error: unexpected ZeroDivisionError: division by zero "
                            "(set UGI_BIDS_DEBUG=1 for a traceback)\n")
    loud = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True,
                          text=True, cwd=tmp_path, env=dict(env, UGI_BIDS_DEBUG="1"),
                          timeout=120)
    assert loud.returncode == 1
    assert loud.stderr.startswith("Traceback (most recent call last):")
    assert loud.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
