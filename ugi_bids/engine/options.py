"""The engine's choices and defaults, in one place and without importing torch.

The command-line parsers (``ugi-bids``, ``ugi-register``), the Nipype interfaces' traits and the
engine itself read these names, so that a choice added here reaches every front end, and so
that ``--help`` does not load the registration stack.
"""

from __future__ import annotations

#: Released models (their weights: :data:`ugi_bids.engine.model.weights.MODELS`).
MODELS = ("unigradicon", "multigradicon")
DEFAULT_MODEL = "unigradicon"

#: Intensity models: MRI windows [min, 99th percentile], CT [-1000, 1000] HU.
MODALITIES = ("mri", "ct")
DEFAULT_MODALITY = "mri"

#: Pre-alignment: ``none`` (the published tool's voxel-grid correspondence), ``header`` (trust
#: the headers' world coordinates) or ``affine`` (fit an affine in world space).
PREALIGN_MODES = ("none", "header", "affine")
DEFAULT_PREALIGN = "affine"
#: Degrees of freedom of the affine pre-alignment: rigid, similarity, rigid + per-axis scale,
#: full affine (``--prealign-dof``).
PREALIGN_DOFS = (6, 7, 9, 12)
DEFAULT_PREALIGN_DOF = 12

#: Masks: multiplied into the normalised ``input``, or restricting the IO ``loss``.
MASKING_MODES = ("input", "loss")
DEFAULT_MASKING = "input"

#: Instance-optimisation similarities (:mod:`ugi_bids.engine.optimise.similarity`).
SIMILARITIES = ("lncc", "lncc2", "mind")
DEFAULT_SIMILARITY = "lncc"

#: Instance-optimisation defaults of the published tool: 50 Adam steps, learning rate 2e-5.
IO_STEPS = 50
IO_LEARNING_RATE = 2e-5

#: Activation checkpointing in IO, as the command lines spell it: recompute (``on``), keep
#: (``off``) or let the engine choose (``auto``, ``None``).
IO_CHECKPOINTING = {"auto": None, "on": True, "off": False}
DEFAULT_IO_CHECKPOINTING = "auto"

#: Compute devices; ``auto`` takes a CUDA GPU where one is visible.
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"

#: Network arithmetic: full ``float32`` (default) or cuDNN's ``tf32`` on a GPU.
PRECISIONS = ("float32", "tf32")
DEFAULT_PRECISION = "float32"

#: Network input grid: 175^3 is the released model; smaller grids only for quick looks/tests.
DEFAULT_NETWORK_SIZE = 175
MIN_NETWORK_SIZE = 65
#: ``--sloppy`` network grid of ``ugi-bids``.
SLOPPY_NETWORK_SIZE = 65

#: Resampling: trilinear, nearest neighbour, or ANTs' ``GenericLabel``.
INTERPOLATIONS = ("linear", "nearest", "label")
DEFAULT_INTERPOLATION = "linear"

#: Multi-atlas label fusion: joint label fusion (Wang & Yushkevich 2013) or a majority vote.
FUSION_METHODS = ("jlf", "majority")
DEFAULT_FUSION = "jlf"

#: Subject anatomical reference (fMRIPrep's ``--subject-anatomical-reference``): register every
#: session on its own (``sessionwise``), or first build a deformable within-subject template of
#: a participant's sessions with uniGradICON (``unbiased``; participants with 2+ sessions).
ANATOMICAL_REFERENCES = ("sessionwise", "unbiased")
DEFAULT_ANATOMICAL_REFERENCE = "sessionwise"

#: Template building (subject templates and the group-level study template): shape-update
#: iterations, the ANTs-style shape-update gradient step in (0, 1], and how the resampled
#: inputs are averaged.
TEMPLATE_AVERAGES = ("mean", "median")
DEFAULT_TEMPLATE_AVERAGE = "mean"
DEFAULT_TEMPLATE_ITERATIONS = 4
DEFAULT_TEMPLATE_GRADIENT_STEP = 0.25
