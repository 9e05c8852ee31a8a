"""Weights registry, cache, download, strict loading and the ``ugi-bids-weights`` CLI.

No test touches the network: downloads come from a local HTTP server on 127.0.0.1 (a thread).
One random checkpoint in the official format (283 MB) is written per session; the other files
are "light" official-format checkpoints whose tensors are views of one shared buffer (~34 MB).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.checkpoints import write_random_checkpoint
from ugi_bids.engine import weights as W
from ugi_bids.engine import weights_cli
from ugi_bids.engine.errors import OutputError, WeightsError
from ugi_bids.engine.network import build_cascade

FETCH_CMD = "ugi-bids-weights fetch unigradicon"


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


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty cache; no hash memo leaks between tests."""
    home = tmp_path / "ugi-home"
    monkeypatch.setenv("UGI_BIDS_HOME", str(home))
    monkeypatch.setattr(W, "_HASH_MEMO", {})
    return home


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (status, body, declared_length)``; a declared length
    larger than the body simulates a dropped connection."""

    def do_GET(self):  # noqa: N802 (http.server API)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        status, body, declared = route
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture(scope="module")
def server(light_checkpoint):
    """A local HTTP server in a daemon thread; yields (base_url, routes)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    body = light_checkpoint.read_bytes()
    httpd.routes = {
        "/good/Step_2_final.trch": (200, body, len(body)),
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


def one_line(message: str) -> bool:
    """A message is a single non-empty line."""
    return bool(message.strip()) and "\n" not in message.strip()


def part_files(folder: Path) -> list[Path]:
    """Leftover temporary downloads."""
    return sorted(folder.rglob("*.part")) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# Registry and cache location


def test_registry_has_both_release_urls():
    assert set(W.MODELS) == {"unigradicon", "multigradicon"}
    for name, info in W.MODELS.items():
        assert info.url == ("https://github.com/uncbiag/uniGradICON/releases/download/"
                            f"{name}_weights/Step_2_final.trch")
        assert info.sha256 is None  # upstream publishes no checksum
        assert 250e6 < info.approx_bytes < 300e6
    assert W.model_info("uniGradICON").name == "unigradicon"
    with pytest.raises(WeightsError, match="unknown model"):
        W.model_info("gradicon")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("UGI_BIDS_HOME", str(tmp_path / "u"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert W.cache_dir() == tmp_path / "u"
    assert W.cached_path("multigradicon") == (
        tmp_path / "u" / "weights" / "multigradicon" / "Step_2_final.trch")
    monkeypatch.delenv("UGI_BIDS_HOME")
    assert W.cache_dir() == tmp_path / "x" / "ugi-bids"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert W.cache_dir() == tmp_path / "h" / ".cache" / "ugi-bids"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert W.cache_dir() == tmp_path / "h" / ".cache" / "ugi-bids"
    assert not W.cache_dir().is_relative_to(Path.cwd())


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
    assert not network.training
    assert all(t.device.type == "cpu" for t in loaded.values())
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
    message = str(info.value)
    assert one_line(message)
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
    assert one_line(str(info.value))
    assert f"shape of {key} is (16, 1, 3, 3, 3) not (16, 2, 3, 3, 3)" in str(info.value)


def test_many_problems_are_summarised(tmp_path):
    path = tmp_path / "other.trch"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError) as info:
        W.load_network(weights=path)
    message = str(info.value)
    assert one_line(message) and "more problems" in message and "(1 tensors, expected 188)" in message
    assert len(message) < 600


def test_truncated_file_refused(tmp_path, checkpoint):
    cut = tmp_path / "cut.trch"
    with open(checkpoint, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(checkpoint.stat().st_size // 2))
    with pytest.raises(WeightsError) as info:
        W.load_network(weights=cut)
    message = str(info.value)
    assert one_line(message)
    assert f"weights file {cut} is truncated or not a uniGradICON checkpoint" in message
    assert "ugi-bids-weights fetch unigradicon --force" in message


@pytest.mark.parametrize("content", [b"", b"hello, not torch\n" * 10, b"\x5c\x01\x00\x00" * 100])
def test_non_torch_file_refused(tmp_path, content):
    path = tmp_path / "junk.trch"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        W.load_checkpoint(path)
    assert one_line(str(info.value)) and "not a uniGradICON checkpoint" in str(info.value)


def test_torch_file_that_is_not_a_state_dict_refused(tmp_path):
    path = tmp_path / "list.trch"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(WeightsError, match="holds a list, not a state_dict") as info:
        W.load_checkpoint(path)
    assert one_line(str(info.value))


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
    assert one_line(str(info.value)) and info.value.exit_code == 66
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
    message = str(info.value)
    assert one_line(message)
    assert W.MODELS["unigradicon"].url in message
    assert FETCH_CMD in message and "--weights PATH" in message and "UGI_BIDS_HOME" in message
    assert str(W.cached_path("unigradicon")) in message


def test_resolve_download_fetches(server, monkeypatch, isolated_cache):
    base, _ = server
    good = f"{base}/good/Step_2_final.trch"
    monkeypatch.setitem(W.MODELS, "unigradicon",
                        W.ModelInfo("unigradicon", "uniGradICON", good))
    path = W.resolve_weights("unigradicon", download=True)
    assert path == W.cached_path("unigradicon") and path.is_file()
    network, record = W.load_network("unigradicon")
    assert record.url == good and record.path == path


# --------------------------------------------------------------------------------------------
# Download


def test_fetch_atomic_with_progress_and_sha256(server, light_checkpoint, monkeypatch, capsys):
    base, _ = server
    target = W.cached_path("unigradicon")
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        if dst == target:
            renames.append((src, dst, dst.exists(), src.stat().st_size))
        real_replace(src, dst)

    monkeypatch.setattr(W.os, "replace", spy)
    path = W.fetch("unigradicon", url=f"{base}/good/Step_2_final.trch")
    assert path == target
    assert path.read_bytes() == light_checkpoint.read_bytes()
    assert len(renames) == 1
    src, _dst, existed, size = renames[0]
    assert src.parent == target.parent and src.name.endswith(".part") and not existed
    assert size == light_checkpoint.stat().st_size
    assert part_files(target.parent) == []
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    digest = hashlib.sha256(light_checkpoint.read_bytes()).hexdigest()
    assert W.read_sidecar(path)[0] == digest
    assert W.sidecar_path(path).read_text().splitlines()[-1] == f"{digest}  Step_2_final.trch"
    err = capsys.readouterr().err
    assert "100.0%" in err and "[" + "#" * 30 + "]" in err and f"sha256 {digest}" in err
    assert len(err.splitlines()) <= 14  # one line per 10 % when not a terminal


def test_fetch_skips_when_cached_and_forces(server, closed_port_url, light_checkpoint):
    base, _ = server
    target = W.cached_path("unigradicon")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"placeholder")
    assert W.fetch("unigradicon", url=closed_port_url) == target  # no network touched
    assert target.read_bytes() == b"placeholder"
    W.fetch("unigradicon", url=f"{base}/good/Step_2_final.trch", force=True, progress=False)
    assert target.read_bytes() == light_checkpoint.read_bytes()


@pytest.mark.parametrize("route, reason", [
    ("/cut/Step_2_final.trch", "connection closed after"),
    ("/missing/Step_2_final.trch", "HTTP 404"),
])
def test_fetch_failure_leaves_no_partial_file(server, route, reason, capsys):
    base, _ = server
    url = f"{base}{route}"
    with pytest.raises(WeightsError) as info:
        W.fetch("unigradicon", url=url, timeout=10)
    message = str(info.value)
    assert one_line(message) and reason in message
    assert message.startswith(f"cannot download the uniGradICON weights from {url}")
    assert FETCH_CMD in message and "--weights PATH" in message and "UGI_BIDS_HOME" in message
    target = W.cached_path("unigradicon")
    assert not target.exists() and not W.sidecar_path(target).exists()
    assert part_files(target.parent) == []


def test_fetch_connection_refused(closed_port_url):
    with pytest.raises(WeightsError) as info:
        W.fetch("unigradicon", url=closed_port_url, timeout=5, progress=False)
    assert one_line(str(info.value)) and closed_port_url in str(info.value)
    assert not W.cached_path("unigradicon").exists()


def test_fetch_invalid_checkpoint_discarded(server):
    base, _ = server
    url = f"{base}/junk/Step_2_final.trch"
    with pytest.raises(WeightsError) as info:
        W.fetch("unigradicon", url=url, progress=False)
    message = str(info.value)
    assert one_line(message) and message.startswith(f"the file downloaded from {url} is")
    assert "nothing was saved" in message and ".part" not in message
    target = W.cached_path("unigradicon")
    assert not target.exists() and part_files(target.parent) == []


def test_fetch_unwritable_cache(monkeypatch, tmp_path, closed_port_url):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("UGI_BIDS_HOME", str(blocker))
    with pytest.raises(OutputError, match="cannot create the weights cache folder") as info:
        W.fetch("unigradicon", url=closed_port_url)
    assert info.value.exit_code == 73


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
    assert not W.sidecar_path(path).exists()


def test_sidecar_is_sha256sum_compatible(tmp_path):
    path = tmp_path / "Step_2_final.trch"
    path.write_bytes(b"data")
    W.write_sidecar(path, W.sha256_file(path))
    if shutil.which("sha256sum") is None:  # pragma: no cover
        pytest.skip("sha256sum not installed")
    tool = subprocess.run(["sha256sum", "-c", W.sidecar_path(path).name], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert tool.returncode == 0, tool.stderr
    assert "Step_2_final.trch: OK" in tool.stdout


# --------------------------------------------------------------------------------------------
# Command line


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    """``python -m ugi_bids.engine.weights_cli ARGS`` with UGI_BIDS_HOME=home."""
    env = {**os.environ, "UGI_BIDS_HOME": str(home)}
    env.pop("UGI_BIDS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ugi_bids.engine.weights_cli", *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int) -> str:
    """Exit ``code``, no traceback, one ``ugi-bids-weights: error:`` line; returns it."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("ugi-bids-weights: error: ")
    return lines[0]


def test_cli_list_and_path(isolated_cache):
    result = run_cli("list", home=isolated_cache)
    assert result.returncode == 0, result.stderr
    for info in W.MODELS.values():
        assert info.url in result.stdout
    assert result.stdout.count("missing") == 2
    assert f"cache: {isolated_cache / 'weights'}" in result.stdout

    result = run_cli("path", "unigradicon", home=isolated_cache)
    assert result.returncode == 66
    assert result.stdout.strip() == str(W.cached_path("unigradicon"))
    assert FETCH_CMD in result.stderr and "Traceback" not in result.stderr


def test_cli_fetch_network_failure(isolated_cache, closed_port_url):
    result = run_cli("fetch", "unigradicon", "--url", closed_port_url, home=isolated_cache)
    line = assert_one_line_error(result, 66)
    assert closed_port_url in line and FETCH_CMD in line
    assert result.stdout == ""


def test_cli_verify_truncated(tmp_path, light_checkpoint, isolated_cache):
    cut = tmp_path / "cut.trch"
    cut.write_bytes(light_checkpoint.read_bytes()[:1000])
    line = assert_one_line_error(run_cli("verify", str(cut), home=isolated_cache), 66)
    assert "truncated or not a uniGradICON checkpoint" in line


def test_cli_usage_errors(isolated_cache):
    result = run_cli("fetch", "gradicon", home=isolated_cache)
    assert result.returncode == 2 and "unknown model 'gradicon'" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_cli(home=isolated_cache).returncode == 2


def test_cli_in_process(server, light_checkpoint, capsys, isolated_cache):
    base, _ = server
    assert weights_cli.main(["fetch", "unigradicon", "--url",
                             f"{base}/good/Step_2_final.trch"]) == 0
    out, err = capsys.readouterr()
    target = W.cached_path("unigradicon")
    assert out.strip() == str(target) and "100.0%" in err
    assert weights_cli.main(["fetch", "unigradicon"]) == 0  # cached: no download
    assert "already cached" in capsys.readouterr().err

    assert weights_cli.main(["path", "unigradicon"]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert weights_cli.main(["list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("unigradicon    cached") and "missing" in listing[1]

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
    assert one_line(err) and "corrupt" in err


def test_cli_verify_missing_file(tmp_path, capsys):
    assert weights_cli.main(["verify", str(tmp_path / "none.trch")]) == 66
    assert capsys.readouterr().err.strip() == (
        f"ugi-bids-weights: error: weights file {tmp_path / 'none.trch'} does not exist")
