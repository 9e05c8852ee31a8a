"""Checks for the container proof (``.ci/container-check.sh``) and the container-file tests.

``python -m tests.container_check prepare DIR``
    the inputs of an image build and run: a test BIDS dataset (``DIR/bids``), a TemplateFlow
    folder and a test checkpoint in the build context (``.container-inputs/``).
``python -m tests.container_check definitions``
    ``singularity.def``, parsed with spython, against the Dockerfile (parsed with spython too).
``python -m tests.container_check outputs OUT BIDS TEMPLATEFLOW_HOME [--container TYPE]``
    a finished run's outputs, checked as the app tests check them: the names, the sidecars, a
    valid dataset_description.json, no staging leftovers, and every forward transform read by
    ANTs (antspyx), which must reproduce our ``space-`` image.

The test checkpoint has the official keys and shapes with zero last layers (the deformable steps
are the identity; the affine pre-alignment does the work): it proves the code paths and the
geometry, not the accuracy of the official weights.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPACE = "MNI152NLin2009cAsym"
IMAGE_TAG = "ugi-bids:cpu"  # what the README's `docker build -t` makes and singularity.def uses
INPUTS = ROOT / ".container-inputs"
EXPECTED = [
    "dataset_description.json", ".bidsignore", "logs/CITATION.md", "logs/CITATION.bib",
    *(f"{prefix}_{name}" for prefix in ("sub-01/ses-1/anat/sub-01_ses-1",
                                        "sub-01/ses-2/anat/sub-01_ses-2", "sub-02/anat/sub-02")
      for name in (f"from-T1w_to-{SPACE}_mode-image_xfm.h5", f"from-T1w_to-{SPACE}_mode-image_xfm.json",
                   f"from-{SPACE}_to-T1w_mode-image_xfm.h5", f"from-{SPACE}_to-T1w_mode-image_xfm.json",
                   f"space-{SPACE}_desc-preproc_T1w.nii.gz", f"space-{SPACE}_desc-preproc_T1w.json",
                   f"space-{SPACE}_desc-log_jacobian.nii.gz")),
]


# -------------------------------------------------------------------------- definitions


def _environment(lines) -> dict[str, str]:
    """``KEY=VALUE`` lines (the last one wins, as ENV does) with ``${X}`` written ``$X``."""
    env = {}
    for line in lines or []:
        key, _, value = line.partition("=")
        env[key.strip()] = re.sub(r"\$\{(\w+)\}", r"$\1", value.strip().strip('"'))
    return env


def compare_definitions(dockerfile: Path = ROOT / "Dockerfile",
                        definition: Path = ROOT / "singularity.def") -> list[str]:
    """What singularity.def and the Dockerfile's runtime stage agree on, parsed by spython;
    AssertionError naming the first disagreement."""
    from spython.main.parse.parsers import DockerParser, SingularityParser

    stages = DockerParser(str(dockerfile)).recipe
    assert "runtime" in stages, f"no 'runtime' stage in {dockerfile}: {list(stages)}"
    docker = stages["runtime"]
    apptainer = next(iter(SingularityParser(str(definition)).recipe.values()))
    header = definition.read_text()
    bootstrap = re.search(r"^Bootstrap:\s*(\S+)", header, re.M)
    assert bootstrap and bootstrap.group(1) in ("docker-daemon", "docker-archive", "docker"), \
        "singularity.def must bootstrap from the Docker image"
    assert apptainer.fromHeader == IMAGE_TAG, (apptainer.fromHeader, IMAGE_TAG)

    docker_env = _environment(docker.environ)
    docker_env.pop("HOME")  # Apptainer sets HOME itself (the caller's, or a tmpfs with --containall)
    apptainer_env = _environment(apptainer.environ)
    assert apptainer_env == docker_env, {
        key: (docker_env.get(key), apptainer_env.get(key))
        for key in set(docker_env) | set(apptainer_env)
        if docker_env.get(key) != apptainer_env.get(key)}
    entrypoint = docker.entrypoint if isinstance(docker.entrypoint, list) else [docker.entrypoint]
    runscript = f'exec {" ".join(entrypoint)} "$@"'
    assert (apptainer.cmd or "").strip() == runscript, (apptainer.cmd, runscript)
    return [f"singularity.def bootstraps {bootstrap.group(1)}:{apptainer.fromHeader}, the image "
            f"the Dockerfile builds (runtime stage FROM {docker.fromHeader.strip()})",
            f"%environment = the Dockerfile's ENV ({len(docker_env)} variables, HOME left to "
            f"Apptainer): " + ", ".join(f"{k}={v}" for k, v in sorted(docker_env.items())),
            f"%runscript `{runscript}` = ENTRYPOINT {entrypoint}"]


# -------------------------------------------------------------------------- inputs


def prepare(folder: Path) -> None:
    from tests.bidsdata import make_bids_dataset, make_templateflow_home
    from tests.checkpoints import write_random_checkpoint

    make_bids_dataset(folder / "bids")
    if not (INPUTS / "templateflow" / f"tpl-{SPACE}").is_dir():
        make_templateflow_home(INPUTS / "templateflow")
    weights = INPUTS / "weights" / "Step_2_final.trch"
    if not weights.is_file():
        weights.parent.mkdir(parents=True, exist_ok=True)
        write_random_checkpoint(weights, lastconv_scale=0.0)
    print(f"prepared {folder / 'bids'}, {INPUTS / 'templateflow'}, {weights}")


# -------------------------------------------------------------------------- outputs


def check_outputs(out: Path, bids: Path, templateflow: Path, container: str | None) -> list[str]:
    import ants
    import nibabel as nib

    missing = [name for name in EXPECTED if not (out / name).is_file()]
    assert not missing, f"missing outputs: {missing}"
    leftovers = [str(p) for p in out.rglob("*") if p.name.startswith(".") and p.name != ".bidsignore"
                 or ".partial" in p.name or "staging" in p.name]
    assert not leftovers, f"temporary files left: {leftovers}"
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    generated = description["GeneratedBy"][0]
    assert generated["Name"] == "ugi-bids" and generated["Name"] in out.name
    if container:
        assert generated.get("Container", {}).get("Type") == container, generated
    assert "uniGradICON" in (out / "logs/CITATION.md").read_text()

    template = templateflow / f"tpl-{SPACE}" / f"tpl-{SPACE}_res-01_T1w.nii.gz"
    raws = {"sub-01/ses-1/anat/sub-01_ses-1": "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
            "sub-02/anat/sub-02": "sub-02/anat/sub-02_T1w.nii.gz"}
    report = [f"{len(EXPECTED)} expected outputs present, no temporary files left, "
              f"dataset_description.json valid (GeneratedBy.Container: "
              f"{generated.get('Container')})"]
    for prefix, raw in raws.items():
        sidecar = json.loads((out / f"{prefix}_from-T1w_to-{SPACE}_mode-image_xfm.json").read_text())
        assert sidecar["Sources"][0] == f"bids:raw:{raw}", sidecar["Sources"]
        xfm = out / f"{prefix}_from-T1w_to-{SPACE}_mode-image_xfm.h5"
        theirs = ants.apply_transforms(fixed=ants.image_read(str(template)),
                                       moving=ants.image_read(str(bids / raw)),
                                       transformlist=[str(xfm)], interpolator="linear").numpy()
        ours = np.asanyarray(nib.load(out / f"{prefix}_space-{SPACE}_desc-preproc_T1w.nii.gz")
                             .dataobj, dtype=np.float32)
        raw_range = np.ptp(np.asanyarray(nib.load(bids / raw).dataobj, dtype=np.float32))
        error = float(np.abs(ours - theirs).max()) / raw_range
        assert ours.shape == theirs.shape and error <= 1e-4, (prefix, error)
        report.append(f"ANTs (antspyx) applies {xfm.name}: max |ours - ANTs| = {error:.1e} of the "
                      f"image range (bound 1e-4)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.container_check")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("folder", type=Path)
    sub.add_parser("definitions")
    outputs = sub.add_parser("outputs")
    for name in ("out", "bids", "templateflow"):
        outputs.add_argument(name, type=Path)
    outputs.add_argument("--container")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.folder)
        return 0
    lines = (compare_definitions() if args.command == "definitions" else
             check_outputs(args.out, args.bids, args.templateflow, args.container))
    for line in lines:
        print(f"  ok: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
