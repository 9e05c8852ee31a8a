"""Shared fixtures: one random-valued official-format checkpoint per test session."""

from __future__ import annotations

import pytest

from tests.checkpoints import write_random_checkpoint


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> str:
    """Path of a random-valued checkpoint with the official keys and shapes (seed 2)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("weights") / "Step_2_final.trch", seed=2)
