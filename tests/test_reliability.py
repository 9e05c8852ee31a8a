"""The reliability matrix: bad input, bad options, bad folders and failed steps, as a hostile new
user would try them, each held to the same four promises.

For every case:

- the documented exit code (README, "Exit codes");
- exactly one line on stderr at the default verbosity, ``<prog>: error: ...``, no traceback;
- nothing left in OUTPUT_DIR (nor in the work folder): the output folder is not even created.
  Node failures are the documented exception: OUTPUT_DIR then holds the top-level files and
  ``sub-<label>/log/<run>/`` with the crash file and the run's settings, nothing else;
- BIDS_DIR unchanged, byte for byte.

Cases that need no registration run in-process (``ugi_bids.cli.run.main``), so the matrix
stays fast. Folders that must be unwritable are made so for real: a read-only folder as an
unprivileged user (a forked child that drops root), a read-only mount in a private mount
namespace (``unshare``). The dead-worker case (a registration worker killed with SIGKILL) runs
for real in ``tests/test_dead_worker.py``; the load test (8 participants, two concurrent runs,
a ``kill -9`` and a resume) is ``benchmarks/load_test.py``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from tests import realdata
from tests.bidsdata import make_templateflow_home
from tests.checkpoints import write_random_checkpoint
from tests.inprocess import run_in_process
from ugi_bids.cli import register as cli_register
from ugi_bids.cli import run as cli_run
from ugi_bids.engine.spatial.volume import load_volume

SPACE = "MNI152NLin2009cAsym"
NOBODY = 65534


# --------------------------------------------------------------------------------------------
# The site: a TemplateFlow home, weights and a good image, in a folder any user can read
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(monkeypatch_module):
    # not pytest's tmp_path: /tmp/pytest-of-root is private, and some cases run unprivileged
    root = Path(tempfile.mkdtemp(prefix="ugi-bids-reliability-"))
    root.chmod(0o755)
    templateflow = make_templateflow_home(root / "templateflow")
    weights = write_random_checkpoint(root / "Step_2_final.trch", seed=3, lastconv_scale=0.3)
    good = realdata.downsampled(load_volume(realdata.fsl_mni_brain_path()), 3.0)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch_module.setenv("TEMPLATEFLOW_HOME", str(templateflow))
    monkeypatch_module.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")
    monkeypatch_module.setenv("UGI_BIDS_HOME", str(root / "empty-cache"))
    yield {"root": root, "weights": Path(weights), "good": good}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture
def case_dir(site, request):
    folder = Path(tempfile.mkdtemp(prefix="case-", dir=site["root"]))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:  # read-only cases: make removable again
        with contextlib.suppress(OSError):
            path.chmod(0o755 if path.is_dir() and not path.is_symlink() else 0o644)
    shutil.rmtree(folder, ignore_errors=True)


def save(volume_or_image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = volume_or_image.to_nifti() if hasattr(volume_or_image, "to_nifti") else volume_or_image
    nib.save(image, path)
    return path


def make_dataset(folder: Path, images: dict[str, object]) -> Path:
    """A raw BIDS dataset: ``images`` maps paths (relative to the dataset) to a Volume, a
    nibabel image, bytes, or None (an empty folder)."""
    bids = folder / "bids"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "reliability", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    for relative, content in images.items():
        path = bids / relative
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        elif isinstance(content, bytes):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        else:
            save(content, path)
    return bids


def checksums(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def as_unprivileged(function: Callable[[], tuple[int, str]]) -> tuple[int, str]:
    """``function()`` as an unprivileged user: a forked child that drops root (uid/gid 65534),
    so that a read-only folder is read-only; run as is when this is not root."""
    if os.geteuid() != 0:
        return function()
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def child():
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            queue.put(function())
        except BaseException as exc:  # noqa: BLE001 (reported to the parent)
            queue.put((-1, f"child failed: {exc!r}"))

    process = context.Process(target=child)
    process.start()
    result = queue.get(timeout=300)
    process.join(timeout=60)
    return result


def app_args(bids: Path, out: Path, *extra) -> list:
    return [bids, out, "participant", "-w", out.parent / "work", "--output-spaces", SPACE,
            "--weights", WEIGHTS_PLACEHOLDER, "--sloppy", "--io-iterations", "0",
            "--device", "cpu", "--nprocs", "1", *extra]


WEIGHTS_PLACEHOLDER = "@weights"


def resolved(argv: list, site: dict) -> list:
    return [site["weights"] if arg == WEIGHTS_PLACEHOLDER else arg for arg in argv]


def assert_clean_failure(code: int, stderr: str, expected: int, phrase: str, *,
                         out: Path, work: Path | None, bids: Path | None, before: dict | None,
                         prog: str = "ugi-bids") -> str:
    """The matrix's four promises for a run that must fail before writing anything."""
    assert code == expected, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert phrase.lower() in lines[0].lower(), lines[0]
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    if work is not None:
        assert not work.exists(), sorted(work.rglob("*"))
    if bids is not None:
        assert checksums(bids) == before
    return lines[0]


