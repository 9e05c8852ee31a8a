"""Nipype interfaces for atlas labels (:mod:`ugi_bids.interfaces.files`, labels section):
propagation into native space, region volumes, and multi-atlas label fusion. Each declares its
traits and calls one file-level step."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..engine import options
from . import files
from .registration import _choice


class _PropagateInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="label map (or mask) in a template space")
    transform = InputMultiObject(
        File(exists=True), mandatory=True,
        desc="mode-image transform from the template space to the subject (maps subject points "
             "to template points), or a list applied in the listed order: the first maps the "
             "reference grid's points, the last gives points of in_file's space (e.g. "
             "[from-T1w_to-orig, from-MNI_to-T1w]); [A, B] is antsApplyTransforms -t A -t B")
    reference = File(exists=True, mandatory=True, desc="the subject image: the output grid")


class _PropagateOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="integer label map on the reference grid")


class PropagateLabels(SimpleInterface):
    """Carry a label map into a subject's space, ANTs ``GenericLabel`` semantics."""

    input_spec = _PropagateInputSpec
    output_spec = _PropagateOutputSpec

    def _run_interface(self, runtime):
        self._results["out_file"] = files.propagate_labels(
            self.inputs.in_file, self.inputs.transform, self.inputs.reference,
            os.path.join(runtime.cwd, f"{files.stem(self.inputs.in_file)}_native.nii.gz"))
        return runtime


class _VolumesInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="integer label map")
    table = File(exists=True, mandatory=True, desc="lookup table (BIDS dseg.tsv)")
    brain_mask = File(exists=True, desc="brain mask on the same grid (for the brain volume)")


class _VolumesOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="volumes.tsv: index, name, voxels, volume_mm3")
    brain_volume = traits.Either(None, traits.Float, desc="brain volume (mm^3) or None")


class RegionVolumes(SimpleInterface):
    """Voxels and mm³ of every labelled region, and the brain volume."""

    input_spec = _VolumesInputSpec
    output_spec = _VolumesOutputSpec

    def _run_interface(self, runtime):
        self._results["out_file"] = os.path.join(runtime.cwd, "volumes.tsv")
        mask = self.inputs.brain_mask if isdefined(self.inputs.brain_mask) else None
        self._results["brain_volume"] = files.region_volumes_file(
            self.inputs.in_file, self.inputs.table, self._results["out_file"], mask)
        return runtime


class _WarpLibraryInputSpec(BaseInterfaceInputSpec):
    target = File(exists=True, mandatory=True, desc="the session's anatomical image")
    target_modality = _choice(options.DEFAULT_MODALITY, options.MODALITIES)
    images = InputMultiObject(File(exists=True), mandatory=True, desc="library intensities")
    labels = InputMultiObject(File(exists=True), mandatory=True, desc="library label maps")
    modalities = traits.List(traits.Str, desc="intensity model of each library image")
    prealign = _choice(options.DEFAULT_PREALIGN, options.PREALIGN_MODES)
    prealign_dof = _choice(options.DEFAULT_PREALIGN_DOF, options.PREALIGN_DOFS,
                           desc="degrees of freedom of the affine pre-alignment")
    model = _choice(options.DEFAULT_MODEL, options.MODELS)
    weights = File(exists=True, desc="weights file (default: the cache)")
    device = traits.Str(options.DEFAULT_DEVICE, usedefault=True)
    precision = _choice(options.DEFAULT_PRECISION, options.PRECISIONS)
    io_checkpointing = _choice(options.DEFAULT_IO_CHECKPOINTING, options.IO_CHECKPOINTING)
    network_size = traits.Int(options.DEFAULT_NETWORK_SIZE, usedefault=True)
    io_iterations = traits.Int(options.IO_STEPS, usedefault=True)
    io_similarity = _choice(options.DEFAULT_SIMILARITY, options.SIMILARITIES)
    use_gpu = traits.Bool(False, usedefault=True,
                          desc="tells nipype's MultiProc to schedule this node on a GPU slot")
    num_threads = traits.Int(1, usedefault=True, desc="CPU threads torch may use (n_procs)")


class _WarpLibraryOutputSpec(TraitedSpec):
    warped_images = OutputMultiObject(File(exists=True), desc="library images on the target grid")
    warped_labels = OutputMultiObject(File(exists=True), desc="library labels on the target grid")
    provenance = traits.List(traits.Dict, desc="per library image: files, seconds, device")


class WarpLibrary(SimpleInterface):
    """Register every library image to the target (model loaded once) and resample it and
    its labels onto the target grid."""

    input_spec = _WarpLibraryInputSpec
    output_spec = _WarpLibraryOutputSpec

    def _run_interface(self, runtime):
        weights = self.inputs.weights if isdefined(self.inputs.weights) else None
        modalities = self.inputs.modalities if isdefined(self.inputs.modalities) else None
        (self._results["warped_images"], self._results["warped_labels"],
         self._results["provenance"]) = files.warp_library(
            self.inputs.target, list(self.inputs.images), list(self.inputs.labels), runtime.cwd,
            target_modality=self.inputs.target_modality, modalities=modalities,
            prealign=self.inputs.prealign, prealign_dof=self.inputs.prealign_dof,
            model=self.inputs.model, weights=weights,
            device=self.inputs.device, precision=self.inputs.precision,
            io_checkpointing=self.inputs.io_checkpointing,
            network_size=self.inputs.network_size, io_iterations=self.inputs.io_iterations,
            io_similarity=self.inputs.io_similarity, num_threads=self.inputs.num_threads)
        return runtime


class _FuseInputSpec(BaseInterfaceInputSpec):
    target = File(exists=True, mandatory=True, desc="the session's anatomical image")
    images = InputMultiObject(File(exists=True), mandatory=True, desc="warped library images")
    labels = InputMultiObject(File(exists=True), mandatory=True, desc="warped library labels")
    method = _choice(options.DEFAULT_FUSION, options.FUSION_METHODS)
    device = traits.Str(options.DEFAULT_DEVICE, usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True,
                          desc="tells nipype's MultiProc to schedule this node on a GPU slot")
    num_threads = traits.Int(1, usedefault=True, desc="CPU threads torch may use (n_procs)")


class _FuseOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="fused label map on the target grid")
    parameters = traits.Dict(desc="fusion method and parameters")


class FuseLabels(SimpleInterface):
    """Multi-atlas label fusion (joint label fusion or majority vote), in torch."""

    input_spec = _FuseInputSpec
    output_spec = _FuseOutputSpec

    def _run_interface(self, runtime):
        self._results["out_file"] = os.path.join(runtime.cwd, "fused_dseg.nii.gz")
        self._results["parameters"] = files.fuse_label_files(
            self.inputs.target, list(self.inputs.images), list(self.inputs.labels),
            self._results["out_file"], method=self.inputs.method, device=self.inputs.device,
            num_threads=self.inputs.num_threads)
        return runtime
