"""The ``ugi-bids`` entry point: ``ugi-bids BIDS_DIR OUTPUT_DIR participant [options]``.

Order of work, so that bad input fails fast and leaves nothing behind:

1. parse the command line (one-line errors, BIDS-App exit codes);
2. index the dataset, select participants, sessions and one reference image per session and
   suffix; check every selected image (readable, 3D, finite);
3. resolve every output space to template files (TemplateFlow or custom paths) and the weights;
4. only then create the output folder, write ``dataset_description.json``, ``.bidsignore`` and
   ``logs/CITATION.*``, build the Nipype workflow, write the run's settings
   (``sub-<label>/log/<run_uuid>/ugi-bids.toml``, a ``--config-file`` that reproduces the run)
   and run it; after a successful run, ``--clean-workdir`` removes the run's work folders.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from ..config import Config
from ..errors import InputDataError, NoDataError, UsageError, guarded, one_line, print_error
from .parser import PROG, parse_args

LOGGER = logging.getLogger("ugi_bids")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ugi-bids``; returns the exit code (never raises for user errors)."""
    def parse_and_run() -> int:
        config = parse_args(argv)
        _setup_logging(config.verbose)
        return run(config)

    return guarded(PROG, parse_and_run)


def _setup_logging(verbose: int) -> None:
    """Our progress lines and warnings always show, one line each. Library output (nipype's
    node logs and tracebacks, Python warnings) only with ``-v``: at the default verbosity a
    failed step is reported by :func:`report_failed_nodes`, one line per node."""
    import warnings

    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%y%m%d-%H:%M:%S", stream=sys.stderr)
    LOGGER.setLevel(min(level, logging.INFO))  # our own progress lines always show
    # engine details (pre-alignment levels, IO steps) and input selection details only with -v
    for name in ("ugi_bids.engine", "ugi_bids.utils.bids"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging  # noqa: F401 (sets up nipype's handlers)

    # nipype adds its own stdout handler: its messages would come twice (stdout and our
    # stderr); they go through ours only
    nipype_root = logging.getLogger("nipype")
    for handler in list(nipype_root.handlers):
        nipype_root.removeHandler(handler)
    nipype_level = ("DEBUG" if verbose > 1 else "INFO" if verbose == 1 else "CRITICAL")
    nipype_config.update_config({"logging": {"workflow_level": nipype_level,
                                             "interface_level": nipype_level,
                                             "utils_level": nipype_level}})
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).setLevel(nipype_level)
    if not verbose:
        warnings.simplefilter("ignore")  # forked workers inherit it


