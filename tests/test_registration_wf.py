"""``init_register_to_template_wf`` hands the engine settings to its registration node and
says in its boilerplate what it did (no registration runs here)."""

from __future__ import annotations

import pytest

from ugi_bids.interfaces import registration as interfaces
from ugi_bids.workflows.registration import init_register_to_template_wf


@pytest.mark.parametrize("precision, mentions_tf32", [("float32", False), ("tf32", True)])
def test_precision_reaches_the_node_and_the_boilerplate(precision, mentions_tf32):
    wf = init_register_to_template_wf(template_label="MNI152NLin2009cAsym", device="cuda",
                                      precision=precision, io_iterations=0)
    node = wf.get_node("unigradicon")
    assert node.inputs.precision == precision and node.inputs.device == "cuda"
    assert ("TF32" in wf.__desc__) == mentions_tf32


def test_interface_passes_precision_to_the_engine(monkeypatch, tmp_path):
    seen = {}

    def register_images(*args, forward_file, inverse_file, **kwargs):
        seen.update(kwargs)
        for path in (forward_file, inverse_file):
            open(path, "wb").close()
        return {}

    monkeypatch.setattr(interfaces.files, "register_images", register_images)
    for name in ("fixed.nii.gz", "moving.nii.gz", "prealign.h5"):
        (tmp_path / name).write_bytes(b"x")
    node = interfaces.UniGradICON(fixed_image=str(tmp_path / "fixed.nii.gz"),
                                  moving_image=str(tmp_path / "moving.nii.gz"),
                                  prealign_xfm=str(tmp_path / "prealign.h5"), precision="tf32",
                                  io_checkpointing="off")
    node.run(cwd=str(tmp_path))
    assert seen["precision"] == "tf32"
    assert seen["io_checkpointing"] == "off"
    assert interfaces.UniGradICON().inputs.precision == "float32"
    assert interfaces.UniGradICON().inputs.io_checkpointing == "auto"


@pytest.mark.parametrize("setting, io_iterations, mem_gb", [
    ("auto", 50, 7.0), ("on", 50, 7.0), ("off", 50, 10.5), ("off", 0, 3.0)])
def test_io_checkpointing_reaches_the_node_and_its_memory(setting, io_iterations, mem_gb):
    """Keeping the activations costs host memory on the CPU: the scheduler reserves it."""
    wf = init_register_to_template_wf(template_label="MNI152NLin2009cAsym",
                                      io_checkpointing=setting, io_iterations=io_iterations)
    node = wf.get_node("unigradicon")
    assert node.inputs.io_checkpointing == setting
    assert node.mem_gb == mem_gb
