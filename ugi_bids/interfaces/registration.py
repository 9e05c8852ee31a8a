"""Nipype interfaces over the engine's file-level steps (:mod:`ugi_bids.interfaces.files`).

Each interface declares its traits and calls exactly one engine function; the logic lives in
the engine. Directions: the *forward* transform maps fixed (template) points to moving (subject)
points, i.e. it resamples the moving image onto the fixed grid (``from-<moving>_to-<fixed>``).
"""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..engine import options
from . import files


def _choice(default: str, choices, **metadata):
    """An Enum trait over ``choices`` (:mod:`ugi_bids.engine.options`) whose default is
    ``default`` (traits takes the first value as the default)."""
    return traits.Enum(default, *(c for c in choices if c != default), usedefault=True,
                       **metadata)


def _optional(value):
    return value if isdefined(value) and value else None


class _NormaliseInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to normalise")
    modality = _choice(options.DEFAULT_MODALITY, options.MODALITIES, desc="intensity window")


class _NormaliseOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="intensities clipped and scaled to [0, 1], float32")
    warnings = traits.List(traits.Str, desc="the image's intensities do not look like its "
                                             "modality (one sentence each)")


class NormaliseIntensities(SimpleInterface):
    """uniGradICON intensity preprocessing (CT: [-1000, 1000] HU; MRI: [min, p99])."""

    input_spec = _NormaliseInputSpec
    output_spec = _NormaliseOutputSpec

    def _run_interface(self, runtime):
        self._results["out_file"], self._results["warnings"] = files.normalise_image(
            self.inputs.in_file, self.inputs.modality,
            os.path.join(runtime.cwd, "normalised.nii.gz"))
        return runtime


class _PrealignInputSpec(BaseInterfaceInputSpec):
    fixed_image = File(exists=True, mandatory=True, desc="normalised fixed (template) image")
    moving_image = File(exists=True, mandatory=True, desc="normalised moving (subject) image")
    mode = _choice(options.DEFAULT_PREALIGN, options.PREALIGN_MODES, desc="pre-alignment mode")
    network_size = traits.Int(options.DEFAULT_NETWORK_SIZE, usedefault=True,
                              desc="network grid (used by mode none)")
    fixed_mask = File(exists=True, desc="mask of the fixed image (restricts the affine fit)")
    dof = _choice(options.DEFAULT_PREALIGN_DOF, options.PREALIGN_DOFS,
                  desc="degrees of freedom of the affine fit")
    fixed_modality = _choice(options.DEFAULT_MODALITY, options.MODALITIES,
                             desc="intensity model of the fixed image (a CT: its body)")
    moving_modality = _choice(options.DEFAULT_MODALITY, options.MODALITIES,
                              desc="intensity model of the moving image (a CT: its body)")


class _PrealignOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="affine .h5 mapping fixed points to moving points")
    report_file = File(exists=True, desc="the fit's report as JSON (null unless mode affine)")
    report = traits.Dict(desc="the fit's report: metric, final cost, dof, start, fallback, "
                              "scales, largest shear (empty unless mode affine)")


class Prealign(SimpleInterface):
    """World-space pre-alignment (centre of mass, multi-start search, multi-resolution rigid
    then ``dof`` fit)."""

    input_spec = _PrealignInputSpec
    output_spec = _PrealignOutputSpec

    def _run_interface(self, runtime):
        self._results["report_file"] = os.path.join(runtime.cwd, "prealign_report.json")
        self._results["out_file"], report = files.prealign_images(
            self.inputs.fixed_image, self.inputs.moving_image, self.inputs.mode,
            os.path.join(runtime.cwd, "prealign_xfm.h5"), network_size=self.inputs.network_size,
            fixed_mask_file=_optional(self.inputs.fixed_mask), dof=self.inputs.dof,
            fixed_modality=self.inputs.fixed_modality,
            moving_modality=self.inputs.moving_modality,
            report_file=self._results["report_file"])
        self._results["report"] = report or {}
        return runtime


class _UniGradICONInputSpec(BaseInterfaceInputSpec):
    fixed_image = File(exists=True, mandatory=True, desc="normalised fixed (template) image")
    moving_image = File(exists=True, mandatory=True, desc="normalised moving (subject) image")
    prealign_xfm = File(exists=True, mandatory=True, desc="affine from Prealign")
    keep_storage = traits.Bool(False, usedefault=True,
                               desc="lattice over the stored grids (pre-alignment 'none')")
    model = _choice(options.DEFAULT_MODEL, options.MODELS)
    weights = File(exists=True, desc="weights file (default: the cache)")
    device = traits.Str(options.DEFAULT_DEVICE, usedefault=True, desc="auto, cpu or cuda[:N]")
    precision = _choice(options.DEFAULT_PRECISION, options.PRECISIONS,
                        desc="network arithmetic on CUDA (tf32 is opt-in)")
    io_checkpointing = _choice(options.DEFAULT_IO_CHECKPOINTING, options.IO_CHECKPOINTING,
                               desc="recompute (on) or keep (off) the U-Nets' activations "
                                    "in IO; auto: the engine's choice")
    use_gpu = traits.Bool(False, usedefault=True,
                          desc="tells nipype's MultiProc to schedule this node on a GPU slot")
    network_size = traits.Int(options.DEFAULT_NETWORK_SIZE, usedefault=True,
                              desc="network input grid N^3")
    io_iterations = traits.Int(options.IO_STEPS, usedefault=True,
                               desc="instance-optimisation steps")
    io_similarity = _choice(options.DEFAULT_SIMILARITY, options.SIMILARITIES)
    num_threads = traits.Int(1, usedefault=True, desc="CPU threads torch may use (n_procs)")


