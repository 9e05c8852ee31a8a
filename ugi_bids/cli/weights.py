"""``ugi-bids-weights``: fetch, locate, verify and list the uniGradICON / multiGradICON weights.

Typical offline workflow: on a login node (with internet) run ``ugi-bids-weights fetch
unigradicon``; on the compute node use the same ``UGI_BIDS_HOME`` (or copy the file to the path
that ``ugi-bids-weights path unigradicon`` prints, or pass ``--weights PATH``). The cache is
``$UGI_BIDS_HOME/weights``, else ``weights`` in the user cache folder of platformdirs
(``$XDG_CACHE_HOME/ugi-bids`` or ``~/.cache/ugi-bids`` on Linux, ``~/Library/Caches/ugi-bids``
on macOS).

Errors are printed as ``ugi-bids-weights: error: <one line>`` and end with the error's exit code
(66 for missing/bad weights, 73 when the cache cannot be written); never with a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ugi_bids.engine.model import weights as W
from ugi_bids.errors import WeightsError, guarded

PROG = "ugi-bids-weights"
EXIT_MISSING = WeightsError.exit_code


def _model(name: str) -> str:
    """argparse type: a known model name (case-insensitive)."""
    try:
        return W.model_info(name).name
    except WeightsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The ``ugi-bids-weights`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Manage the uniGradICON / multiGradICON weights cache "
        "($UGI_BIDS_HOME/weights, else weights in the user cache folder: $XDG_CACHE_HOME/ugi-bids "
        "or ~/.cache/ugi-bids on Linux, ~/Library/Caches/ugi-bids on macOS).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = sub.add_parser("fetch", help="download a model's weights into the cache")
    fetch.add_argument("model", type=_model, metavar="MODEL",
                       help=f"one of: {', '.join(W.MODELS)}")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    fetch.add_argument("--url", help="download from this URL (a mirror) instead of the release")
    fetch.add_argument("--quiet", action="store_true",
                       help="no progress bar (the bar needs tqdm) and no download messages")

    path = sub.add_parser("path", help="print where a model's weights are cached "
                          f"(exit 0 if present, {EXIT_MISSING} if not)")
    path.add_argument("model", type=_model, metavar="MODEL")

    verify = sub.add_parser("verify", help="check that a file loads strictly as the network "
                            "(and matches the model's pinned SHA-256, if any); print its SHA-256")
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.add_argument("--model", type=_model, default="unigradicon",
                        help="model the file should be (default: unigradicon)")

    install = sub.add_parser("install", help="copy a local weights file into the cache (it must "
                             "load strictly); for machines and container builds with no internet")
    install.add_argument("file", type=Path, metavar="FILE")
    install.add_argument("--model", type=_model, default="unigradicon",
                         help="model the file is (default: unigradicon)")

    sub.add_parser("list", help="list the models, their URLs and whether they are cached")
    return parser


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download into the cache (or report that it is already there); print the path."""
    target = W.cached_path(args.model)
    if not args.force and W.is_cached(args.model):
        print(f"{PROG}: {args.model} already cached (use --force to download again)",
              file=sys.stderr)
    else:
        W.fetch(args.model, force=args.force, progress=not args.quiet, url=args.url)
    print(target)
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    """Print the cache path; exit 0 if the file is there, 66 if not."""
    target = W.cached_path(args.model)
    print(target)
    if target.is_file():
        return 0
    print(f"{PROG}: {args.model} is not cached; run `{PROG} fetch {args.model}`",
          file=sys.stderr)
    return EXIT_MISSING


def cmd_verify(args: argparse.Namespace) -> int:
    """Strict load of FILE; print ``<sha256>  FILE`` and OK. A sidecar that still describes the
    file (same size and mtime) but records another checksum means the file is corrupt; a
    checksum other than the model's pinned one (when it has one) is refused too."""
    path = args.file.expanduser()
    info = W.model_info(args.model)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist"
                           if not path.exists() else f"{path} is not a file")
    n_tensors = len(W.network_from_file(path, info.name).state_dict())
    digest = W.sha256_file(path)
    recorded = W.recorded_sha256(path)
    if recorded and recorded != digest:
        raise WeightsError(f"weights file {path} has sha256 {digest} but {recorded} was recorded "
                           f"when it was saved (the file is corrupt); re-fetch it with "
                           f"`{PROG} fetch {info.name} --force`")
    W.check_pin(path, info.name, digest)
    print(f"{digest}  {path}")
    print(f"OK: {path} loads strictly as the {info.display} network ({n_tensors} tensors)")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    """Copy FILE into the cache after a strict load; print ``<sha256>  <cached path>``."""
    target = W.install(args.model, args.file)
    print(f"{W.recorded_sha256(target)}  {target}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """One line per model: name, cached or missing, size, URL; then the cache folder."""
    for info in W.MODELS.values():
        target = W.cached_path(info.name)
        if target.is_file():
            status, size = "cached", f"{target.stat().st_size / 1e6:.1f} MB"
        else:
            status, size = "missing", f"~{info.approx_bytes / 1e6:.0f} MB"
        print(f"{info.name:<14} {status:<8} {size:>9}  {info.url}")
    print(f"cache: {W.cache_dir() / 'weights'}")
    return 0


COMMANDS = {"fetch": cmd_fetch, "path": cmd_path, "verify": cmd_verify, "install": cmd_install,
            "list": cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ugi-bids-weights``; returns the exit code."""
    args = build_parser().parse_args(argv)
    return guarded(PROG, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
