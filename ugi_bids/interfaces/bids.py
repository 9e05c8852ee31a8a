"""BIDS-Derivatives writing for ugi-bids: niworkflows' ``DerivativesDataSink`` with our names
and all-or-nothing writes.

Naming follows ``ugi_bids/data/derivatives.json`` (a pybids configuration, like fMRIPrep's,
sMRIPrep's and NiBabies' own), which fixes two gaps of niworkflows' stock patterns for an
anatomical-registration app: transforms keep their ``desc-`` entity and may be NIfTI
displacement fields (``.nii.gz``), and atlas-derived segmentations keep ``atlas-``/``seg-``/
``scale-``. Examples of the names it builds (``OUTPUT_DIR`` relative)::

    sub-01/anat/sub-01_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5
    sub-01/ses-1/anat/sub-01_ses-1_from-T1w_to-MNI152NLin2009cAsym_mode-image_desc-affine_xfm.txt
    sub-01/anat/sub-01_space-MNI152NLin2009cAsym_res-2_desc-preproc_T1w.nii.gz
    sub-01/anat/sub-01_space-MNI152NLin2009cAsym_desc-log_jacobian.nii.gz
    sub-01/anat/sub-01_space-T1w_atlas-Schaefer2018_seg-7n_scale-400_dseg.nii.gz

Writes are atomic: the parent class writes into a hidden staging folder inside the output
folder (same file system), then every produced file is moved into place with ``os.replace``.
A reader never sees a half-written file under a final name, and a failure leaves nothing
behind. A process killed with SIGKILL can leave a hidden ``.ugi-bids-sink-<host>+<pid>-*``
folder behind; it holds nothing that was published, and the next ``ugi-bids`` run into the
folder removes it (:func:`~ugi_bids.engine.formats.staging.remove_stale_staging`).

Usage is that of niworkflows' sink (entities as inputs; ``from`` is a Python keyword, so pass it
as ``**{"from": "T1w"}``); ``base_directory`` is ``OUTPUT_DIR`` (``out_path_base`` is empty,
as in fMRIPrep).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from nipype.interfaces.base import isdefined
from niworkflows.interfaces.bids import DerivativesDataSink as _NiworkflowsDataSink

from ..engine.formats.staging import SINK_STAGING_PREFIX, owner_tag

#: Prefix of the per-run hidden staging folders created inside the output folder (the owner's
#: host and pid follow it, so that the next run can remove a dead run's folder).
STAGING_PREFIX = SINK_STAGING_PREFIX

#: Suffixes whose files are copied byte for byte (no NIfTI header "fixes").
_VERBATIM_SUFFIXES = frozenset({"xfm"})


def load_derivatives_config() -> dict[str, Any]:
    """Return our pybids configuration (``entities`` + ``default_path_patterns``)."""
    text = resources.files("ugi_bids.data").joinpath("derivatives.json").read_text()
    return json.loads(text)


_SPEC = load_derivatives_config()
BIDS_DERIV_ENTITIES: list[dict[str, Any]] = _SPEC["entities"]
BIDS_DERIV_PATTERNS: tuple[str, ...] = tuple(_SPEC["default_path_patterns"])


class DerivativesDataSink(_NiworkflowsDataSink):
    """Store one derivative (and its JSON sidecar) under ``OUTPUT_DIR`` with ugi-bids' names.

    Behaves like :class:`niworkflows.interfaces.bids.DerivativesDataSink`, except that:

    * paths come from ``ugi_bids/data/derivatives.json``;
    * outputs go straight into ``base_directory`` (``out_path_base = ""``);
    * transforms (``suffix="xfm"``) are copied verbatim, never header-"fixed";
    * a ``Resolution`` given by the caller replaces niworkflows' ``"Unknown"`` (non-TemplateFlow
      spaces);
    * writing is all-or-nothing (staging folder + ``os.replace``).
    """

    out_path_base = ""
    _config_entities = frozenset(e["name"] for e in BIDS_DERIV_ENTITIES)
    _config_entities_dict = BIDS_DERIV_ENTITIES
    _file_patterns = BIDS_DERIV_PATTERNS

    def _run_interface(self, runtime):
        final_root = self._final_root(runtime)
        final_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{owner_tag()}-", dir=final_root))
        saved = self._redirect_inputs(staging)
        user_resolution = self._user_resolution()
        try:
            runtime = super()._run_interface(runtime)
            self._restore_resolution(user_resolution)
            self._publish(staging, final_root)
        finally:
            self._restore_inputs(saved)
            shutil.rmtree(staging, ignore_errors=True)
        return runtime

    # -- helpers ---------------------------------------------------------------------------

    def _final_root(self, runtime) -> Path:
        """The folder the files finally land in: ``base_directory`` / ``out_path_base``."""
        base = self.inputs.base_directory
        base = base if isdefined(base) and base else runtime.cwd
        return Path(base).absolute() / self.out_path_base

    def _redirect_inputs(self, staging: Path) -> dict[str, Any]:
        """Point the parent at the staging folder; returns the inputs to restore afterwards."""
        saved = {"base_directory": self.inputs.base_directory, "check_hdr": self.inputs.check_hdr}
        self.inputs.base_directory = str(staging)
        if self.inputs.suffix in _VERBATIM_SUFFIXES:
            self.inputs.check_hdr = False
        return saved

    def _restore_inputs(self, saved: dict[str, Any]) -> None:
        for name, value in saved.items():
            setattr(self.inputs, name, value)

    def _user_resolution(self) -> Any:
        """``Resolution`` metadata given by the caller (constructor or ``meta_dict``), if any."""
        if "Resolution" in self._metadata:
            return self._metadata["Resolution"]
        if isdefined(self.inputs.meta_dict):
            return self.inputs.meta_dict.get("Resolution")
        return None

    def _restore_resolution(self, user_resolution: Any) -> None:
        """niworkflows writes ``"Unknown"`` for spaces it cannot look up: prefer the caller's."""
        sidecar = self._results.get("out_meta")
        if not sidecar or user_resolution in (None, "Unknown"):
            return
        meta = json.loads(Path(sidecar).read_text())
        if meta.get("Resolution") == "Unknown":
            meta["Resolution"] = user_resolution
            self._metadata["Resolution"] = user_resolution
            Path(sidecar).write_text(json.dumps(meta, sort_keys=True, indent=2))

    def _publish(self, staging: Path, final_root: Path) -> None:
        """Move every staged file into place (sidecar first) and report the final paths."""
        if self._results.get("out_meta"):
            self._results["out_meta"] = str(_move_into_place(
                Path(self._results["out_meta"]), staging, final_root))
        self._results["out_file"] = [
            str(_move_into_place(Path(staged), staging, final_root))
            for staged in self._results.get("out_file", [])
        ]


def _move_into_place(staged: Path, staging: Path, final_root: Path) -> Path:
    """``os.replace`` one staged file to the same relative path under ``final_root``."""
    dest = final_root / staged.relative_to(staging)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, dest)
    return dest