def select_inputs(config: Config, skipped: dict | None = None) -> dict:
    """``{participant: {session: {suffix: reference image}}}`` for the run.

    Every selected image is read and checked here, before anything is written: readable,
    3-D, finite, a valid header (:func:`~ugi_bids.engine.spatial.volume.load_volume`, with
    ``--mem`` bounding the memory an image may take) and registrable
    (:func:`~ugi_bids.engine.checks.check_registrable`; its modality warnings are logged).

    Participants (or sessions) without any image are reported and skipped. A participant with
    an unusable image is reported and skipped (its reason goes into ``skipped``, by label),
    or stops the run under ``--stop-on-first-crash``. Raises :class:`InputDataError` (65)
    when every participant was skipped for an unusable image, :class:`NoDataError` (18) when
    nothing was selected otherwise."""
    from ..config import SUFFIX_MODALITY
    from ..engine.checks import check_registrable
    from ..engine.spatial.volume import load_volume, memory_available_bytes
    from ..utils.bids import (
        collect_anatomicals,
        load_layout,
        participants,
        select_reference,
        strip_prefix,
        unindexed_participants,
    )

    skipped = {} if skipped is None else skipped
    # --mem (decimal GB), else what is free now: an image this run cannot even read fails here
    memory = int(config.mem_gb * 1e9) if config.mem_gb else memory_available_bytes()
    layout = load_layout(config.bids_dir, config.bids_database_dir,
                         validate=not config.skip_bids_validation)
    # pybids leaves out a sub-<label> folder without any BIDS file (an empty anat/): report it
    empty = unindexed_participants(layout)
    wanted = [strip_prefix(label, "sub-") for label in config.participant_label]
    labels = [label for label in wanted if label not in empty]
    if wanted and not labels:
        raise NoDataError("no usable image: the folder of {} in {} holds no BIDS image".format(
            ", ".join(f"sub-{label}" for label in wanted), config.bids_dir))
    # reported once the run is known to go on: a run that stops says one line only
    reports = [_no_image(config, participant, None, "its folder holds no BIDS image")
               for participant in ([label for label in wanted if label in empty]
                                   if wanted else empty)]
    selected = {}
    for participant in participants(layout, labels):
        found = collect_anatomicals(layout, participant, suffixes=tuple(config.anat_suffixes),
                                    sessions=tuple(config.session_label),
                                    filters=config.bids_filters)
        sessions = {}
        for session, suffixes in found.items():
            chosen = {suffix: select_reference(files) for suffix, files in suffixes.items()
                      if files}
            if chosen:
                sessions[session] = chosen
            elif session is not None:  # a participant without sessions: reported below
                reports.append(_no_image(config, participant, session))
        if not sessions:
            reports.append(_no_image(config, participant, None))
            continue
        try:
            for suffixes in sessions.values():
                for suffix, image in suffixes.items():
                    volume = load_volume(image, f"{suffix} image", memory)
                    for warning in check_registrable(volume, SUFFIX_MODALITY[suffix],
                                                     f"{suffix} image {image}"):
                        LOGGER.warning("sub-%s: %s", participant, warning)
                    del volume
        except InputDataError as error:
            reason = one_line(error)
            if config.stop_on_first_crash:
                raise InputDataError(f"sub-{participant}: {reason} (stopping: "
                                     "--stop-on-first-crash)") from None
            skipped[participant] = reason
            continue
        selected[participant] = sessions
    if not selected and skipped:
        first = next(iter(skipped))
        more = f" (and {len(skipped) - 1} more participant(s))" if len(skipped) > 1 else ""
        raise InputDataError(f"no participant could be processed: sub-{first}: "
                             f"{skipped[first]}{more}")
    if not selected:
        raise NoDataError("no usable anatomical image ({}) was selected for participant(s) {}; "
                          "check --participant-label, --session-label, --anat-suffixes and the "
                          "BIDS filter file".format(", ".join(config.anat_suffixes),
                                                    ", ".join(config.participant_label) or "(all)"))
    for report in reports:
        LOGGER.warning("%s", report)
    for participant, reason in skipped.items():
        LOGGER.warning("sub-%s: skipped: %s", participant, reason)
    return selected


def _no_image(config: Config, participant: str, session: str | None,
              why: str | None = None) -> str:
    """The report of a participant (or session) without any image to process; raises under
    ``--stop-on-first-crash``."""
    where = f"sub-{participant}" + (f" ses-{session}" if session else "")
    message = f"{where}: no usable {'/'.join(config.anat_suffixes)} image"
    if why:
        message += f" ({why})"
    if config.stop_on_first_crash:
        raise NoDataError(message + " (stopping: --stop-on-first-crash)")
    return message + "; skipped"


def resolve_resources(config: Config) -> tuple[dict, list, list]:
    """Resolve every output space, for every anatomical suffix, to template files
    (``{suffix: [ResolvedTemplate]}``), every atlas and atlas library to checked files, and
    the weights to a checked path. Fails fast, one line, before anything is written."""
    from ..engine.model.weights import checked_state_dict, resolve_weights
    from ..utils.atlases import resolve_atlas, resolve_library
    from ..utils.templates import resolve_template

    templates = {suffix: [resolve_template(spec, suffix) for spec in config.output_spaces]
                 for suffix in config.anat_suffixes}
    atlases = [resolve_atlas(spec, templates[config.anat_suffixes[0]])
               for spec in config.atlases]
    libraries = [resolve_library(spec) for spec in config.atlas_libraries]
    labels = [item.label for item in (*atlases, *libraries)]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UsageError(f"two atlases would write {repeated[0]}: give each --atlases and "
                         "--atlas-library entry its own name")
    config.weights = Path(resolve_weights(config.model, config.weights, download=False))
    checked_state_dict(config.weights, config.model)  # a truncated or foreign file stops here
    return templates, atlases, libraries


def write_dataset_files(config: Config, workflow, label_sets=()) -> None:
    """dataset_description.json, .bidsignore, logs/CITATION.* and the lookup table of every
    atlas (``atlas-<A>[_desc-<D>]_dseg.tsv``, BIDS columns) in the output folder."""
    from ..engine.formats.staging import write_text_atomic
    from ..workflows.base import atlas_table_path

    from .. import __version__
    from ..utils.provenance import (
        collect_boilerplate,
        write_bidsignore,
        write_citation_files,
        write_dataset_description,
    )

    write_dataset_description(config.output_dir, bids_dir=config.bids_dir, version=__version__,
                              templateflow_home=os.environ.get("TEMPLATEFLOW_HOME"))
    write_bidsignore(config.output_dir)
    write_citation_files(config.output_dir, collect_boilerplate(workflow))
    for item in label_sets:
        write_text_atomic(atlas_table_path(config.output_dir, item.label), item.table.to_tsv(),
                          "atlas lookup table")




