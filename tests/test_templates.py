"""Output spaces (ugi_bids.utils.templates): parsing, resolving from a temporary TemplateFlow home
built from real images, and the offline failures (missing file, empty placeholder, failed or
truncated download) as one-line errors with the pre-fetch hint.

No test reaches the network: every test points TEMPLATEFLOW_HOME at a temporary folder and
TemplateFlow's download root at localhost (a closed port, or a local HTTP server). Lookups and
downloads go through TemplateFlow's own client (templateflow >= 25.1).
"""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("templateflow") is None:  # found without importing it
    pytest.skip("templateflow is not installed", allow_module_level=True)

import functools
import http.server
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from tests import bidsdata
from tests.realdata import brain_mask, fsl_mni_brain_path
from ugi_bids import errors
from ugi_bids.config import SpaceSpec
from ugi_bids.engine.spatial.volume import Volume, load_volume
from ugi_bids.utils import templates as ut

TPL = "MNI152NLin2009cAsym"
NLIN6 = "MNI152NLin6Asym"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def offline_templateflow(tmp_path, monkeypatch):
    """TemplateFlow confined to this test: its own home, downloads aimed at a closed port."""
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")
    monkeypatch.setenv("TEMPLATEFLOW_USE_DATALAD", "0")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "templateflow"))
    monkeypatch.setattr(ut, "S3_ROOT", f"http://127.0.0.1:{_closed_port()}")
    for proxy in ("http_proxy", "https_proxy", "all_proxy"):  # localhost is reached directly
        monkeypatch.delenv(proxy, raising=False)
        monkeypatch.delenv(proxy.upper(), raising=False)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """A populated home (real 2009c files + NLin6Asym placeholders), built once, never modified."""
    return bidsdata.make_templateflow_home(tmp_path_factory.mktemp("tf") / "home",
                                           placeholders=(NLIN6,))


@pytest.fixture(scope="module", autouse=True)
def templateflow_imported(tmp_path_factory):
    """Importing templateflow (niworkflows does, for its non-standard spaces) initialises the
    home named at that moment and indexes it: do it once, in a small home of its own, so that
    no test's home is initialised behind its back, whatever the order the tests run in. The
    private skeleton is indexed here too (seconds, once a process), so that the time bounds of
    the tests measure look-ups and downloads, not that."""
    home = bidsdata.add_placeholder_template(tmp_path_factory.mktemp("tf-import"), NLIN6).parent
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TEMPLATEFLOW_HOME", str(home))
        patch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")
        importlib.import_module("niworkflows.utils.spaces")
        assert TPL in ut.templateflow_names()
    return home


@pytest.fixture
def home(shared_home, monkeypatch):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(shared_home))
    return shared_home


@pytest.fixture
def own_home(tmp_path, monkeypatch):
    """A home this test may modify (placeholders of NLin6Asym are downloaded into it)."""
    path = bidsdata.make_templateflow_home(tmp_path / "own", placeholders=(NLIN6,))
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(path))
    return path


def _one_line(error) -> str:
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text
    return text


# ---------------------------------------------------------------- parsing

def test_parse_output_spaces():
    assert ut.parse_output_spaces(["MNI152NLin2009cAsym"]) == [SpaceSpec(TPL)]
    assert ut.parse_output_spaces("MNI152NLin2009cAsym:res-02") == [SpaceSpec(TPL, resolution="2")]
    specs = ut.parse_output_spaces(["MNIPediatricAsym:cohort-1:cohort-2:res-1", TPL, TPL,
                                    "MNIPediatricAsym:res-1:cohort-1"])
    assert [(s.name, s.cohort, s.resolution) for s in specs] == [
        ("MNIPediatricAsym", "1", "1"), ("MNIPediatricAsym", "2", "1"), (TPL, None, None)]
    assert specs[0].label == "MNIPediatricAsym+1"
    assert ut.parse_output_spaces([]) == []