# --------------------------------------------------------------------------------------------
# Bad images (a dataset whose only participant has one)
# --------------------------------------------------------------------------------------------

def _image(volume, data=None, affine=None) -> nib.Nifti1Image:
    image = nib.Nifti1Image(volume.data if data is None else data,
                            volume.grid.affine if affine is None else affine)
    image.set_qform(image.affine, code=1)
    return image


def _gz_bytes(image: nib.Nifti1Image) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.nii.gz"
        nib.save(image, path)
        return path.read_bytes()


def _with_header(image: nib.Nifti1Image, **fields) -> bytes:
    """``image`` as .nii.gz bytes with raw header fields set after nibabel's own fixes."""
    raw = bytearray(gzip.decompress(_gz_bytes(image)))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)), check=False)
    for name, value in fields.items():
        if name == "shape":
            header.set_data_shape(value)
        elif name == "pixdim":
            header["pixdim"][1:4] = value
        else:
            header[name] = value
    raw[:348] = header.binaryblock
    return gzip.compress(bytes(raw))


def _bad_images(good) -> dict[str, Callable[[], object]]:
    data = good.data
    return {
        "corrupt": lambda: b"\x1f\x8b" + bytes(range(256)) * 40,
        "empty": lambda: b"",
        "truncated": lambda: _gz_bytes(_image(good))[:4000],
        "4d": lambda: _image(good, np.stack([data, data], axis=-1)),
        "nan": lambda: _image(good, np.where(data > data.max() / 2, np.nan, data)),
        "singular_affine": lambda: _with_header(_image(good), srow_x=[0, 0, 0, 0],
                                                srow_y=[0, 0, 0, 0], srow_z=[0, 0, 0, 0],
                                                qform_code=0, sform_code=1),
        "two_d": lambda: _image(good, data[:, :, data.shape[2] // 2:data.shape[2] // 2 + 1]),
        "thin_slab": lambda: _image(good, data[:, :, 30:35]),  # 5 slices of 3 mm: 15 mm
        "constant": lambda: _image(good, np.full(data.shape, 300.0, np.float32)),
        "no_orientation": lambda: _with_header(_image(good), sform_code=0, qform_code=0),
        "negative_voxel_size": lambda: _with_header(_image(good), sform_code=0,
                                                    pixdim=[3.0, -3.0, 3.0]),
        "huge_declared_shape": lambda: _with_header(_image(good), shape=(2000, 2000, 2000)),
        "declared_shape_past_the_data": lambda: _with_header(_image(good), shape=(70, 80, 90)),
    }


BAD_IMAGE_CASES = [
    ("corrupt", "cannot read"),
    ("empty", "cannot read"),
    ("truncated", "truncated"),
    ("4d", "must be a 3D volume"),
    ("nan", "NaN"),
    ("singular_affine", "singular"),
    ("two_d", "not a 3-D volume that can be registered"),
    ("thin_slab", "not a 3-D volume that can be registered"),
    ("constant", "no contrast"),
    ("no_orientation", "no orientation"),
    ("negative_voxel_size", "negative"),
    ("huge_declared_shape", "cannot hold"),
    ("declared_shape_past_the_data", "truncated"),
]


@pytest.mark.parametrize("case, phrase", BAD_IMAGE_CASES, ids=[c[0] for c in BAD_IMAGE_CASES])
def test_bad_image_exits_65_before_writing(site, case_dir, case, phrase):
    bids = make_dataset(case_dir, {"sub-01/anat/sub-01_T1w.nii.gz":
                                   _bad_images(site["good"])[case]()})
    before, out = checksums(bids), case_dir / "ugi-bids"
    code, stderr = run_in_process(cli_run.main, resolved(app_args(bids, out), site))
    line = assert_clean_failure(code, stderr, 65, phrase, out=out, work=case_dir / "work",
                                bids=bids, before=before)
    assert "no participant could be processed: sub-01: " in line


def test_an_image_larger_than_mem_exits_65(site, case_dir):
    bids = make_dataset(case_dir, {"sub-01/anat/sub-01_T1w.nii.gz": site["good"]})
    before, out = checksums(bids), case_dir / "ugi-bids"
    code, stderr = run_in_process(cli_run.main,
                                  resolved(app_args(bids, out, "--mem", "1M"), site))
    assert_clean_failure(code, stderr, 65, "more than the", out=out, work=case_dir / "work",
                         bids=bids, before=before)


def test_every_participant_bad_names_the_first_and_counts_the_rest(site, case_dir):
    bad = _bad_images(site["good"])
    bids = make_dataset(case_dir, {"sub-01/anat/sub-01_T1w.nii.gz": bad["constant"](),
                                   "sub-02/anat/sub-02_T1w.nii.gz": bad["two_d"]()})
    before, out = checksums(bids), case_dir / "ugi-bids"
    code, stderr = run_in_process(cli_run.main, resolved(app_args(bids, out), site))
    assert_clean_failure(code, stderr, 65, "sub-01: T1w image", out=out,
                         work=case_dir / "work", bids=bids, before=before)
    assert "(and 1 more participant(s))" in stderr


def test_stop_on_first_crash_stops_at_the_first_bad_image(site, case_dir):
    bids = make_dataset(case_dir, {
        "sub-01/anat/sub-01_T1w.nii.gz": _bad_images(site["good"])["two_d"](),
        "sub-02/anat/sub-02_T1w.nii.gz": site["good"]})
    before, out = checksums(bids), case_dir / "ugi-bids"
    code, stderr = run_in_process(
        cli_run.main, resolved(app_args(bids, out, "--stop-on-first-crash"), site))
    assert_clean_failure(code, stderr, 65, "stopping: --stop-on-first-crash", out=out,
                         work=case_dir / "work", bids=bids, before=before)


# --------------------------------------------------------------------------------------------
# Selection, dataset, options, weights
# --------------------------------------------------------------------------------------------

def _evil_weights(path: Path, marker: Path) -> Path:
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Payload()}, path)
    return path