def write_run_settings(requested: Config, participants, environment: dict) -> list[Path]:
    """Write the settings asked for (``requested``, as parsed) as TOML into
    ``OUTPUT_DIR/sub-<label>/log/<run_uuid>/ugi-bids.toml`` for every participant, atomically;
    a ``--config-file`` that reproduces the run. ``environment`` (versions, the device and
    weights resolved) goes into the ``[environment]`` record."""
    from ..engine.formats.staging import write_text_atomic
    from ..utils.provenance import SETTINGS_FILE, crash_dir

    text = requested.to_toml(environment)
    return [write_text_atomic(crash_dir(requested.output_dir, participant, requested.run_uuid)
                              / SETTINGS_FILE, text, "run settings")
            for participant in participants]


def clean_work_dir(config: Config, workflow) -> list[Path]:
    """``--clean-workdir``, after a successful run: remove the run's folders from the work
    directory, ``-w/<workflow>/<participant workflow>`` for each participant of ``workflow``,
    then ``-w/<workflow>`` if nothing else is left in it. Other runs' folders stay (several
    participants may share ``-w`` at once); nothing outside ``-w`` nor holding ``OUTPUT_DIR``
    or ``BIDS_DIR`` is removed. A folder that cannot be removed is a warning. Returns the
    folders removed."""
    root = config.work_dir.resolve()
    keep = (config.output_dir.resolve(), config.bids_dir.resolve())
    top = config.work_dir / workflow.name
    children = dict.fromkeys(name.split(".")[0] for name in workflow.list_node_names())
    removed = []
    for folder in [top / child for child in children] + [top]:
        if not folder.is_dir() or folder.is_symlink():
            continue
        resolved = folder.resolve()
        if root not in resolved.parents or any(
                path == resolved or resolved in path.parents for path in keep):
            LOGGER.warning("--clean-workdir: %s left in place (outside %s, or holding the "
                           "input or output folder)", folder, config.work_dir)
            continue
        try:
            if folder == top:
                folder.rmdir()  # only once empty: it may hold other runs' participants
            else:
                shutil.rmtree(folder)
        except OSError as exc:
            if folder != top:
                LOGGER.warning("--clean-workdir: could not remove %s: %s", folder, exc)
            continue
        removed.append(folder)
    LOGGER.info("--clean-workdir: removed %d folder(s) from %s", len(removed), config.work_dir)
    return removed


def plugin_settings(config: Config, *, use_gpu: bool = False) -> dict:
    """Nipype plugin and arguments from ``--use-plugin``, ``--nprocs``, ``--mem``,
    ``--gpu-procs`` (MultiProc by default; Linear when a single process is asked for).

    ``use_gpu``: the registrations run on this machine's GPU. MultiProc charges a GPU node
    ``min(n_procs, n_gpu_procs)`` GPU slots, and a registration's ``n_procs`` is its CPU
    thread count: so that ``--gpu-procs N`` registrations share the GPU, it gets N times that
    many slots."""
    from ..workflows.base import threads_per_registration

    if config.plugin:
        settings = {"plugin": config.plugin["plugin"],
                    "plugin_args": dict(config.plugin.get("plugin_args") or {})}
    elif config.nprocs == 1:
        settings = {"plugin": "Linear", "plugin_args": {}}
    else:
        settings = {"plugin": "MultiProc", "plugin_args": {}}
    args = settings["plugin_args"]
    if settings["plugin"] == "MultiProc":
        if config.nprocs:
            args.setdefault("n_procs", config.nprocs)
        if config.mem_gb:
            args.setdefault("memory_gb", config.mem_gb)
        if use_gpu:
            args.setdefault("n_gpu_procs",
                            config.gpu_procs * threads_per_registration(config, use_gpu))
        args.setdefault("raise_insufficient", False)
        args.setdefault("maxtasksperchild", 1000)  # keep workers (and their loaded model) alive
    return settings


#: Plugins that submit every node as a Slurm job (``sbatch``).
SLURM_PLUGINS = ("SLURM", "SLURMGraph")