@pytest.mark.parametrize("value, words", [
    ("MNI152NLin2009cAsym:res-native", "res-native"),
    ("MNI152NLin2009cAsym:res-1.6mm", "resolution index"),
    ("MNI152NLin2009cAsym:res-0", "resolution index"),
    ("fsaverage:den-10k", "den-10k"),
    ("MNI152NLin2009cAsym:", "modifier"),
    ("T1w", "not a template"),
    ("petref", "not a template"),  # niworkflows' NONSTANDARD_REFERENCES
    ("scanner", "not a template"),  # one of ours on top
    ("MNI_152", "letters and digits"),
])
def test_parse_output_spaces_errors(value, words):
    with pytest.raises(errors.TemplateSpecError) as info:
        ut.parse_output_spaces([value])
    assert info.value.exit_code == 2
    assert words in _one_line(info.value)


def test_parse_custom_template(tmp_path, monkeypatch):
    (tmp_path / "tpl.nii.gz").write_bytes(b"x")
    (tmp_path / "tpl_mask.nii.gz").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    spec = ut.parse_custom_template("Study01=tpl.nii.gz,mask=tpl_mask.nii.gz")
    assert spec.is_custom and spec.name == "Study01" and spec.label == "Study01"
    assert spec.path == tmp_path / "tpl.nii.gz" and spec.mask == tmp_path / "tpl_mask.nii.gz"
    assert ut.parse_custom_template(f"Pig={tmp_path / 'tpl.nii.gz'}").mask is None


@pytest.mark.parametrize("value, code, words", [
    ("Study-1=tpl.nii.gz", 2, "letters and digits"),
    ("T1w=tpl.nii.gz", 2, "non-standard space"),
    ("MNI152NLin2009cAsym=tpl.nii.gz", 2, "TemplateFlow template: MNI152NLin2009cAsym"),
    ("mni152nlin6asym=tpl.nii.gz", 2, "TemplateFlow template: MNI152NLin6Asym"),
    ("Study", 2, "NAME=PATH"),
    ("Study=tpl.nii.gz,brain=tpl.nii.gz", 2, "mask=PATH"),
    ("Study=absent.nii.gz", 66, "absent.nii.gz"),
    ("Study=tpl.nii.gz,mask=absent_mask.nii.gz", 66, "absent_mask.nii.gz"),
])
def test_parse_custom_template_errors(tmp_path, monkeypatch, value, code, words):
    (tmp_path / "tpl.nii.gz").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.UgiError) as info:
        ut.parse_custom_template(value)
    assert info.value.exit_code == code
    assert words in _one_line(info.value)


# ---------------------------------------------------------------- the test home itself

def test_test_home_is_templateflow_shaped(shared_home):
    folder = shared_home / f"tpl-{TPL}"
    res1 = nib.load(folder / f"tpl-{TPL}_res-01_T1w.nii.gz")
    assert res1.shape == (193, 229, 193) and np.allclose(res1.affine[:3, 3], [-96, -132, -78])
    res2 = nib.load(folder / f"tpl-{TPL}_res-02_T1w.nii.gz")
    assert res2.shape == (97, 115, 97) and np.allclose(res2.header.get_zooms(), 2.0)
    mask = np.asarray(nib.load(folder / f"tpl-{TPL}_res-01_desc-brain_mask.nii.gz").dataobj)
    assert set(np.unique(mask)) == {0, 1} and 0.1 < mask.mean() < 0.6
    assert (shared_home / f"tpl-{NLIN6}" / f"tpl-{NLIN6}_res-01_T1w.nii.gz").stat().st_size == 0


# ---------------------------------------------------------------- TemplateFlow resolution

def test_resolve_default_resolution(home):
    resolved = ut.resolve_template(SpaceSpec(TPL))
    assert resolved.image == home / f"tpl-{TPL}" / f"tpl-{TPL}_res-01_T1w.nii.gz"
    assert resolved.mask == home / f"tpl-{TPL}" / f"tpl-{TPL}_res-01_desc-brain_mask.nii.gz"
    assert resolved.uri == f"bids:templateflow:tpl-{TPL}/tpl-{TPL}_res-01_T1w.nii.gz"
    assert resolved.mask_uri == (
        f"bids:templateflow:tpl-{TPL}/tpl-{TPL}_res-01_desc-brain_mask.nii.gz")
    assert (resolved.resolution, resolved.suffix, resolved.label) == (1, "T1w", TPL)