@dataclass
class Case:
    name: str
    code: int
    phrase: str
    args: Callable = None  # (bids, out, site, folder) -> argv; default app_args
    images: dict = field(default_factory=lambda: {"sub-01/anat/sub-01_T1w.nii.gz": "good"})
    prepare: Callable = None  # (folder, site) -> None, before the run
    after: Callable = None  # (folder) -> None, extra checks


def _with(*extra):
    return lambda bids, out, site, folder: resolved(app_args(bids, out, *extra), site)


def _weights(make):
    def args(bids, out, site, folder):
        argv = resolved(app_args(bids, out), site)
        argv[argv.index(site["weights"])] = make(folder, site)
        return argv
    return args


def _truncated_weights(folder, site):
    path = folder / "truncated.trch"
    payload = site["weights"].read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    return path


def _empty_weights(folder, site):
    path = folder / "empty.trch"
    path.write_bytes(b"")
    return path


def _filter_file(content: str):
    def args(bids, out, site, folder):
        path = folder / "filters.json"
        path.write_text(content)
        return resolved(app_args(bids, out, "--bids-filter-file", path), site)
    return args


CASES = [
    Case("unknown_participant", 18, "participant label(s) not found",
         args=_with("--participant-label", "07")),
    Case("empty_anat_named", 18, "holds no BIDS image",
         images={"sub-01/anat/sub-01_T1w.nii.gz": "good", "sub-02/anat": None},
         args=_with("--participant-label", "02")),
    Case("filter_selects_nothing", 18, "no usable anatomical image",
         args=_filter_file('{"t1w": {"acquisition": "nope"}}')),
    Case("session_selects_nothing", 18, "no usable anatomical image",
         args=_with("--session-label", "9")),
    Case("not_a_bids_dataset", 16, "not a valid BIDS dataset",
         prepare=lambda folder, site: (folder / "bids" / "dataset_description.json").unlink()),
    Case("missing_bids_dir", 66, "does not exist",
         args=lambda bids, out, site, folder: resolved(
             app_args(folder / "no-such-dataset", out), site)),
    Case("unknown_analysis_level", 17, "analysis level",
         args=lambda bids, out, site, folder: [
             arg if arg != "participant" else "subject"
             for arg in resolved(app_args(bids, out), site)]),
    Case("bad_option_value", 2, "--nprocs", args=_with("--nprocs", "many")),
    Case("malformed_filter_file", 2, "filter", args=_filter_file("{not json")),
    Case("unknown_filter_entity", 2, "unknown entity 'colour'",
         args=_filter_file('{"t1w": {"colour": "red"}}')),
    Case("unknown_output_space", 2, "NoSuchTemplate",
         args=lambda bids, out, site, folder: [
             "NoSuchTemplate" if arg == SPACE else arg
             for arg in resolved(app_args(bids, out), site)]),
    Case("output_inside_bids_dir", 2, "inside BIDS_DIR",
         args=lambda bids, out, site, folder: resolved(
             app_args(bids, bids / "derivatives" / "ugi-bids"), site)),
    Case("missing_weights", 66, "not found",
         args=_weights(lambda folder, site: folder / "no-such-weights.trch")),
    Case("empty_weights", 66, "EOFError", args=_weights(_empty_weights)),
    Case("truncated_weights", 66, "truncated or not a uniGradICON checkpoint",
         args=_weights(_truncated_weights)),
    Case("malicious_pickle_weights", 66, "weights",
         args=_weights(lambda folder, site: _evil_weights(folder / "evil.trch",
                                                          folder / "PWNED")),
         after=lambda folder: not (folder / "PWNED").exists()),
    Case("output_parent_is_a_file", 73, "is not a folder",
         prepare=lambda folder, site: (folder / "blocker").write_text("a file"),
         args=lambda bids, out, site, folder: resolved(
             app_args(bids, folder / "blocker" / "ugi-bids"), site)),
    Case("bids_database_parent_is_a_file", 73, "BIDS database folder",
         prepare=lambda folder, site: (folder / "blocker").write_text("a file"),
         args=_with("--bids-database-dir", "@folder/blocker/db")),
    Case("work_parent_is_a_file", 73, "work folder",
         prepare=lambda folder, site: (folder / "blocker").write_text("a file"),
         args=_with("-w", "@folder/blocker/work")),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_matrix_case(site, case_dir, case):
    images = {path: site["good"] if content == "good" else content
              for path, content in case.images.items()}
    bids = make_dataset(case_dir, images)
    if case.prepare:
        case.prepare(case_dir, site)
    before, out = checksums(bids), case_dir / "ugi-bids"
    argv = (case.args or _with())(bids, out, site, case_dir)
    argv = [str(arg).replace("@folder", str(case_dir)) for arg in argv]
    code, stderr = run_in_process(cli_run.main, argv)
    work = Path(argv[argv.index("-w") + 1]) if "-w" in argv else case_dir / "work"
    line = assert_clean_failure(code, stderr, case.code, case.phrase, out=out, work=work,
                                bids=bids if bids.exists() else None,
                                before=before if bids.exists() else None)
    if case.name == "unknown_filter_entity":
        assert "invalid_filters" not in line
    if case.name == "empty_weights":
        assert "()" not in line
    if case.after:
        assert case.after(case_dir)
    if case.name.endswith("_parent_is_a_file"):
        # neither folder is made when the other cannot be
        assert sorted(p.name for p in case_dir.iterdir()) == ["bids", "blocker"]


# --------------------------------------------------------------------------------------------
# Unwritable folders, for real
# --------------------------------------------------------------------------------------------

def test_existing_read_only_output_folder_exits_73(site, case_dir):
    bids = make_dataset(case_dir, {"sub-01/anat/sub-01_T1w.nii.gz": site["good"]})
    out = case_dir / "ugi-bids"
    out.mkdir()
    out.chmod(0o555)
    before = checksums(bids)
    code, stderr = as_unprivileged(
        lambda: run_in_process(cli_run.main, resolved(app_args(bids, out), site)))
    assert_clean_failure(code, stderr, 73, "is not writable", out=out,
                         work=case_dir / "work", bids=bids, before=before)


@pytest.mark.slow
def test_output_on_a_read_only_mount_exits_73(site, case_dir):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a private read-only mount needs root and unshare")
    bids = make_dataset(case_dir, {"sub-01/anat/sub-01_T1w.nii.gz": site["good"]})
    mounted = case_dir / "mnt"
    mounted.mkdir()
    out, before = mounted / "derivatives" / "ugi-bids", checksums(bids)
    argv = " ".join(f"'{arg}'" for arg in resolved(app_args(bids, out), site))
    script = (f"mount --bind '{mounted}' '{mounted}' && "
              f"mount -o remount,ro,bind '{mounted}' '{mounted}' && "
              f"exec '{sys.executable}' -m ugi_bids.cli.run {argv}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if "mount:" in result.stderr:
        pytest.skip(f"no private mounts here: {result.stderr.strip()}")
    assert_clean_failure(result.returncode, result.stderr, 73, "read-only file system",
                         out=out, work=mounted / "derivatives" / "work", bids=bids,
                         before=before)


def test_read_only_input_is_read_and_never_written(site, case_dir):
    bids = make_dataset(case_dir, {"sub-01/anat/sub-01_T1w.nii.gz": site["good"]})
    for path in [bids, *bids.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    out = case_dir / "ugi-bids"
    case_dir.chmod(0o777)  # the unprivileged user writes the output here
    before = checksums(bids)
    code, stderr = as_unprivileged(lambda: run_in_process(
        cli_run.main, resolved(app_args(bids, out, "--boilerplate-only"), site)))
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert (out / "dataset_description.json").is_file() and (out / "logs").is_dir()
    assert checksums(bids) == before


# --------------------------------------------------------------------------------------------
# Reported, not silent: warnings of runs that go on (no registration: --boilerplate-only)
# --------------------------------------------------------------------------------------------

def _warnings(stderr: str) -> list[str]:
    return [line.split(" WARNING: ", 1)[1] for line in stderr.splitlines() if " WARNING: " in line]


def test_a_participant_without_a_t1w_is_reported_once(site, case_dir):
    bids = make_dataset(case_dir, {"sub-01/anat/sub-01_T1w.nii.gz": site["good"],
                                   "sub-02/anat/sub-02_T2w.nii.gz": site["good"]})
    code, stderr = run_in_process(cli_run.main, resolved(
        app_args(bids, case_dir / "ugi-bids", "--boilerplate-only"), site))
    assert code == 0, stderr
    assert _warnings(stderr) == ["sub-02: no usable T1w image; skipped"]


def test_an_empty_anat_folder_is_reported(site, case_dir):
    bids = make_dataset(case_dir, {"sub-01/anat/sub-01_T1w.nii.gz": site["good"],
                                   "sub-02/anat": None})
    code, stderr = run_in_process(cli_run.main, resolved(
        app_args(bids, case_dir / "ugi-bids", "--boilerplate-only"), site))
    assert code == 0, stderr
    assert _warnings(stderr) == [
        "sub-02: no usable T1w image (its folder holds no BIDS image); skipped"]


def test_an_mri_declared_as_ct_is_warned_about(site, case_dir):
    bids = make_dataset(case_dir, {"sub-01/anat/sub-01_CT.nii.gz": site["good"]})
    code, stderr = run_in_process(cli_run.main, resolved(app_args(
        bids, case_dir / "ugi-bids", "--anat-suffixes", "CT", "--skip-bids-validation",
        "--boilerplate-only"), site))
    assert code == 0, stderr
    (warning,) = [line for line in _warnings(stderr) if line.startswith("sub-01: ")]
    assert warning.startswith("sub-01: CT image ") and "does not look like a CT" in warning


def test_the_modality_warning_goes_into_the_transforms_provenance(site, case_dir):
    """The registration workflow's normalisation node returns the warning, and the provenance
    node puts it into the transforms' sidecar (``InputWarnings``)."""
    from ugi_bids.interfaces.registration import NormaliseIntensities
    from ugi_bids.workflows.registration import _add_folding

    image = save(site["good"], case_dir / "sub-01_CT.nii.gz")
    result = NormaliseIntensities(in_file=str(image), modality="ct").run(cwd=str(case_dir))
    (warning,) = result.outputs.warnings
    assert "does not look like a CT" in warning
    as_mri = NormaliseIntensities(in_file=str(image), modality="mri").run(cwd=str(case_dir))
    assert as_mri.outputs.warnings == []
    sidecar = _add_folding({"Model": "unigradicon"}, 0.0, 0.9,
                           input_warnings=result.outputs.warnings)
    assert sidecar["InputWarnings"] == [warning]
    assert "InputWarnings" not in _add_folding({"Model": "unigradicon"}, 0.0, 0.9,
                                               input_warnings=[])


# --------------------------------------------------------------------------------------------
# A failed step: one line per node, the traceback in the crash file (and with -v)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def failing_prealignment(monkeypatch):
    from ugi_bids.interfaces import files

    def fail(*args, **kwargs):
        raise RuntimeError("the pre-alignment failed on purpose")

    monkeypatch.setattr(files, "prealign_images", fail)


@pytest.mark.parametrize("verbose", [False, True], ids=["default", "verbose"])
def test_a_failed_step_is_one_line_naming_participant_step_and_cause(
        site, case_dir, failing_prealignment, verbose):
    bids = make_dataset(case_dir, {"sub-01/anat/sub-01_T1w.nii.gz": site["good"]})
    before, out = checksums(bids), case_dir / "ugi-bids"
    code, stderr = run_in_process(cli_run.main, resolved(
        app_args(bids, out, *(["-v"] if verbose else [])), site))
    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("ugi-bids: error: ")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(
        f"ugi-bids: error: sub-01: register_T1w_{SPACE}_wf.prealign failed: RuntimeError: the "
        "pre-alignment failed on purpose (crash file: ")
    crash = Path(errors[0].split("(crash file: ")[1].rstrip(")"))
    assert "Traceback" in crash.read_text()
    if verbose:
        assert "Traceback" in stderr
    else:
        assert len(stderr.splitlines()) == 1, stderr
    # what a failed participant leaves: the top-level files, its settings and the crash file
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    run_folder = crash.parent.relative_to(out)
    assert left == sorted([".bidsignore", "dataset_description.json",
                           "logs/CITATION.bib", "logs/CITATION.md", str(crash.relative_to(out)),
                           str(run_folder / "ugi-bids.toml")]), left
    assert checksums(bids) == before


# --------------------------------------------------------------------------------------------
# ugi-register and ugi-warp: the same image checks, before anything is written
# --------------------------------------------------------------------------------------------

REGISTER_CASES = ["two_d", "thin_slab", "no_orientation", "negative_voxel_size",
                  "huge_declared_shape", "constant"]


@pytest.mark.parametrize("case", REGISTER_CASES)
def test_ugi_register_refuses_bad_images_before_writing(site, case_dir, case):
    good = save(site["good"], case_dir / "fixed.nii.gz")
    bad = case_dir / "moving.nii.gz"
    content = _bad_images(site["good"])[case]()
    bad.write_bytes(content) if isinstance(content, bytes) else save(content, bad)
    out = case_dir / "out"
    code, stderr = run_in_process(cli_register.main, [
        "--fixed", good, "--moving", bad, "--fixed-modality", "mri", "--moving-modality", "mri",
        "--out-prefix", out / "pair", "--weights", site["weights"], "--network-size", "65",
        "--io-iterations", "0"])
    assert_clean_failure(code, stderr, 65, "moving image", out=out, work=None, bids=None,
                         before=None, prog="ugi-register")


def test_ugi_warp_refuses_a_huge_declared_shape(site, case_dir):
    good = save(site["good"], case_dir / "reference.nii.gz")
    bad = case_dir / "moving.nii.gz"
    bad.write_bytes(_bad_images(site["good"])["huge_declared_shape"]())
    out = case_dir / "out"
    code, stderr = run_in_process(cli_register.warp_main, [
        "--fixed", good, "--moving", bad, "--out", out / "warped.nii.gz"])
    assert_clean_failure(code, stderr, 65, "cannot hold", out=out, work=None, bids=None,
                         before=None, prog="ugi-warp")


# --------------------------------------------------------------------------------------------
# A whole run: a bad participant skipped, an empty one reported, a dead run's staging removed
# --------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def torch_threads_restored():
    """An in-process run sets torch's thread count (``--omp-nthreads``): later tests keep
    theirs."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_run_skips_the_bad_participant_and_cleans_a_dead_runs_staging(
        site, case_dir, torch_threads_restored):
    from ugi_bids.engine.formats.staging import _host

    bids = make_dataset(case_dir, {
        "sub-01/anat/sub-01_T1w.nii.gz": site["good"],
        "sub-02/anat/sub-02_T1w.nii.gz": _bad_images(site["good"])["two_d"](),
        "sub-03/anat": None})
    before, out = checksums(bids), case_dir / "ugi-bids"
    host, dead = _host(), _dead_pid()
    # what a `kill -9` during writing leaves: a staged file, a sink's staging folder (with a
    # 0-byte file), and one of an older version without an owner, two hours old
    stale = [out / "sub-01" / "anat" / f".sub-01_T1w.partial-{host}+{dead}-0123abcd.nii.gz",
             out / f".ugi-bids-sink-{host}+{dead}-k2j4" / "sub-01" / "anat" / "x.nii.gz",
             out / ".ugi-bids-sink-old0fmt" / "y.json"]
    live = out / f".dataset_description.partial-{host}+{os.getpid()}-89abcdef.json"
    for path in [*stale, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    two_hours_ago = time.time() - 7200
    os.utime(out / ".ugi-bids-sink-old0fmt", (two_hours_ago, two_hours_ago))

    code, stderr = run_in_process(cli_run.main, resolved(app_args(bids, out), site))
    assert code == 1, stderr
    assert "Traceback" not in stderr
    warnings = _warnings(stderr)
    assert "sub-03: no usable T1w image (its folder holds no BIDS image); skipped" in warnings
    assert any(w.startswith("sub-02: skipped: T1w image ") for w in warnings), warnings
    assert stderr.splitlines()[-1].startswith(
        "ugi-bids: error: 1 participant(s) skipped for an unusable image: sub-02: T1w image ")
    # the good participant is complete; the bad one left nothing; BIDS_DIR untouched
    anat = out / "sub-01" / "anat"
    for name in (f"sub-01_from-T1w_to-{SPACE}_mode-image_xfm.h5",
                 f"sub-01_from-{SPACE}_to-T1w_mode-image_xfm.h5",
                 f"sub-01_from-T1w_to-{SPACE}_mode-image_xfm.json"):
        assert (anat / name).is_file(), sorted(anat.iterdir())
    assert not (out / "sub-02").exists() and not (out / "sub-03").exists()
    assert checksums(bids) == before
    # the dead runs' staging is gone; the live run's file stays
    assert not any(path.exists() for path in stale)
    assert not (out / f".ugi-bids-sink-{host}+{dead}-k2j4").exists()
    assert not (out / ".ugi-bids-sink-old0fmt").exists()
    assert live.exists()
    hidden = [p for p in out.rglob(".*") if p != live]
    assert hidden == [out / ".bidsignore"], hidden


@pytest.mark.slow
def test_modality_check_on_real_ct_and_mri():
    """Real chest CTs (Hounsfield units) and real brain MRIs: each passes as itself, and is
    flagged as the other."""
    from ugi_bids.engine.checks import modality_warning

    ct = realdata.chest_ct(1)
    mri = load_volume(realdata.mni2009c_brain_path())
    assert modality_warning(ct.data, "ct") is None
    assert modality_warning(mri.data, "mri") is None
    assert "looks like a CT" in modality_warning(ct.data, "mri")
    assert "does not look like a CT" in modality_warning(mri.data, "ct")


def test_failed_nodes_name_the_participant_and_step(tmp_path):
    """Crash files of a participant's workflow and of its longitudinal template's
    (``sub_01_template_wf``: the participant is 01, not "01_template")."""
    from types import SimpleNamespace

    config = SimpleNamespace(output_dir=tmp_path, run_uuid="run1")
    for folder, node, cause in (
            ("sub-01", "ugi_wf.sub_01_template_wf.build", "ugi_bids.errors.InputDataError: blank"),
            (None, "ugi_wf.sub_02_wf.register_wf.prealign", "numpy.linalg.LinAlgError: no")):
        crash = (tmp_path / folder / "log" / "run1" if folder else tmp_path / "log" / "run1")
        crash.mkdir(parents=True)
        (crash / "crash-1.txt").write_text(f"Node: {node}\n\nTraceback:\n\t{cause}\n")
    nodes = [(n["participant"], n["step"], n["cause"]) for n in cli_run.failed_nodes(config)]
    assert nodes == [("01", "build", "blank"),
                     ("02", "register_wf.prealign", "LinAlgError: no")]
