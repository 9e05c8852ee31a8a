"""Weights registry, cache, download, strict loading and the ``ugi-bids-weights`` CLI.

No test touches the network: downloads come from a local HTTP server on 127.0.0.1 (a thread).
One random checkpoint in the official format (283 MB) is written per session; the other files
are "light" official-format checkpoints whose tensors are views of one shared buffer (~34 MB).
The official weights are never downloaded nor imitated: a "pinned" model here is a registry
entry monkeypatched to the SHA-256 of a random checkpoint that the local server serves.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import platformdirs
import pooch
import pytest
import torch

from tests.checkpoints import write_random_checkpoint
from ugi_bids.cli import weights as weights_cli
from ugi_bids.engine import options
from ugi_bids.engine import cache as engine_cache
from ugi_bids.engine.model import weights as W
from ugi_bids.engine.model.network import build_cascade
from ugi_bids.errors import OutputError, WeightsError

FETCH_CMD = "ugi-bids-weights fetch unigradicon"
PROG_ERROR = "ugi-bids-weights: error: "


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def checkpoint(request, tmp_path_factory) -> Path:
    """A random-valued checkpoint in the official format (all 188 tensors), once per session:
    the suite's shared ``random_checkpoint`` when a conftest provides it, else our own."""
    try:
        return Path(request.getfixturevalue("random_checkpoint"))
    except pytest.FixtureLookupError:
        return Path(write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "Step_2_final.trch"))


@pytest.fixture(scope="session")
def reference() -> dict:
    """The official state_dict layout (meta tensors: keys, shapes, dtypes, no memory)."""
    with torch.device("meta"):
        return build_cascade().state_dict()


def light_state(reference: dict, seed: int = 0) -> dict:
    """Official keys/shapes; float tensors are views of one random buffer (small file)."""
    generator = torch.Generator().manual_seed(seed)
    biggest = max(t.numel() for t in reference.values())
    base = 0.01 * torch.randn(biggest, generator=generator)
    return {key: torch.tensor(7, dtype=torch.long) if t.dtype == torch.long
            else base[: t.numel()].view(t.shape) for key, t in reference.items()}


@pytest.fixture(scope="session")
def light_checkpoint(tmp_path_factory, reference) -> Path:
    """A valid (strictly loadable) light checkpoint."""
    path = tmp_path_factory.mktemp("light") / "Step_2_final.trch"
    torch.save(light_state(reference), path)
    return path


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory, reference) -> Path:
    """Another valid light checkpoint (other random values, so another SHA-256)."""
    path = tmp_path_factory.mktemp("other") / "Step_2_final.trch"
    torch.save(light_state(reference, seed=1), path)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty cache; no hash memo leaks between tests."""
    home = tmp_path / "ugi-home"
    monkeypatch.setenv("UGI_BIDS_HOME", str(home))
    monkeypatch.setattr(W, "_HASH_MEMO", {})
    return home


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (status, body, declared_length)``; ``body`` is bytes or a
    file to stream; a declared length larger than the body simulates a dropped connection."""

    def do_GET(self):
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        status, body, declared = route
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        if isinstance(body, Path):
            with open(body, "rb") as handle:
                shutil.copyfileobj(handle, self.wfile, 1 << 20)
        else:
            self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture(scope="module")
def server(light_checkpoint, checkpoint):
    """A local HTTP server in a daemon thread; yields (base_url, routes)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    body = light_checkpoint.read_bytes()
    httpd.routes = {
        "/good/Step_2_final.trch": (200, body, len(body)),
        "/full/Step_2_final.trch": (200, checkpoint, checkpoint.stat().st_size),
        "/cut/Step_2_final.trch": (200, body[: len(body) // 2], len(body)),
        "/junk/Step_2_final.trch": (200, b"<html>not a checkpoint</html>" * 100, 2900),
    }
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.routes
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/Step_2_final.trch"


def pin(monkeypatch, model: str, sha256: str | None, url: str | None = None) -> W.ModelInfo:
    """Replace ``model``'s registry entry by one pinned to ``sha256`` (and served from ``url``)."""
    info = W.MODELS[model]
    pinned = W.ModelInfo(info.name, info.display, url or info.url, sha256=sha256)
    monkeypatch.setitem(W.MODELS, model, pinned)
    return pinned