def request_node_resources(workflow, plugin: str) -> int:
    """Give every node that a ``SLURM``/``SLURMGraph`` plugin submits its own request, from the
    node's annotations: ``--cpus-per-task`` = ``n_procs`` and ``--mem`` = ``mem_gb`` (MB,
    rounded up), appended to the plugin's ``sbatch_args`` (nipype adds a node's
    ``plugin_args["sbatch_args"]`` to the plugin's, after a space given here). A node that
    states its own ``sbatch_args`` keeps them. Every node gets a request, those marked to run
    without submitting included: SLURMGraph submits every node of the graph. Other schedulers
    keep the plugin's arguments. Returns the number of nodes given a request."""
    import math

    if plugin not in SLURM_PLUGINS:
        return 0
    count = 0
    for node in workflow._get_all_nodes():
        if "sbatch_args" in (node.plugin_args or {}):
            continue
        memory_mb = max(1, math.ceil(float(node.mem_gb) * 1024))
        # nipype joins the plugin's and the node's sbatch_args without a separator
        node.plugin_args = dict(node.plugin_args or {}, sbatch_args=(
            f" --cpus-per-task={max(1, int(node.n_procs))} --mem={memory_mb}M"))
        count += 1
    return count


def run(config: Config) -> int:
    """Build and run the workflow for ``config``; returns the exit code."""
    from nipype import config as nipype_config

    from ..engine.formats.staging import check_output_folder, make_folder, remove_stale_staging
    from ..engine.model.precision import effective_precision
    from ..engine.model.device import resolve_device
    from ..workflows.base import init_ugi_wf

    check_output_folder(config.output_dir)
    if config.bids_database_dir:
        check_output_folder(config.bids_database_dir, "BIDS database folder")
    if config.analysis_level == "group":
        from ..utils.group import participants_with_results, run_group

        if config.build_template:
            from ..utils.study_template import build_study_template

            resolve_device(config.device)  # "cuda" without a GPU stops here, before any work
            templates, _, _ = resolve_resources(config)
            build_study_template(config, select_inputs(config),
                                 templates[config.anat_suffixes[0]][0])
            if not participants_with_results(config.output_dir, config.participant_label):
                LOGGER.info("no participant-level results: no group tables")
                return 0
        return run_group(config)
    check_output_folder(config.work_dir, "work folder")
    requested = copy.copy(config)  # the settings as asked: the run's ugi-bids.toml
    device = resolve_device(config.device)  # "cuda" without a GPU stops here, before any work
    # The provenance and the boilerplate must say what runs, not what was asked for.
    config.precision = effective_precision(config.precision, device)
    skipped: dict[str, str] = {}
    subjects = select_inputs(config, skipped)
    templates, atlases, libraries = resolve_resources(config)

    # every check has passed: from here on, folders and files are written
    make_folder(config.work_dir, "work folder")
    nipype_config.update_config({
        # poll_sleep_duration: nipype waits this long between scheduling rounds (default 2 s),
        # and a chain of cached nodes takes one round each: 0.1 s makes a rerun quick
        "execution": {"crashfile_format": "txt", "stop_on_first_crash": config.stop_on_first_crash,
                      "poll_sleep_duration": 0.1,
                      "remove_unnecessary_outputs": False, "create_report": False,
                      "crashdump_dir": str(config.output_dir / "log" / config.run_uuid)},
        "monitoring": {"enabled": config.resource_monitor},
    })
    use_gpu = device.type == "cuda"
    workflow = init_ugi_wf(config, subjects, templates, use_gpu=use_gpu, atlases=atlases,
                           libraries=libraries)
    make_folder(config.output_dir)
    stale = remove_stale_staging(config.output_dir)
    if stale:
        LOGGER.info("removed %d staged file(s) that interrupted runs left in %s", len(stale),
                    config.output_dir)
    write_dataset_files(config, workflow, [*atlases, *libraries])
    if config.boilerplate_only:
        LOGGER.info("boilerplate written to %s", config.output_dir / "logs")
        return 0
    write_run_settings(requested, subjects, _environment(config, device))
    if config.omp_nthreads:
        os.environ["OMP_NUM_THREADS"] = str(config.omp_nthreads)
    settings = plugin_settings(config, use_gpu=use_gpu)
    requested_nodes = request_node_resources(workflow, settings["plugin"])
    if requested_nodes:
        LOGGER.info("%s: %d nodes submitted with their own CPU and memory requests",
                    settings["plugin"], requested_nodes)
    from ..utils.multiproc import DeadWorkerError, MultiProcPlugin

    try:
        if settings["plugin"] == "MultiProc":  # ours: a dead worker ends the run (see there)
            workflow.run(plugin=MultiProcPlugin(plugin_args=settings["plugin_args"]))
        else:
            workflow.run(**settings)
    except RuntimeError as error:  # nipype: a node failed ("Workflow did not execute cleanly")
        if isinstance(error, DeadWorkerError):
            print_error(PROG, error)
        else:
            report_failed_nodes(config)
        _report_skipped(skipped)
        return 1
    if settings["plugin"] == "SLURMGraph":
        # nipype's SLURMGraph submits the whole graph with job dependencies and returns
        LOGGER.info("ugi-bids submitted its jobs to Slurm (SLURMGraph): the outputs appear in "
                    "%s as the jobs finish (squeue lists them; their logs are in %s)",
                    config.output_dir, config.work_dir)
        return 0
    LOGGER.info("ugi-bids finished: %s", config.output_dir)
    if config.clean_workdir:
        clean_work_dir(config, workflow)
    return _report_skipped(skipped)


