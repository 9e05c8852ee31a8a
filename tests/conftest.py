"""Shared fixtures and the two test subsets.

* ``python -m pytest --quick`` (the same as ``python -m pytest -m "not slow"``): the quick suite,
  a few minutes at most on a 2-core machine. It keeps at least one fast test of every capability
  (geometry, resampling against ANTs, ITK files, layering, command-line and BIDS-App errors).
* ``python -m pytest -m slow``: what the quick suite leaves out: instance-optimisation steps,
  whole registrations, Nipype MultiProc runs, end-to-end ``ugi-bids`` runs and the true 175^3
  grid (``@pytest.mark.slow``).
* ``python -m pytest``: everything.
"""

from __future__ import annotations

import pytest

from tests.checkpoints import write_random_checkpoint


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="run the quick suite: deselect the tests marked slow (the same as "
                          "-m 'not slow')")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


def pytest_report_header(config):
    if config.getoption("--quick"):
        return "quick suite: tests marked slow are deselected (python -m pytest -m slow runs them)"
    return None


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> str:
    """Path of a random-valued checkpoint with the official keys and shapes (seed 2)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("weights") / "Step_2_final.trch", seed=2)