def test_resolve_resolution_index(home):
    resolved = ut.resolve_template(ut.parse_output_spaces([f"{TPL}:res-2"])[0])
    assert resolved.image.name == f"tpl-{TPL}_res-02_T1w.nii.gz"
    assert resolved.mask.name == f"tpl-{TPL}_res-02_desc-brain_mask.nii.gz"
    assert nib.load(resolved.image).header.get_zooms() == (2.0, 2.0, 2.0)
    with pytest.raises(errors.TemplateSpecError) as info:
        ut.resolve_template(SpaceSpec(TPL, resolution="3"))
    assert "res-1 (1 mm), res-2 (2 mm)" in _one_line(info.value)


def test_suffix_without_template_image_falls_back_to_t1w(home, caplog):
    with caplog.at_level("WARNING", logger=ut.__name__):
        resolved = ut.resolve_template(SpaceSpec(TPL), suffix="FLAIR")
    assert resolved.suffix == "T1w" and resolved.image.name.endswith("_res-01_T1w.nii.gz")
    assert "no FLAIR image" in caplog.text


def test_suffix_the_template_has_but_the_home_lacks(home):
    # TemplateFlow's MNI152NLin2009cAsym has a T2w image; this home was built without it
    with pytest.raises(errors.TemplateError) as info:
        ut.resolve_template(SpaceSpec(TPL), suffix="T2w", download=False)
    text = _one_line(info.value)
    assert info.value.exit_code == 66
    assert f"tpl-{TPL}_res-01_T2w.nii.gz" in text and "templateflow.update(" in text


def test_template_only_in_the_home(shared_home, tmp_path, monkeypatch):
    """A template the installed skeleton does not list (a newer archive, a study template put
    into the home) is found in the home."""
    folder = tmp_path / "home" / "tpl-Study"
    folder.mkdir(parents=True)
    source = shared_home / f"tpl-{TPL}" / f"tpl-{TPL}_res-02"
    shutil.copyfile(f"{source}_T1w.nii.gz", folder / "tpl-Study_res-02_T1w.nii.gz")
    shutil.copyfile(f"{source}_desc-brain_mask.nii.gz",
                    folder / "tpl-Study_res-02_desc-brain_mask.nii.gz")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "home"))
    resolved = ut.resolve_template(SpaceSpec("Study"), download=False)
    assert resolved.image == folder / "tpl-Study_res-02_T1w.nii.gz"
    assert resolved.mask == folder / "tpl-Study_res-02_desc-brain_mask.nii.gz"
    assert (resolved.resolution, resolved.uri) == (
        2, "bids:templateflow:tpl-Study/tpl-Study_res-02_T1w.nii.gz")