def _report_skipped(skipped: dict[str, str]) -> int:
    """One line for the participants skipped for an unusable image; the run's exit code so far
    (1 when any was skipped, else 0)."""
    if not skipped:
        return 0
    print_error(PROG, "{} participant(s) skipped for an unusable image: {}".format(
        len(skipped), "; ".join(f"sub-{label}: {reason}" for label, reason in skipped.items())))
    return 1


#: The name of a participant's workflow (``workflows.base``): ``sub_<label>_wf``.
_PARTICIPANT_WF = re.compile(r"sub_([A-Za-z0-9]+)_wf")


def failed_nodes(config: Config) -> list[dict]:
    """What the crash files of this run say, one entry per failed node (by participant, then
    step): ``participant`` (label, or None), ``step`` (the node's path inside the participant's
    workflow), ``cause`` (the exception's last line: our own errors' message, other exceptions'
    class name without its module and message) and ``crash_file``.

    The participant is the crash file's folder (``OUTPUT_DIR/sub-<label>/log/<run>/``: each
    participant's workflow writes its crashes there), else the ``sub_<label>_wf`` workflow the
    node is in."""
    found = sorted(config.output_dir.glob(f"sub-*/log/{config.run_uuid}/crash-*"))
    found += sorted((config.output_dir / "log" / config.run_uuid).glob("crash-*"))
    nodes = []
    for path in found:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        node = next((line.split(":", 1)[1].strip() for line in lines
                     if line.startswith("Node:")), path.stem)
        cause = next((line.strip() for line in reversed(lines) if line.strip()), "unknown")
        kind, colon, text = cause.partition(": ")
        if colon and " " not in kind:  # "package.module.SomeError: text"
            cause = text if kind.startswith("ugi_bids.errors.") else \
                f"{kind.rsplit('.', 1)[-1]}: {text}"
        top = path.relative_to(config.output_dir).parts[0]
        parts = node.split(".")[1:]  # below the top workflow
        # the crash file's folder; else the participant's workflow, sub_<label>_wf (base.py)
        named = next((match[1] for match in map(_PARTICIPANT_WF.fullmatch, parts) if match),
                     None)
        participant = top[4:] if top.startswith("sub-") else named
        # the node's path below the participant's workflow (or its template's), if any
        below = next((i + 1 for i, part in enumerate(parts) if part.startswith("sub_")), 0)
        nodes.append({"participant": participant, "step": ".".join(parts[below:]) or node,
                      "cause": cause, "crash_file": str(path)})
    return sorted(nodes, key=lambda node: (node["participant"] or "", node["step"],
                                           node["crash_file"]))


def report_failed_nodes(config: Config) -> int:
    """Print one line per failed node of this run (participant, step, cause, crash file) on
    stderr; the traceback stays in the crash file (and on the terminal with ``-v``). Returns
    the number of lines."""
    nodes = failed_nodes(config)
    for node in nodes:
        who = f"sub-{node['participant']}: " if node["participant"] else ""
        print_error(PROG, f"{who}{node['step']} failed: {one_line(node['cause'], 300)} "
                          f"(crash file: {node['crash_file']})")
    if not nodes:
        print_error(PROG, f"processing failed; see the log folders in {config.output_dir}")
    return max(len(nodes), 1)


def _environment(config: Config, device) -> dict:
    """The ``[environment]`` record of the run's settings: what this run resolved."""
    import platform

    import nipype

    from .. import __version__

    return {"version": __version__, "nipype_version": nipype.__version__,
            "python_version": platform.python_version(), "device": str(device),
            "precision": config.precision, "weights": config.weights}


if __name__ == "__main__":
    sys.exit(main())