class _UniGradICONOutputSpec(TraitedSpec):
    forward_xfm = File(exists=True, desc="maps fixed points to moving points (moving -> fixed "
                                         "resampling)")
    inverse_xfm = File(exists=True, desc="maps moving points to fixed points (fixed -> moving "
                                         "resampling)")
    provenance = traits.Dict(desc="model, weights SHA-256/URL, settings, timings")


class UniGradICON(SimpleInterface):
    """uniGradICON inference and instance optimisation; both directions as ITK composites."""

    input_spec = _UniGradICONInputSpec
    output_spec = _UniGradICONOutputSpec

    def _run_interface(self, runtime):
        self._results["forward_xfm"] = os.path.join(runtime.cwd, "forward_xfm.h5")
        self._results["inverse_xfm"] = os.path.join(runtime.cwd, "inverse_xfm.h5")
        self._results["provenance"] = files.register_images(
            self.inputs.fixed_image, self.inputs.moving_image, self.inputs.prealign_xfm,
            forward_file=self._results["forward_xfm"], inverse_file=self._results["inverse_xfm"],
            keep_storage=self.inputs.keep_storage, model=self.inputs.model,
            weights=_optional(self.inputs.weights), device=self.inputs.device,
            precision=self.inputs.precision, io_checkpointing=self.inputs.io_checkpointing,
            network_size=self.inputs.network_size, io_iterations=self.inputs.io_iterations,
            io_similarity=self.inputs.io_similarity, num_threads=self.inputs.num_threads)
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to resample")
    transform = InputMultiObject(
        File(exists=True), mandatory=True,
        desc="mode-image transform (.h5; maps reference points to in_file points), or a list "
             "applied in the listed order: the first maps the reference grid's points, the last "
             "gives points of in_file's space; [A, B] is antsApplyTransforms -t A -t B")
    reference = File(exists=True, mandatory=True, desc="image defining the output grid")
    interpolation = _choice(options.DEFAULT_INTERPOLATION, options.INTERPOLATIONS)


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="resampled image")


class ApplyTransform(SimpleInterface):
    """Resample an image through a mode-image transform onto a reference grid."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        self._results["out_file"] = files.resample_image(
            self.inputs.in_file, self.inputs.transform, self.inputs.reference,
            os.path.join(runtime.cwd, f"{files.stem(self.inputs.in_file)}_resampled.nii.gz"),
            self.inputs.interpolation)
        return runtime


class _JacobianInputSpec(BaseInterfaceInputSpec):
    transform = File(exists=True, mandatory=True, desc="mode-image transform (.h5)")
    reference = File(exists=True, mandatory=True, desc="grid on which to evaluate it")


class _JacobianOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="log Jacobian determinant (det clipped at 1e-3)")
    folded_fraction = traits.Float(desc="fraction of voxels with det <= 0")


class LogJacobian(SimpleInterface):
    """Log Jacobian determinant map of a transform, and its folded-voxel fraction."""

    input_spec = _JacobianInputSpec
    output_spec = _JacobianOutputSpec

    def _run_interface(self, runtime):
        out_file = os.path.join(runtime.cwd, "logjacobian.nii.gz")
        self._results["folded_fraction"] = files.log_jacobian_image(
            self.inputs.transform, self.inputs.reference, out_file)
        self._results["out_file"] = out_file
        return runtime


class _SimilarityInputSpec(BaseInterfaceInputSpec):
    fixed = File(exists=True, mandatory=True, desc="fixed (template) image")
    warped = File(exists=True, mandatory=True, desc="moving image resampled onto the fixed grid")
    mask = File(exists=True, desc="fixed-space mask (default: the fixed image's non-zero voxels)")


class _SimilarityOutputSpec(TraitedSpec):
    similarity = traits.Float(desc="global normalised cross-correlation, -1..1")


class Similarity(SimpleInterface):
    """The similarity of a registration's result: NCC of the fixed and resampled images."""

    input_spec = _SimilarityInputSpec
    output_spec = _SimilarityOutputSpec

    def _run_interface(self, runtime):
        self._results["similarity"] = files.similarity_after(
            self.inputs.fixed, self.inputs.warped, _optional(self.inputs.mask))
        return runtime
