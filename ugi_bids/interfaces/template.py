"""Nipype interface over the template builder (:func:`ugi_bids.interfaces.files.build_template_files`).

Directions: ``forward_xfms[i]`` maps TEMPLATE points to points of input ``i`` (it resamples
input ``i`` onto the template: ``from-<input>_to-<template>_mode-image``); ``inverse_xfms[i]``
maps input ``i``'s points to template points.
"""

from __future__ import annotations

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
from .registration import _choice, _optional


def _optional_int(value):
    """An integer trait's value, or None when it was not set (0 is a value)."""
    return value if isdefined(value) else None


class _BuildTemplateInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True,
                                desc="raw images (sessions of a subject, or one per participant)")
    modality = _choice(options.DEFAULT_MODALITY, options.MODALITIES, desc="intensity model")
    iterations = traits.Int(options.DEFAULT_TEMPLATE_ITERATIONS, usedefault=True,
                            desc="shape-update iterations")
    gradient_step = traits.Float(options.DEFAULT_TEMPLATE_GRADIENT_STEP, usedefault=True,
                                 desc="shape-update step")
    average = _choice(options.DEFAULT_TEMPLATE_AVERAGE, options.TEMPLATE_AVERAGES,
                      desc="how the resampled inputs are combined")
    voxel_size = traits.Float(desc="template voxel size (mm); default the finest input voxel")
    cache_dir = traits.Str(desc="resume cache: finished rounds are reused by a rerun")
    model = _choice(options.DEFAULT_MODEL, options.MODELS)
    weights = File(exists=True, desc="weights file (default: the cache)")
    device = traits.Str(options.DEFAULT_DEVICE, usedefault=True, desc="auto, cpu or cuda[:N]")
    precision = _choice(options.DEFAULT_PRECISION, options.PRECISIONS)
    io_checkpointing = _choice(options.DEFAULT_IO_CHECKPOINTING, options.IO_CHECKPOINTING)
    use_gpu = traits.Bool(False, usedefault=True,
                          desc="tells nipype's MultiProc to schedule this node on a GPU slot")
    network_size = traits.Int(options.DEFAULT_NETWORK_SIZE, usedefault=True)
    prealign = _choice(options.DEFAULT_PREALIGN, options.PREALIGN_MODES)
    io_iterations = traits.Int(0, usedefault=True,
                               desc="instance-optimisation steps of the shape-update rounds")
    final_io_iterations = traits.Int(
        desc="instance-optimisation steps of the final round (default: io_iterations)")
    io_similarity = _choice(options.DEFAULT_SIMILARITY, options.SIMILARITIES)
    num_threads = traits.Int(1, usedefault=True, desc="CPU threads torch may use (n_procs)")


class _BuildTemplateOutputSpec(TraitedSpec):
    template = File(exists=True, desc="the template (normalised intensities, float32)")
    forward_xfms = OutputMultiObject(File(exists=True),
                                     desc="per input: maps template points to input points")
    inverse_xfms = OutputMultiObject(File(exists=True),
                                     desc="per input: maps input points to template points")
    provenance = traits.Dict(desc="model, weights, settings, convergence history, timings")


class BuildTemplate(SimpleInterface):
    """An unbiased deformable template of the inputs, and every input's transforms to it."""

    input_spec = _BuildTemplateInputSpec
    output_spec = _BuildTemplateOutputSpec

    def _run_interface(self, runtime):
        self._results.update(files.build_template_files(
            list(self.inputs.in_files), runtime.cwd, modality=self.inputs.modality,
            iterations=self.inputs.iterations, gradient_step=self.inputs.gradient_step,
            average=self.inputs.average, voxel_size=_optional(self.inputs.voxel_size),
            cache_dir=_optional(self.inputs.cache_dir), model=self.inputs.model,
            weights=_optional(self.inputs.weights), device=self.inputs.device,
            precision=self.inputs.precision, io_checkpointing=self.inputs.io_checkpointing,
            network_size=self.inputs.network_size, prealign=self.inputs.prealign,
            io_iterations=self.inputs.io_iterations,
            final_io_iterations=_optional_int(self.inputs.final_io_iterations),
            io_similarity=self.inputs.io_similarity,
            num_threads=self.inputs.num_threads))
        return runtime
