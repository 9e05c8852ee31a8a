"""Provenance of a ugi-bids derivatives dataset: ``dataset_description.json``, ``.bidsignore``,
the citation boilerplate (``logs/CITATION.*``) and where crash files go.

Folder-name rule
----------------
BIDS asks that a derivatives dataset nested in ``derivatives/`` be named after the pipeline
(``derivatives/<pipeline>[-<variant>]``), with ``GeneratedBy[0].Name`` a substring of the folder
name. ugi-bids writes ``"Name": "ugi-bids"``, so ``derivatives/ugi-bids`` or
``derivatives/ugi-bids-sloppy`` are fine; any other output folder name gets a warning in the log
(the file is still written and valid).

Every file here is written atomically (:mod:`ugi_bids.engine.formats.staging`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterable, Mapping
from importlib import resources
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path
from typing import Any

from ..engine.formats.staging import atomic_file, write_text_atomic
from ..errors import OutputError

LOGGER = logging.getLogger("ugi_bids.provenance")

#: ``GeneratedBy[0].Name``; must be a substring of the output folder's name.
PIPELINE_NAME = "ugi-bids"
#: Version of the BIDS specification the outputs follow.
BIDS_VERSION = "1.10.0"
#: Where ``bids:templateflow:`` URIs resolve when no local TemplateFlow home is given.
TEMPLATEFLOW_URL = "https://github.com/templateflow/templateflow"
#: Environment variable a container image sets to its own reference (e.g. ``org/ugi-bids:0.1.0``).
CONTAINER_TAG_ENV = "UGI_BIDS_CONTAINER_TAG"
#: ``.bidsignore`` entries: reports, logs and crash files, transforms (BEP014 draft),
#: log-Jacobian maps (suffix not in the specification).
BIDSIGNORE_ENTRIES = ("*.html", "logs/", "figures/", "*_xfm.*", "log/", "*_jacobian.*",
                      "*_volumes.*", "group_*")
#: Pandoc citation key (``@key`` / ``[@key]``), as pandoc parses it.
_CITEKEY = re.compile(
    r"(?<![\w@.])@([A-Za-z0-9_](?:[A-Za-z0-9_]|[:.#$%&\-+?<>~/](?=[A-Za-z0-9_]))*)")
_BIBKEY = re.compile(r"^\s*@\w+\s*\{\s*([^,\s]+)\s*,", re.MULTILINE)


def dump_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# -- dataset_description.json --------------------------------------------------------------

def detect_container(
    version: str,
    environ: Mapping[str, str] | None = None,
    dockerenv: str | os.PathLike = "/.dockerenv",
) -> dict[str, str] | None:
    """``GeneratedBy.Container`` for the container we run in, or None outside containers.

    Apptainer/Singularity are recognised by the variables they set inside every container
    (``APPTAINER_CONTAINER``, ``SINGULARITY_CONTAINER``), Charliecloud by ``CH_RUNNING``, Docker by ``/.dockerenv``, Podman and
    others by ``container=<engine>``. The tag is ``$UGI_BIDS_CONTAINER_TAG`` (set by our image),
    else the ugi-bids version.
    """
    env = os.environ if environ is None else environ
    if env.get("APPTAINER_CONTAINER") or env.get("APPTAINER_NAME"):
        kind = "apptainer"
    elif env.get("SINGULARITY_CONTAINER") or env.get("SINGULARITY_NAME"):
        kind = "singularity"
    elif env.get("CH_RUNNING"):  # set by Charliecloud's ch-run in every container
        kind = "charliecloud"
    elif Path(dockerenv).exists():
        kind = "docker"
    elif env.get("container"):
        kind = env["container"]
    else:
        return None
    return {"Type": kind, "Tag": env.get(CONTAINER_TAG_ENV) or version}


def _normalise_doi(doi: str) -> str:
    """``10.x/y``, ``doi:10.x/y`` or ``https://doi.org/10.x/y`` -> ``doi:10.x/y`` (BIDS form)."""
    doi = doi.strip()
    for prefix in ("https://doi.org/", "http://doi.org/", "https://dx.doi.org/", "doi:"):
        if doi.lower().startswith(prefix):
            doi = doi[len(prefix):]
            break
    return f"doi:{doi}"


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` (with a warning) when missing or unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        LOGGER.warning("Ignoring unreadable %s (%s).", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def _source_dataset(raw_description: Mapping[str, Any]) -> dict[str, str]:
    """``SourceDatasets`` entry for the raw dataset: a BIDS URI resolved by ``DatasetLinks``."""
    entry = {"URL": "bids:raw:"}
    doi = raw_description.get("DatasetDOI")
    if isinstance(doi, str) and doi.strip():
        entry["DOI"] = _normalise_doi(doi)
    return entry


def _templateflow_link(templateflow_home: str | os.PathLike | None) -> str:
    """Where ``bids:templateflow:`` URIs point: a given local home, else the public archive."""
    if templateflow_home:
        return Path(templateflow_home).absolute().as_uri()
    return TEMPLATEFLOW_URL


def _code_url(code_url: str | None) -> str | None:
    """The explicit URL, else the installed distribution's source/home page, else None."""
    if code_url:
        return code_url
    try:
        meta = metadata(PIPELINE_NAME)
    except PackageNotFoundError:
        return None
    urls = dict(
        (label.strip().lower(), url.strip())
        for label, _, url in (entry.partition(",") for entry in meta.get_all("Project-URL") or [])
    )
    for label in ("source", "repository", "code", "homepage"):
        if urls.get(label):
            return urls[label]
    return meta.get("Home-page") or None


def build_dataset_description(
    *,
    bids_dir: str | os.PathLike,
    version: str,
    container: Mapping[str, str] | None = None,
    templateflow_home: str | os.PathLike | None = None,
    code_url: str | None = None,
) -> dict[str, Any]:
    """The content of ``dataset_description.json`` (no I/O besides reading the raw one).

    ``container``: None detects it (:func:`detect_container`); ``{}`` records none.
    """
    bids_dir = Path(bids_dir).absolute()
    raw = _read_json(bids_dir / "dataset_description.json")
    generated_by: dict[str, Any] = {"Name": PIPELINE_NAME, "Version": version}
    url = _code_url(code_url)
    if url:
        generated_by["CodeURL"] = url
    if container is None:
        container = detect_container(version)
    if container:
        generated_by["Container"] = dict(container)
    description: dict[str, Any] = {
        "Name": PIPELINE_NAME,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [_source_dataset(raw)],
        "DatasetLinks": {
            "raw": bids_dir.as_uri(),
            "templateflow": _templateflow_link(templateflow_home),
        },
        "HowToAcknowledge": (
            "Please cite uniGradICON (Tian et al., MICCAI 2024) and include the citation "
            "boilerplate in logs/CITATION.md in the Methods section of your manuscript."
        ),
    }
    if isinstance(raw.get("License"), str):
        description["License"] = raw["License"]
    return description


def check_output_folder_name(output_dir: str | os.PathLike, name: str = PIPELINE_NAME) -> bool:
    """True when ``name`` is a substring of the output folder's name; warns otherwise."""
    folder = Path(output_dir).absolute().resolve().name
    if name in folder:
        return True
    LOGGER.warning(
        "Output folder name %r does not contain the pipeline name %r: BIDS recommends naming a "
        "derivatives folder after the pipeline (e.g. derivatives/%s).", folder, name, name)
    return False


def _warn_on_version_change(path: Path, version: str) -> None:
    """Warn when an existing description was written by another ugi-bids version."""
    previous = _read_json(path).get("GeneratedBy") or [{}]
    old = previous[0].get("Version") if isinstance(previous[0], dict) else None
    if old and old != version:
        LOGGER.warning(
            "%s was written by %s %s; this run is %s: outputs of both versions may now be mixed.",
            path, PIPELINE_NAME, old, version)


def write_dataset_description(
    output_dir: str | os.PathLike,
    *,
    bids_dir: str | os.PathLike,
    version: str,
    container: Mapping[str, str] | None = None,
    templateflow_home: str | os.PathLike | None = None,
    code_url: str | None = None,
) -> Path:
    """Write ``OUTPUT_DIR/dataset_description.json`` (atomically) and return its path.

    See :func:`build_dataset_description` for the content; warns when the output folder's name
    does not contain ``"ugi-bids"`` or when a previous run of another version wrote the file.
    """
    output_dir = Path(output_dir)
    check_output_folder_name(output_dir)
    path = output_dir / "dataset_description.json"
    _warn_on_version_change(path, version)
    description = build_dataset_description(
        bids_dir=bids_dir, version=version, container=container,
        templateflow_home=templateflow_home, code_url=code_url)
    return write_text_atomic(path, dump_json(description))


# -- .bidsignore ---------------------------------------------------------------------------

def write_bidsignore(output_dir: str | os.PathLike, extra: Iterable[str] = ()) -> Path:
    """Add our entries (and ``extra``) to ``OUTPUT_DIR/.bidsignore``, keeping existing lines."""
    path = Path(output_dir) / ".bidsignore"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    present = {line.strip() for line in lines}
    for entry in (*BIDSIGNORE_ENTRIES, *extra):
        if entry not in present:
            lines.append(entry)
            present.add(entry)
    return write_text_atomic(path, "\n".join(lines) + "\n")


#: The run's settings (TOML), written into ``sub-<label>/log/<run_uuid>/`` by every
#: participant-level run and read back by the group level.
SETTINGS_FILE = "ugi-bids.toml"


# -- crash files ---------------------------------------------------------------------------

def crash_dir(
    output_dir: str | os.PathLike, participant: str, run_uuid: str, *, create: bool = False
) -> Path:
    """``OUTPUT_DIR/sub-<participant>/log/<run_uuid>/``, where a run's crash files go."""
    label = participant[4:] if participant.startswith("sub-") else participant
    path = Path(output_dir) / f"sub-{label}" / "log" / run_uuid
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


# -- citation boilerplate ------------------------------------------------------------------

def load_boilerplate_bib() -> str:
    """The BibTeX database shipped with ugi-bids (``ugi_bids/data/boilerplate.bib``)."""
    return resources.files("ugi_bids.data").joinpath("boilerplate.bib").read_text(encoding="utf-8")


def bib_keys(bib_text: str) -> set[str]:
    """Citation keys defined in a BibTeX text."""
    return set(_BIBKEY.findall(bib_text))


def cited_keys(markdown: str) -> set[str]:
    """Pandoc citation keys (``@key``) used in a Markdown text."""
    return set(_CITEKEY.findall(markdown))


def missing_citations(markdown: str, bib_text: str | None = None) -> set[str]:
    """Keys cited in ``markdown`` but absent from ``bib_text`` (default: our database)."""
    return cited_keys(markdown) - bib_keys(load_boilerplate_bib() if bib_text is None else bib_text)


def boilerplate_preamble(version: str, nipype_version: str | None = None) -> str:
    """Opening paragraph for the top-level workflow's ``__desc__``."""
    if nipype_version is None:
        import nipype

        nipype_version = nipype.__version__
    return (
        f"Results included in this manuscript come from image registration performed using "
        f"*ugi-bids* {version}, which registers anatomical images to templates of TemplateFlow "
        f"[@templateflow] with uniGradICON, a foundation model for medical image registration "
        f"[@unigradicon] trained with the GradICON regulariser [@gradicon], implemented with "
        f"PyTorch [@pytorch] and ITK [@itk]. The workflows are built on *Nipype* "
        f"{nipype_version} [@nipype1; @nipype2] and *NiWorkflows* [@niworkflows]; the input "
        f"dataset, organised following BIDS [@bids], was queried with PyBIDS [@pybids].\n"
    )


def boilerplate_postamble() -> str:
    """Closing section for the top-level workflow's ``__postdesc__`` (waiver + references)."""
    return (
        "\n### Copyright Waiver\n\n"
        "The above boilerplate text was automatically generated by ugi-bids with the express "
        "intention that users should copy and paste this text into their manuscripts "
        "*unchanged*. It is released under the "
        "[CC0](https://creativecommons.org/publicdomain/zero/1.0/) license.\n\n"
        "### References\n\n"
    )


def _workflow_children(workflow: Any) -> list[Any]:
    """Nodes of a nipype workflow in topological order (empty for plain nodes)."""
    graph = getattr(workflow, "_graph", None)
    if graph is None:
        return []
    from nipype.pipeline.engine.utils import topological_sort

    return list(topological_sort(graph)[0])


def _collect_fragments(workflow: Any, fragments: list[str]) -> None:
    """Depth-first: own ``__desc__``, sub-workflows in topological order, own ``__postdesc__``."""
    def add(text: Any) -> None:
        if isinstance(text, str):
            text = textwrap.dedent(text).strip()
            if text and text not in fragments:
                fragments.append(text)

    add(getattr(workflow, "__desc__", None))
    for child in _workflow_children(workflow):
        _collect_fragments(child, fragments)
    add(getattr(workflow, "__postdesc__", None))


def collect_boilerplate(workflow: Any) -> str:
    """The Markdown citation boilerplate of a workflow and all its sub-workflows.

    Works on plain nipype workflows and on niworkflows' ``LiterateWorkflow`` (which declares
    ``__desc__``/``__postdesc__``); a text repeated by several sub-workflows (e.g. one per
    output space) appears once. Paragraphs are separated by blank lines.

    Not ``LiterateWorkflow.visit_desc``: it removes repeats only of whole sub-workflow texts,
    so two participants whose sessions differ (one with a T2w) would print every template's
    registration paragraph twice, and it concatenates the texts as written (no dedent, no
    paragraph breaks). This walk is the same traversal, with repeats removed per paragraph.
    """
    fragments: list[str] = []
    _collect_fragments(workflow, fragments)
    return "\n\n".join(fragments) + ("\n" if fragments else "")


def _run_pandoc(pandoc: str, args: list[str], target: Path) -> Path | None:
    """Run pandoc into a temporary file and move it onto ``target``; None on failure."""
    try:
        with atomic_file(target, "citation file") as temporary:
            subprocess.run([pandoc, *args, "-o", temporary], cwd=target.parent, check=True,
                           capture_output=True, timeout=120)
        return target
    except OutputError as error:
        LOGGER.warning("pandoc could not write %s (%s); skipping it.", target.name, error)
        return None


def write_citation_files(
    output_dir: str | os.PathLike, markdown: str, bib_text: str | None = None
) -> dict[str, Path]:
    """Write ``logs/CITATION.md`` and ``logs/CITATION.bib`` (+ ``.html``/``.tex`` with pandoc).

    ``bib_text`` defaults to ugi-bids' database. Without pandoc on ``PATH`` the HTML and LaTeX
    versions are skipped silently; a failing pandoc only logs a warning. Returns the written
    files by extension (``"md"``, ``"bib"``, ``"html"``, ``"tex"``).
    """
    logs = Path(output_dir) / "logs"
    missing = missing_citations(markdown, bib_text)
    if missing:
        LOGGER.warning("Boilerplate cites keys missing from the bibliography: %s",
                       ", ".join(sorted(missing)))
    written = {
        "md": write_text_atomic(logs / "CITATION.md", markdown),
        "bib": write_text_atomic(logs / "CITATION.bib",
                                 load_boilerplate_bib() if bib_text is None else bib_text),
    }
    pandoc = shutil.which("pandoc")
    if pandoc is None:
        return written
    common = ["-s", "--bibliography", "CITATION.bib", "CITATION.md"]
    html = _run_pandoc(pandoc, [*common, "--citeproc", "--metadata",
                                "pagetitle=ugi-bids citation boilerplate"], logs / "CITATION.html")
    tex = _run_pandoc(pandoc, [*common, "--natbib"], logs / "CITATION.tex")
    written.update({key: path for key, path in (("html", html), ("tex", tex)) if path})
    return written
