"""The settings of one ``ugi-bids`` run, filled by the command-line parser (and optionally a
``--config-file``), read by the workflow builders. Plain data: no I/O happens here."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

#: BIDS suffixes we register, and the intensity model each one uses.
SUFFIX_MODALITY = {"T1w": "mri", "T2w": "mri", "FLAIR": "mri", "PDw": "mri", "CT": "ct"}

#: ``--sloppy`` network grid: quick looks and tests (the released model uses 175).
SLOPPY_NETWORK_SIZE = 65


@dataclass
class SpaceSpec:
    """One output space: a TemplateFlow name or a custom template given by path.

    ``resolution`` is a TemplateFlow resolution index (``res-``), not millimetres; ``cohort``
    selects a TemplateFlow cohort. ``path``/``mask`` are set only for custom templates
    (``--template NAME=PATH[,mask=PATH]``).
    """

    name: str
    resolution: str | None = None
    cohort: str | None = None
    path: Path | None = None
    mask: Path | None = None

    @property
    def is_custom(self) -> bool:
        return self.path is not None

    @property
    def label(self) -> str:
        """The ``space-`` / ``to-`` label: name plus ``+cohort`` when a cohort is set (NiPreps)."""
        return f"{self.name}+{self.cohort}" if self.cohort else self.name


@dataclass
class Config:
    """Everything a run needs. Paths are absolute."""

    # positional arguments
    bids_dir: Path
    output_dir: Path
    analysis_level: str = "participant"
    # BIDS selection
    participant_label: list[str] = field(default_factory=list)  # without "sub-"; empty = all
    session_label: list[str] = field(default_factory=list)  # without "ses-"; empty = all
    bids_filters: dict = field(default_factory=dict)  # query name (t1w, t2w, ...) -> entities
    bids_database_dir: Path | None = None
    skip_bids_validation: bool = False
    anat_suffixes: list[str] = field(default_factory=lambda: ["T1w"])
    # spaces
    output_spaces: list[SpaceSpec] = field(default_factory=lambda: [SpaceSpec("MNI152NLin2009cAsym")])
    # registration
    model: str = "unigradicon"
    weights: Path | None = None
    io_iterations: int = 50
    io_similarity: str = "lncc"
    prealign: str = "affine"
    device: str = "auto"
    precision: str = "float32"
    io_checkpointing: str = "auto"
    gpu_procs: int = 1
    sloppy: bool = False
    # performance
    nprocs: int | None = None
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    plugin: dict | None = None  # {"plugin": "MultiProc", "plugin_args": {...}}
    # other
    work_dir: Path = field(default_factory=lambda: Path("work").absolute())
    clean_workdir: bool = False
    stop_on_first_crash: bool = False
    resource_monitor: bool = False
    boilerplate_only: bool = False
    reports_only: bool = False
    notrack: bool = False
    verbose: int = 0
    # set at parse time
    run_uuid: str = field(default_factory=lambda: "{}_{}".format(
        datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"), uuid.uuid4()))

    @property
    def network_size(self) -> int:
        """Network input grid: 175 (released model), or the reduced grid under ``--sloppy``."""
        return SLOPPY_NETWORK_SIZE if self.sloppy else 175

    def to_dict(self) -> dict:
        """JSON-friendly form (paths as strings), for logs and provenance."""
        def clean(value):
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value
        return clean(asdict(self))