def assert_one_line(message: str) -> str:
    """``message`` is exactly one non-empty line; returns it stripped."""
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip() != "", message
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Names in a model's cache folder other than the weights and their sidecar."""
    if not folder.exists():
        return []
    keep = {W.RELEASE_FILENAME, W.RELEASE_FILENAME + ".sha256"}
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------------------------
# Registry and cache location


def test_registry_has_both_release_urls():
    assert tuple(W.MODELS) == options.MODELS == ("unigradicon", "multigradicon")
    for name, info in W.MODELS.items():
        assert info.url == ("https://github.com/uncbiag/uniGradICON/releases/download/"
                            f"{name}_weights/Step_2_final.trch")
        # upstream publishes no checksum and the files cannot be downloaded here: no pin yet
        assert info.sha256 is None
        assert 250e6 < info.approx_bytes < 300e6
    assert W.model_info("uniGradICON").name == "unigradicon"
    with pytest.raises(WeightsError, match="unknown model"):
        W.model_info("gradicon")


def test_cache_dir_ugi_bids_home_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("UGI_BIDS_HOME", str(tmp_path / "u"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert W.cache_dir() == tmp_path / "u"
    assert W.cached_path("multigradicon") == (
        tmp_path / "u" / "weights" / "multigradicon" / "Step_2_final.trch")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    monkeypatch.setenv("UGI_BIDS_HOME", "~/ugi")
    assert W.cache_dir() == tmp_path / "h" / "ugi"


def test_cache_dir_is_platformdirs_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("UGI_BIDS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    expected = Path(platformdirs.user_cache_dir("ugi-bids", appauthor=False))
    assert W.cache_dir() == expected
    assert expected.is_absolute() and not W.cache_dir().is_relative_to(Path.cwd())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG layout of Linux")
def test_cache_dir_xdg_on_linux(monkeypatch, tmp_path):
    monkeypatch.delenv("UGI_BIDS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert W.cache_dir() == tmp_path / "x" / "ugi-bids"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
    assert W.cache_dir() == tmp_path / "h" / ".cache" / "ugi-bids"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert W.cache_dir() == tmp_path / "h" / ".cache" / "ugi-bids"


@pytest.mark.parametrize("failure", ["raises", "relative"])
def test_cache_dir_without_home_folder(monkeypatch, failure):
    monkeypatch.delenv("UGI_BIDS_HOME")

    def no_home(*args, **kwargs):
        if failure == "raises":
            raise RuntimeError("Could not determine home directory.")
        return "~/.cache/ugi-bids"

    monkeypatch.setattr(engine_cache, "user_cache_dir", no_home)
    with pytest.raises(WeightsError) as info:
        W.cache_dir()
    assert str(info.value) == ("cannot find the home folder for the ugi-bids cache (weights); "
                               "set UGI_BIDS_HOME to a writable folder")
    assert info.value.exit_code == 66


# --------------------------------------------------------------------------------------------
# Strict loading


def test_load_network_strict_official_format(checkpoint):
    network, record = W.load_network(weights=checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    loaded = network.state_dict()
    assert len(loaded) == len(state) == 188
    for key in ("netPsi.net.lastConv.weight", "netPhi.netPhi.net.netPhi.net.net.downConvs.0.bias",
                "netPhi.netPsi.net.batchNorms.4.running_var"):
        assert torch.equal(loaded[key], state[key])
    assert network.training is False
    assert {t.device.type for t in loaded.values()} == {"cpu"}
    assert record == W.WeightsRecord("unigradicon", checkpoint, W.sha256_file(checkpoint),
                                     W.MODELS["unigradicon"].url)
    assert record.as_dict()["sha256"] == record.sha256
    assert all(p.requires_grad for p in network.parameters())  # instance optimisation needs it


def test_loaded_parameters_do_not_alias(light_checkpoint):
    """The light file stores every tensor as a view of one buffer; loaded parameters must
    still own their memory (instance optimisation updates them in place)."""
    network = W.network_from_file(light_checkpoint)
    params = list(network.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)


def test_check_state_dict_lists_problems(reference):
    state = dict(reference)
    del state["netPsi.net.lastConv.weight"]
    state["netPsi.net.extra"] = torch.zeros(1)
    state["netPsi.net.lastConv.bias"] = torch.zeros(4)
    assert W.check_state_dict(state, reference) == [
        "missing netPsi.net.lastConv.weight", "unexpected netPsi.net.extra",
        "shape of netPsi.net.lastConv.bias is (4) not (3)"]
    assert W.check_state_dict(reference, reference) == []


def test_missing_key_refused(tmp_path, reference):
    state = light_state(reference)
    del state["netPsi.net.lastConv.weight"]
    path = tmp_path / "missing.trch"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        W.load_network(weights=path)
    message = assert_one_line(str(info.value))
    assert message.startswith(f"weights file {path} does not match the uniGradICON architecture")
    assert "missing netPsi.net.lastConv.weight" in message
    assert info.value.exit_code == 66


def test_wrong_shape_refused(tmp_path, reference):
    state = light_state(reference)
    key = "netPhi.netPsi.net.downConvs.0.weight"
    state[key] = torch.zeros(16, 1, 3, 3, 3)
    path = tmp_path / "shape.trch"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        W.load_network(weights=path)
    message = assert_one_line(str(info.value))
    assert f"shape of {key} is (16, 1, 3, 3, 3) not (16, 2, 3, 3, 3)" in message


def test_many_problems_are_summarised(tmp_path):
    path = tmp_path / "other.trch"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError) as info:
        W.load_network(weights=path)
    message = assert_one_line(str(info.value))
    assert "more problems" in message and "(1 tensors, expected 188)" in message
    assert len(message) < 600


def test_truncated_file_refused(tmp_path, checkpoint):
    cut = tmp_path / "cut.trch"
    with open(checkpoint, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(checkpoint.stat().st_size // 2))
    with pytest.raises(WeightsError) as info:
        W.load_network(weights=cut)
    message = assert_one_line(str(info.value))
    assert f"weights file {cut} is truncated or not a uniGradICON checkpoint" in message
    assert "ugi-bids-weights fetch unigradicon --force" in message


@pytest.mark.parametrize("content", [b"", b"hello, not torch\n" * 10, b"\x5c\x01\x00\x00" * 100])
def test_non_torch_file_refused(tmp_path, content):
    path = tmp_path / "junk.trch"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        W.load_checkpoint(path)
    message = assert_one_line(str(info.value))
    assert message.startswith(f"weights file {path} is truncated or not a uniGradICON checkpoint")


def test_torch_file_that_is_not_a_state_dict_refused(tmp_path):
    path = tmp_path / "list.trch"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(WeightsError, match="holds a list, not a state_dict") as info:
        W.load_checkpoint(path)
    assert_one_line(str(info.value))


# --------------------------------------------------------------------------------------------
# Resolution


def test_resolve_explicit_path_wins(tmp_path, isolated_cache):
    explicit = tmp_path / "mine.trch"
    explicit.write_bytes(b"x")
    W.cached_path("unigradicon").parent.mkdir(parents=True)
    W.cached_path("unigradicon").write_bytes(b"y")
    assert W.resolve_weights(weights=explicit) == explicit
    assert W.resolve_weights(weights=str(explicit)) == explicit


def test_resolve_explicit_missing_or_folder(tmp_path):
    with pytest.raises(WeightsError, match="does not exist") as info:
        W.resolve_weights(weights=tmp_path / "nope.trch")
    assert_one_line(str(info.value))
    assert info.value.exit_code == 66
    with pytest.raises(WeightsError, match="is a folder"):
        W.resolve_weights(weights=tmp_path)


def test_resolve_cache_lookup(isolated_cache):
    target = isolated_cache / "weights" / "multigradicon" / "Step_2_final.trch"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"cached")
    assert W.resolve_weights("multigradicon") == target


def test_resolve_missing_offline_message(isolated_cache):
    with pytest.raises(WeightsError) as info:
        W.resolve_weights("unigradicon")
    message = assert_one_line(str(info.value))
    assert W.MODELS["unigradicon"].url in message
    assert FETCH_CMD in message and "--weights PATH" in message and "UGI_BIDS_HOME" in message
    assert str(W.cached_path("unigradicon")) in message


def test_resolve_download_fetches(server, monkeypatch, isolated_cache):
    base, _ = server
    good = f"{base}/good/Step_2_final.trch"
    pin(monkeypatch, "unigradicon", None, good)
    path = W.resolve_weights("unigradicon", download=True)
    assert path == W.cached_path("unigradicon") and path.is_file()
    _network, record = W.load_network("unigradicon")
    assert record.url == good and record.path == path


def test_cached_file_must_match_pin(tmp_path, monkeypatch, light_checkpoint, other_checkpoint):
    """With a pin, the cached file (found in the cache or named with --weights) must match it;
    a file outside the cache is the user's own checkpoint and is not held to the pin."""
    target = W.cached_path("unigradicon")
    target.parent.mkdir(parents=True)
    shutil.copyfile(light_checkpoint, target)
    digest = sha256_of(light_checkpoint)

    pin(monkeypatch, "unigradicon", digest.upper())  # pins compare case-insensitively
    assert W.resolve_weights("unigradicon") == target
    assert W.load_network("unigradicon")[1].sha256 == digest

    wrong = sha256_of(other_checkpoint)
    pin(monkeypatch, "unigradicon", wrong)
    expected = (f"weights file {target} has sha256 {digest}, not {wrong} of the uniGradICON "
                f"release (the file is corrupt or another file); re-fetch it with "
                f"`{FETCH_CMD} --force` or pass another --weights PATH")
    for weights in (None, target):
        with pytest.raises(WeightsError) as info:
            W.load_network("unigradicon", weights)
        assert str(info.value) == expected
        assert info.value.exit_code == 66
    own = tmp_path / "mine.trch"
    shutil.copyfile(light_checkpoint, own)
    assert W.resolve_weights("unigradicon", own) == own


# --------------------------------------------------------------------------------------------
# Download


def test_fetch_atomic_with_progress_and_sha256(server, light_checkpoint, monkeypatch, capsys):
    base, _ = server
    url = f"{base}/good/Step_2_final.trch"
    target = W.cached_path("unigradicon")
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        if dst == target:
            renames.append((src, dst.exists(), src.stat().st_size))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    path = W.fetch("unigradicon", url=url)
    assert path == target
    assert path.read_bytes() == light_checkpoint.read_bytes()
    assert len(renames) == 1
    src, existed, size = renames[0]
    assert src.parent == target.parent and src.name.startswith(".") and existed is False
    assert size == light_checkpoint.stat().st_size
    assert leftovers(target.parent) == []
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    digest = sha256_of(light_checkpoint)
    assert W.read_sidecar(path)[0] == digest
    assert W.sidecar_path(path).read_text().splitlines()[-1] == f"{digest}  Step_2_final.trch"
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").splitlines()
    assert lines[0] == f"downloading uniGradICON weights from {url}"
    assert lines[-1] == f"saved {target} (sha256 {digest})"
    assert any(line.startswith("100%|") for line in lines)  # pooch's tqdm bar
    assert "known_hash" not in err  # pooch's advice to its own users stays hidden


def test_fetch_quiet_prints_nothing(server, capsys):
    base, _ = server
    W.fetch("unigradicon", url=f"{base}/good/Step_2_final.trch", progress=False)
    assert capsys.readouterr() == ("", "")


def test_fetch_without_tqdm_has_no_bar(server, monkeypatch, capsys):
    base, _ = server
    url = f"{base}/good/Step_2_final.trch"
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` fails
    target = W.fetch("unigradicon", url=url)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"downloading uniGradICON weights from {url}",
                   f"saved {target} (sha256 {W.read_sidecar(target)[0]})"]


def test_fetch_skips_when_cached_and_forces(server, closed_port_url, light_checkpoint):
    base, _ = server
    target = W.cached_path("unigradicon")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"placeholder")
    assert W.fetch("unigradicon", url=closed_port_url) == target  # no network touched
    assert target.read_bytes() == b"placeholder"
    W.fetch("unigradicon", url=f"{base}/good/Step_2_final.trch", force=True, progress=False)
    assert target.read_bytes() == light_checkpoint.read_bytes()


def test_fetch_failure_leaves_no_partial_file(server, light_checkpoint):
    base, _ = server
    size = light_checkpoint.stat().st_size
    for route, reason in [("/cut/Step_2_final.trch",
                           f"connection closed after {size // 2} of {size} bytes"),
                          ("/missing/Step_2_final.trch", "HTTP 404 Not Found")]:
        url = f"{base}{route}"
        with pytest.raises(WeightsError) as info:
            W.fetch("unigradicon", url=url, timeout=10, progress=False)
        message = assert_one_line(str(info.value))
        assert message.startswith(
            f"cannot download the uniGradICON weights from {url} ({reason}); on a machine with "
            f"internet run `{FETCH_CMD}` and copy the file to {W.cached_path('unigradicon')}")
        assert message.endswith("or pass --weights PATH") and "UGI_BIDS_HOME" in message
        assert info.value.exit_code == 66
        target = W.cached_path("unigradicon")
        assert target.exists() is False and W.sidecar_path(target).exists() is False
        assert leftovers(target.parent) == []


def test_fetch_connection_refused(closed_port_url):
    with pytest.raises(WeightsError) as info:
        W.fetch("unigradicon", url=closed_port_url, timeout=5, progress=False)
    message = assert_one_line(str(info.value))
    assert message.startswith(f"cannot download the uniGradICON weights from {closed_port_url} "
                              f"(Connection refused); ")
    assert W.cached_path("unigradicon").exists() is False


def test_fetch_refuses_other_schemes(tmp_path, light_checkpoint):
    url = light_checkpoint.as_uri()
    with pytest.raises(WeightsError) as info:
        W.fetch("unigradicon", url=url, progress=False)
    assert str(info.value).startswith(
        f"cannot download the uniGradICON weights from {url} (not an http:// or https:// URL); ")


def test_fetch_invalid_checkpoint_discarded(server):
    base, _ = server
    url = f"{base}/junk/Step_2_final.trch"
    with pytest.raises(WeightsError) as info:
        W.fetch("unigradicon", url=url, progress=False)
    message = assert_one_line(str(info.value))
    assert message.startswith(f"the file downloaded from {url} is truncated or not a uniGradICON "
                              f"checkpoint")
    assert message.endswith("; nothing was saved (check the URL, or try again)")
    assert ".partial" not in message
    target = W.cached_path("unigradicon")
    assert target.exists() is False and leftovers(target.parent) == []


def test_fetch_interrupted_leaves_nothing(server, monkeypatch):
    base, _ = server

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(W, "checked_state_dict", interrupt)  # Ctrl-C after the download
    with pytest.raises(KeyboardInterrupt):
        W.fetch("unigradicon", url=f"{base}/good/Step_2_final.trch", progress=False)
    target = W.cached_path("unigradicon")
    assert target.exists() is False and leftovers(target.parent) == []


def test_fetch_write_failure_is_an_output_error(server, monkeypatch):
    base, _ = server

    def disk_full(self, url, output_file, pooch_, check_only=False):
        with open(output_file, "wb") as handle:
            handle.write(b"part of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", disk_full)
    with pytest.raises(OutputError) as info:
        W.fetch("unigradicon", url=f"{base}/good/Step_2_final.trch", progress=False)
    folder = W.cached_path("unigradicon").parent
    assert str(info.value) == (f"cannot write the uniGradICON weights into {folder} (No space "
                               f"left on device); set UGI_BIDS_HOME to a writable folder with "
                               f"300 MB free")
    assert info.value.exit_code == 73
    assert leftovers(folder) == [] and W.cached_path("unigradicon").exists() is False


def test_fetch_unwritable_cache(monkeypatch, tmp_path, closed_port_url):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("UGI_BIDS_HOME", str(blocker))
    with pytest.raises(OutputError, match="cannot create the weights cache folder") as info:
        W.fetch("unigradicon", url=closed_port_url)
    assert info.value.exit_code == 73


# --------------------------------------------------------------------------------------------
# Pinned SHA-256 (a registry entry pinned to a random checkpoint served on 127.0.0.1)


def test_fetch_pinned_random_checkpoint(server, checkpoint, monkeypatch):
    """The full-size random checkpoint, pinned, downloaded through pooch's known_hash check,
    then loaded strictly from the cache."""
    base, _ = server
    url = f"{base}/full/Step_2_final.trch"
    digest = sha256_of(checkpoint)
    pin(monkeypatch, "unigradicon", digest, url)
    target = W.fetch("unigradicon", progress=False)
    assert target == W.cached_path("unigradicon")
    assert W.read_sidecar(target)[0] == digest
    assert leftovers(target.parent) == []
    network, record = W.load_network("unigradicon")
    assert record == W.WeightsRecord("unigradicon", target, digest, url)
    assert len(network.state_dict()) == 188


def test_fetch_pinned_refuses_other_file(server, light_checkpoint, other_checkpoint,
                                         monkeypatch, capsys):
    base, _ = server
    url = f"{base}/good/Step_2_final.trch"  # serves light_checkpoint
    wrong = sha256_of(other_checkpoint)
    pin(monkeypatch, "unigradicon", wrong, url)
    expected = (f"the file downloaded from {url} has sha256 {sha256_of(light_checkpoint)}, not "
                f"{wrong} of the uniGradICON release; nothing was saved (check the URL, or try "
                f"again)")
    with pytest.raises(WeightsError) as info:
        W.fetch("unigradicon", progress=False)
    assert str(info.value) == expected and info.value.exit_code == 66
    target = W.cached_path("unigradicon")
    assert target.exists() is False and W.sidecar_path(target).exists() is False
    assert leftovers(target.parent) == []

    assert weights_cli.main(["fetch", "unigradicon", "--quiet"]) == 66
    out, err = capsys.readouterr()
    assert out == "" and err == f"{PROG_ERROR}{expected}\n"


def test_fetch_pinned_replaces_wrong_cached_file(server, light_checkpoint, monkeypatch, capsys):
    base, _ = server
    pin(monkeypatch, "unigradicon", sha256_of(light_checkpoint), f"{base}/good/Step_2_final.trch")
    target = W.cached_path("unigradicon")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"placeholder")
    assert W.is_cached("unigradicon") is False
    assert weights_cli.main(["fetch", "unigradicon", "--quiet"]) == 0  # no --force needed
    assert capsys.readouterr() == (f"{target}\n", "")
    assert target.read_bytes() == light_checkpoint.read_bytes()
    assert W.is_cached("unigradicon") is True
    assert weights_cli.main(["fetch", "unigradicon"]) == 0
    assert capsys.readouterr().err == (
        "ugi-bids-weights: unigradicon already cached (use --force to download again)\n")


def test_verify_pinned(tmp_path, light_checkpoint, other_checkpoint, monkeypatch, capsys):
    path = tmp_path / "Step_2_final.trch"
    shutil.copyfile(light_checkpoint, path)
    digest = sha256_of(light_checkpoint)
    pin(monkeypatch, "unigradicon", digest)
    assert weights_cli.main(["verify", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{digest}  {path}"

    wrong = sha256_of(other_checkpoint)
    pin(monkeypatch, "unigradicon", wrong)
    assert weights_cli.main(["verify", str(path)]) == 66
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"{PROG_ERROR}weights file {path} has sha256 {digest}, not {wrong} of the "
                   f"uniGradICON release (the file is corrupt or another file); re-fetch it "
                   f"with `{FETCH_CMD} --force` or pass another --weights PATH\n")


# --------------------------------------------------------------------------------------------
# Checksums


def test_sha256_sidecar_reused_while_file_unchanged(tmp_path, monkeypatch):
    target = W.cached_path("unigradicon")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"abc" * 1000)
    digest = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert W.sha256_file(target) == digest
    assert W.file_sha256(target) == digest  # hashes once and writes the sidecar (in the cache)
    assert W.recorded_sha256(target) == digest

    def boom(path):
        raise AssertionError("re-hashed although the sidecar matches")

    monkeypatch.setattr(W, "sha256_file", boom)
    monkeypatch.setattr(W, "_HASH_MEMO", {})
    assert W.file_sha256(target) == digest
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # file replaced/touched
    assert W.recorded_sha256(target) is None
    with pytest.raises(AssertionError, match="re-hashed"):
        W.file_sha256(target)


def test_sha256_outside_cache_writes_no_sidecar(tmp_path):
    path = tmp_path / "user.trch"
    path.write_bytes(b"x" * 10)
    assert W.file_sha256(path) == hashlib.sha256(b"x" * 10).hexdigest()
    assert W.sidecar_path(path).exists() is False


def test_sidecar_is_sha256sum_compatible(tmp_path):
    path = tmp_path / "Step_2_final.trch"
    path.write_bytes(b"data")
    W.write_sidecar(path, W.sha256_file(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "Step_2_final.trch", "Step_2_final.trch.sha256"]  # no temporary left behind
    if shutil.which("sha256sum") is None:  # pragma: no cover
        pytest.skip("sha256sum not installed")
    tool = subprocess.run(["sha256sum", "-c", W.sidecar_path(path).name], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert tool.returncode == 0, tool.stderr
    assert tool.stdout == "Step_2_final.trch: OK\n"


# --------------------------------------------------------------------------------------------
# Command line


def test_console_script_installed(isolated_cache):
    """The installed ``ugi-bids-weights`` entry point runs (the one subprocess test)."""
    script = Path(sys.executable).with_name("ugi-bids-weights")
    assert script.is_file(), f"{script} is not installed (pip install -e .)"
    env = {**os.environ, "UGI_BIDS_HOME": str(isolated_cache)}
    env.pop("UGI_BIDS_DEBUG", None)
    result = subprocess.run([str(script), "path", "unigradicon"], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.stdout == f"{W.cached_path('unigradicon')}\n", result.stderr
    assert result.stderr == (f"ugi-bids-weights: unigradicon is not cached; run "
                             f"`{FETCH_CMD}`\n")
    assert result.returncode == 66


def test_cli_list_and_path(isolated_cache, capsys):
    assert weights_cli.main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"unigradicon    missing    ~283 MB  {W.MODELS['unigradicon'].url}",
        f"multigradicon  missing    ~283 MB  {W.MODELS['multigradicon'].url}",
        f"cache: {isolated_cache / 'weights'}"]

    assert weights_cli.main(["path", "unigradicon"]) == 66
    out, err = capsys.readouterr()
    assert out == f"{W.cached_path('unigradicon')}\n"
    assert err == f"ugi-bids-weights: unigradicon is not cached; run `{FETCH_CMD}`\n"


def test_cli_fetch_network_failure(closed_port_url, capsys):
    assert weights_cli.main(["fetch", "unigradicon", "--url", closed_port_url]) == 66
    out, err = capsys.readouterr()
    assert out == ""
    line = assert_one_line(err.splitlines()[-1])
    assert line.startswith(f"{PROG_ERROR}cannot download the uniGradICON weights from "
                           f"{closed_port_url} (Connection refused); ")
    assert FETCH_CMD in line and "Traceback" not in err
    assert [text for text in err.splitlines() if "error:" in text] == [line]


def test_cli_verify_truncated(tmp_path, light_checkpoint, capsys):
    cut = tmp_path / "cut.trch"
    cut.write_bytes(light_checkpoint.read_bytes()[:1000])
    assert weights_cli.main(["verify", str(cut)]) == 66
    out, err = capsys.readouterr()
    assert out == ""
    line = assert_one_line(err)
    assert line.startswith(f"{PROG_ERROR}weights file {cut} is truncated or not a uniGradICON "
                           f"checkpoint")


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        weights_cli.main(["fetch", "gradicon"])
    assert info.value.code == 2
    assert "unknown model 'gradicon'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        weights_cli.main([])
    assert info.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_cli_in_process(server, light_checkpoint, capsys, isolated_cache):
    base, _ = server
    assert weights_cli.main(["fetch", "unigradicon", "--url",
                             f"{base}/good/Step_2_final.trch"]) == 0
    out, err = capsys.readouterr()
    target = W.cached_path("unigradicon")
    assert out == f"{target}\n" and "100%|" in err
    assert weights_cli.main(["fetch", "unigradicon"]) == 0  # cached: no download
    assert capsys.readouterr() == (
        f"{target}\n",
        "ugi-bids-weights: unigradicon already cached (use --force to download again)\n")

    assert weights_cli.main(["path", "unigradicon"]) == 0
    assert capsys.readouterr().out == f"{target}\n"
    assert weights_cli.main(["list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    size = light_checkpoint.stat().st_size / 1e6
    assert listing[0] == f"unigradicon    cached   {size:>6.1f} MB  {W.MODELS['unigradicon'].url}"
    assert listing[1].startswith("multigradicon  missing ")

    assert weights_cli.main(["verify", str(target)]) == 0
    out = capsys.readouterr().out.splitlines()
    digest = W.sha256_file(light_checkpoint)
    assert out == [f"{digest}  {target}",
                   f"OK: {target} loads strictly as the uniGradICON network (188 tensors)"]


def test_cli_verify_detects_corruption_against_sidecar(tmp_path, light_checkpoint, capsys):
    path = tmp_path / "Step_2_final.trch"
    path.write_bytes(light_checkpoint.read_bytes())
    W.write_sidecar(path, "0" * 64)  # recorded for this size/mtime, but wrong
    assert weights_cli.main(["verify", str(path)]) == 66
    err = capsys.readouterr().err
    assert err == (f"{PROG_ERROR}weights file {path} has sha256 {sha256_of(path)} but {'0' * 64} "
                   f"was recorded when it was saved (the file is corrupt); re-fetch it with "
                   f"`{FETCH_CMD} --force`\n")


def test_cli_verify_missing_file(tmp_path, capsys):
    assert weights_cli.main(["verify", str(tmp_path / "none.trch")]) == 66
    assert capsys.readouterr().err == (
        f"{PROG_ERROR}weights file {tmp_path / 'none.trch'} does not exist\n")


# --------------------------------------------------------------------------------------------
# install (offline machines, container builds) and images built without weights


def test_cli_install_copies_checks_and_records(tmp_path, light_checkpoint, isolated_cache, capsys):
    """`ugi-bids-weights install FILE` puts a strictly loading copy in the cache with its sidecar;
    the cached file is then what the app resolves, with the same SHA-256."""
    assert weights_cli.main(["install", str(light_checkpoint)]) == 0
    target = W.cached_path("unigradicon")
    digest = sha256_of(light_checkpoint)
    assert capsys.readouterr().out.strip() == f"{digest}  {target}"
    assert sha256_of(target) == digest and W.recorded_sha256(target) == digest
    assert W.resolve_weights("unigradicon") == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, target.name + ".sha256"]


def test_cli_install_refuses_a_bad_file_and_leaves_the_cache_alone(tmp_path, isolated_cache,
                                                                    capsys, monkeypatch):
    bad = tmp_path / "bad.trch"
    bad.write_bytes(b"not a checkpoint")
    assert weights_cli.main(["install", str(bad)]) == WeightsError.exit_code
    err = capsys.readouterr().err
    assert err.startswith(PROG_ERROR) and err.count("\n") == 1, err
    assert f"weights file {bad}" in err and "nothing was installed" in err
    target = W.cached_path("unigradicon")
    assert not target.parent.exists() or not any(target.parent.iterdir())
    assert weights_cli.main(["install", str(tmp_path / "missing.trch")]) == WeightsError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.trch does not exist" in err and "--weights" not in err
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("UGI_BIDS_HOME", str(afile))  # no cache folder can be made: exit 73
    assert weights_cli.main(["install", str(bad)]) == OutputError.exit_code
    assert capsys.readouterr().err.count("\n") == 1


def test_image_without_weights_says_so(isolated_cache):
    """In a container image baked without weights (its image-contents.json lists none), the
    missing-weights error says that the image has none and how to give them, in one line."""
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "image-contents.json").write_text(json.dumps(
        {"weights": {}, "templateflow": {}}))
    with pytest.raises(WeightsError) as caught:
        W.resolve_weights("unigradicon")
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 66
    assert "container image was built without the uniGradICON weights" in message
    assert "--weights PATH" in message and "--build-arg WEIGHTS=" in message
    # outside an image (no record) the usual pre-fetch advice is given
    (isolated_cache / "image-contents.json").unlink()
    with pytest.raises(WeightsError, match="ugi-bids-weights fetch unigradicon"):
        W.resolve_weights("unigradicon")
