"""Bake ugi-bids' run-time resources into a container image (run by the Dockerfile, as root).

Compute nodes have no internet, so the image carries what a default run needs:

* the TemplateFlow files of the output spaces (``--spaces``; the default output space
  MNI152NLin2009cAsym: its T1w and brain mask) and of ``--atlases``, under ``$TEMPLATEFLOW_HOME``,
  either downloaded with TemplateFlow's client (``--templateflow fetch``) or copied from a
  TemplateFlow-shaped folder in the build context (``--templateflow PATH``);
* the weights under ``$UGI_BIDS_HOME/weights``: downloaded (``--weights fetch``), installed from a
  file in the build context (``--weights PATH``), or left out (``--weights none``: the image then
  answers a run with one line and exit 66, see ``ugi_bids.engine.model.weights``).

Every file is resolved exactly as ``ugi-bids`` resolves it at run time (the same functions), so a
build that passes here cannot fail to find its templates later. The SHA-256 of every baked file
is recorded in ``$UGI_BIDS_HOME/image-contents.json`` (read by ugi-bids) and in
``$UGI_BIDS_HOME/SHA256SUMS`` (``sha256sum -c`` it inside the image to check them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ugi_bids import __version__
from ugi_bids.engine.cache import IMAGE_CONTENTS, cache_dir
from ugi_bids.engine.model import weights as W
from ugi_bids.errors import guarded
from ugi_bids.utils.atlases import parse_atlas, resolve_atlas
from ugi_bids.utils.templates import parse_output_spaces, resolve_template, templateflow_home

PROG = "bake_image.py"


def bake_templateflow(source: str, spaces: list[str], atlases: list[str]) -> list[Path]:
    """Put the spaces' and atlases' files into ``$TEMPLATEFLOW_HOME``; the files ugi-bids will
    read (images, masks, label maps and tables, each template's description)."""
    home = templateflow_home()
    home.mkdir(parents=True, exist_ok=True)
    if source != "fetch":
        folder = Path(source)
        if not folder.is_dir():
            raise SystemExit(f"{PROG}: error: --templateflow {source}: not a folder in the build "
                             f"context (give a TemplateFlow-shaped folder, or 'fetch')")
        shutil.copytree(folder, home, dirs_exist_ok=True)
    download = source == "fetch"
    resolved = [resolve_template(spec, "T1w", download=download)
                for spec in parse_output_spaces(spaces)]
    files = [f for t in resolved for f in (t.image, t.mask) if f is not None]
    files += [t.image.parent / "template_description.json" for t in resolved]
    for value in atlases:
        atlas = resolve_atlas(parse_atlas(value), resolved, download=download)
        files += [atlas.image]
        if (atlas.table_uri or "").startswith("bids:templateflow:"):
            files += [home / atlas.table_uri.split(":", 2)[2]]
    return sorted({f.resolve() for f in files if f.is_file()})


def bake_weights(source: str, model: str) -> Path | None:
    """The cached weights file after fetching or installing it; None for ``none``."""
    if source == "none":
        return None
    if source == "fetch":
        return W.fetch(model, progress=False)
    return W.install(model, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="fetch", help="fetch, none, or a file")
    parser.add_argument("--model", default="unigradicon")
    parser.add_argument("--templateflow", default="fetch", help="fetch, or a TemplateFlow folder")
    parser.add_argument("--spaces", default="MNI152NLin2009cAsym",
                        help="output spaces, separated by spaces (as --output-spaces)")
    parser.add_argument("--atlases", default="", help="atlases, separated by spaces (as --atlases)")
    args = parser.parse_args(argv)
    args.spaces, args.atlases = args.spaces.split(), args.atlases.split()

    def bake() -> int:
        templates = bake_templateflow(args.templateflow, args.spaces, args.atlases)
        weights = bake_weights(args.weights, args.model)
        home, tf_home = cache_dir(), templateflow_home().resolve()
        contents = {
            "ugi_bids_version": __version__,
            "spaces": args.spaces, "atlases": args.atlases,
            "templateflow_home": str(tf_home),
            "templateflow": {str(f.relative_to(tf_home)): W.sha256_file(f) for f in templates},
            "weights": {} if weights is None else {
                args.model: {"path": str(weights), "sha256": W.recorded_sha256(weights)}},
        }
        (home / IMAGE_CONTENTS).write_text(json.dumps(contents, indent=2) + "\n")
        sums = [(digest, tf_home / rel) for rel, digest in contents["templateflow"].items()]
        sums += [(w["sha256"], Path(w["path"])) for w in contents["weights"].values()]
        (home / "SHA256SUMS").write_text("".join(f"{d}  {p}\n" for d, p in sums))
        for digest, path in sums:
            print(f"baked {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 {digest})")
        if weights is None:
            print("baked no weights (--build-arg WEIGHTS=none): runs need --weights PATH")
        return 0

    return guarded(PROG, bake)


if __name__ == "__main__":
    sys.exit(main())