@pytest.mark.slow
def test_global_templateflow_client_is_reused(tmp_path):
    """On the home templateflow.api was imported with, its client (indexed already when
    niworkflows was imported) serves the look-ups. In a fresh interpreter: in this one,
    templateflow may have been imported on another home by an earlier test."""
    import subprocess
    import sys

    home = bidsdata.add_placeholder_template(tmp_path / "tf", NLIN6).parent
    script = f"""
import importlib, templateflow.api
from ugi_bids import errors
from ugi_bids.config import SpaceSpec
from ugi_bids.utils import templates as ut
importlib.import_module("niworkflows.utils.spaces")
try:
    ut.resolve_template(SpaceSpec({NLIN6!r}), download=False)
except errors.TemplateError as error:
    print(error.exit_code, "empty placeholder" in str(error))
print(ut._HOME_CLIENTS[ut.templateflow_home()] is templateflow.api)
"""
    env = dict(os.environ, TEMPLATEFLOW_HOME=str(home), TEMPLATEFLOW_AUTOUPDATE="0",
               UGI_BIDS_HOME=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["66", "True", "True"]


def test_unknown_names_cohorts(home):
    with pytest.raises(errors.TemplateSpecError) as info:
        ut.resolve_template(SpaceSpec("MNI152NLin2009cAsymm"))
    assert f"did you mean {TPL}" in _one_line(info.value)
    with pytest.raises(errors.TemplateSpecError) as info:
        ut.resolve_template(SpaceSpec("MNIInfant"))
    assert "needs a cohort" in _one_line(info.value)
    with pytest.raises(errors.TemplateSpecError) as info:
        ut.resolve_template(SpaceSpec(TPL, cohort="2"))
    assert "no cohort-2" in _one_line(info.value)


def _assert_offline_error(error, home: Path, relpath: str, *, home_text=None):
    text = _one_line(error)
    assert error.exit_code == 66
    assert relpath in text and "not available offline" in text
    assert (home_text or f"TEMPLATEFLOW_HOME={home}") in text
    assert "from templateflow.api import get; get(" in text and "login node" in text
    return text


@pytest.mark.parametrize("download", [False, True])
def test_empty_placeholder_is_a_one_line_error(home, download):
    start = time.monotonic()
    with pytest.raises(errors.TemplateError) as info:
        ut.resolve_template(SpaceSpec(NLIN6), download=download)
    assert time.monotonic() - start < 15
    relpath = f"tpl-{NLIN6}/tpl-{NLIN6}_res-01_T1w.nii.gz"
    text = _assert_offline_error(info.value, home, relpath)
    assert "empty placeholder" in text
    assert f"get('{NLIN6}', resolution=1, desc=None, suffix='T1w')" in text
    assert f"get('{NLIN6}', resolution=1, desc='brain', suffix='mask')" in text
    assert ("download failed" in text) == download
    assert (home / relpath).stat().st_size == 0


def test_missing_template_in_a_fresh_home(tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(fresh))
    with pytest.raises(errors.TemplateError) as info:
        ut.resolve_template(SpaceSpec(TPL), download=False)
    text = _assert_offline_error(info.value, fresh, f"tpl-{TPL}/tpl-{TPL}_res-01_T1w.nii.gz")
    assert "missing" in text and "templateflow.update(local=True" in text
    assert not fresh.exists()  # an offline look-up writes nothing into the home


def test_unset_templateflow_home_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv("TEMPLATEFLOW_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    default = ut.templateflow_home()
    assert default.is_relative_to(tmp_path)
    with pytest.raises(errors.TemplateError) as info:
        ut.resolve_template(SpaceSpec(TPL), download=False)
    _assert_offline_error(info.value, default, f"tpl-{TPL}_res-01_T1w.nii.gz",
                          home_text=("TEMPLATEFLOW_HOME is not set, so TemplateFlow's default "
                                     f"{default}"))


def test_hanging_or_failing_name_lookup_is_bounded(home, monkeypatch):
    """A resolver that hangs (a compute node behind a firewall) or fails: one line, bounded."""
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kw: time.sleep(5))
    start = time.monotonic()
    with pytest.raises(errors.TemplateError) as info:
        ut.resolve_template(SpaceSpec(NLIN6), timeout=1)
    assert time.monotonic() - start < 4
    assert "took more than 1 s" in _one_line(info.value)

    def fail(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(errors.TemplateError) as info:
        ut.resolve_template(SpaceSpec(NLIN6))
    assert "no network: cannot resolve 127.0.0.1" in _one_line(info.value)


def test_name_lookup_goes_to_the_proxy_when_one_is_set(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.cluster.example:3128")
    assert ut._first_hop("https://templateflow.s3.amazonaws.com") == "proxy.cluster.example"
    monkeypatch.setenv("no_proxy", "amazonaws.com")
    assert ut._first_hop("https://templateflow.s3.amazonaws.com") == "templateflow.s3.amazonaws.com"


# ---------------------------------------------------------------- downloads (local server)

@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """A local HTTP server standing in for TemplateFlow's S3 bucket; yields its root folder."""
    root = tmp_path / "s3"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(ut, "S3_ROOT", f"http://127.0.0.1:{server.server_address[1]}")
    yield root
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _publish_nlin6(s3_root: Path, truncate_mask: bool = False) -> Path:
    """Put FSL's MNI152 1 mm brain (= MNI152NLin6Asym res-01 grid) and its mask on the server."""
    folder = s3_root / f"tpl-{NLIN6}"
    folder.mkdir(parents=True)
    image = folder / f"tpl-{NLIN6}_res-01_T1w.nii.gz"
    shutil.copyfile(fsl_mni_brain_path(), image)
    brain = load_volume(image)
    mask = folder / f"tpl-{NLIN6}_res-01_desc-brain_mask.nii.gz"
    nib.save(Volume(brain.grid, brain_mask(brain).astype(np.float32)).to_nifti(np.uint8), mask)
    if truncate_mask:
        mask.write_bytes(mask.read_bytes()[: mask.stat().st_size // 2])
    return image


def test_placeholder_is_downloaded_when_online(own_home, s3_server):
    source = _publish_nlin6(s3_server)
    resolved = ut.resolve_template(SpaceSpec(NLIN6))
    assert resolved.image == own_home / f"tpl-{NLIN6}" / source.name
    assert resolved.image.read_bytes() == source.read_bytes()
    assert resolved.mask.stat().st_size > 0
    assert resolved.uri == f"bids:templateflow:tpl-{NLIN6}/{source.name}"


def test_truncated_download_is_reported_and_reset(own_home, s3_server):
    _publish_nlin6(s3_server, truncate_mask=True)
    with pytest.raises(errors.TemplateError) as info:
        ut.resolve_template(SpaceSpec(NLIN6))
    relpath = f"tpl-{NLIN6}/tpl-{NLIN6}_res-01_desc-brain_mask.nii.gz"
    text = _assert_offline_error(info.value, own_home, relpath)
    assert "damaged" in text
    assert (own_home / relpath).stat().st_size == 0  # back to a placeholder: retried next time


# ---------------------------------------------------------------- custom templates

def test_custom_template_by_path(tmp_path):
    image = tmp_path / "study.nii.gz"
    mask = tmp_path / "study_mask.nii.gz"
    image.write_bytes(b"x")
    mask.write_bytes(b"x")
    resolved = ut.resolve_template(ut.parse_custom_template(f"Study={image},mask={mask}"))
    assert (resolved.image, resolved.mask) == (image, mask)
    assert resolved.uri == image.as_uri() and resolved.mask_uri == mask.as_uri()
    assert resolved.suffix is None and resolved.resolution is None
    bare = ut.resolve_template(ut.parse_custom_template(f"Study={image}"))
    assert bare.mask is None and bare.mask_uri is None


def test_custom_template_removed_after_parsing(tmp_path):
    image = tmp_path / "study.nii.gz"
    image.write_bytes(b"x")
    spec = ut.parse_custom_template(f"Study={image}")
    os.remove(image)
    with pytest.raises(errors.TemplateError) as info:
        ut.resolve_template(spec)
    assert info.value.exit_code == 66 and str(image) in _one_line(info.value)


def test_cached_skeleton_is_readable_by_other_users(tmp_path, monkeypatch):
    """The skeleton unpacked into a shared cache (a container image's UGI_BIDS_HOME, baked as
    root and read as another UID) takes the umask's mode, not mkdtemp's 0700."""
    from ugi_bids.utils import templates as T

    monkeypatch.setenv("UGI_BIDS_HOME", str(tmp_path / "home"))
    old = os.umask(0o022)
    try:
        root = T._cached_skeleton_root()
    finally:
        os.umask(old)
    assert root is not None and root.is_dir()
    assert root.stat().st_mode & 0o777 == 0o755
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".staging-")]
