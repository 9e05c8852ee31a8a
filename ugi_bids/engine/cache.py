"""ugi-bids' own cache folder (the weights, TemplateFlow's unpacked skeleton); no torch here."""

from __future__ import annotations

import json
import os
from pathlib import Path

from platformdirs import user_cache_dir

from ..errors import WeightsError


def cache_dir() -> Path:
    """The ugi-bids cache folder: ``$UGI_BIDS_HOME`` if set, else the user cache folder of
    :func:`platformdirs.user_cache_dir` (Linux: ``$XDG_CACHE_HOME/ugi-bids`` when that is
    absolute, else ``~/.cache/ugi-bids``; macOS: ``~/Library/Caches/ugi-bids``).

    Never the current directory unless the user points ``UGI_BIDS_HOME`` there.
    """
    home = os.environ.get("UGI_BIDS_HOME")
    if home:
        return Path(home).expanduser().absolute()
    message = ("cannot find the home folder for the ugi-bids cache (weights); "
               "set UGI_BIDS_HOME to a writable folder")
    try:
        folder = user_cache_dir("ugi-bids", appauthor=False)
    except (RuntimeError, KeyError) as exc:  # no resolvable home folder
        raise WeightsError(message) from exc
    if not os.path.isabs(folder):  # "~/.cache/..." left unexpanded: no home folder either
        raise WeightsError(message)
    return Path(folder)


#: Written by the container build (``docker/bake_image.py``) into ``$UGI_BIDS_HOME``: what the
#: image holds (weights, TemplateFlow files) with their SHA-256.
IMAGE_CONTENTS = "image-contents.json"


def image_contents() -> dict | None:
    """What a ugi-bids container image baked into ``$UGI_BIDS_HOME`` (``weights``: model name ->
    ``{"path", "sha256"}``, ``templateflow``: relative path -> SHA-256), or None outside such an
    image (or when the record cannot be read)."""
    try:
        contents = json.loads((cache_dir() / IMAGE_CONTENTS).read_text("utf-8"))
    except (OSError, ValueError, WeightsError):
        return None
    return contents if isinstance(contents, dict) else None
