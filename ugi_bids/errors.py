"""Errors a user can act on, the BIDS-App exit code each maps to, and the one guard every
console script runs its work under.

Every message is one line that says what is wrong and what to do about it. The console scripts
(``ugi-bids``, ``ugi-register``, ``ugi-warp``, ``ugi-bids-weights``) run under :func:`guarded`,
which prints ``<prog>: error: <message>`` on stderr and returns the error's exit code: no stack
trace unless ``UGI_BIDS_DEBUG`` is set.

Exit codes (BIDS-App 2.0 draft; :data:`EXIT_CODES`):

====  ======================================================================================
0     success
1     a processing step failed (``ugi-bids``: one line per failed step, naming its crash file),
      or some participants were skipped for an unusable image
2     usage: bad option values, unreadable option files, a folder inside ``BIDS_DIR``
16    ``BIDS_DIR`` is not a valid BIDS dataset
17    unknown analysis level
18    the filters selected no usable image (for example an unknown participant)
65    unusable image data (corrupt, 4D, NaN, constant, degenerate, no orientation, a header that
      declares more than the file holds)
66    a missing input: image, weights, template, option file
73    an output cannot be written
130   interrupted (Ctrl-C)
====  ======================================================================================
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TextIO

#: The exit codes the console scripts return, by meaning (see the module docstring).
EXIT_CODES = {
    "success": 0,
    "failure": 1,
    "usage": 2,
    "bids_validation": 16,
    "analysis_level": 17,
    "no_data": 18,
    "data": 65,
    "missing_input": 66,
    "output": 73,
    "interrupted": 130,
}


class UgiError(Exception):
    """Base class: a failure the user can act on. ``exit_code`` follows the BIDS-App draft."""

    exit_code = EXIT_CODES["failure"]


class UsageError(UgiError):
    """The command line (or a file it names) is malformed or asks for something refused: exit 2
    (argparse's own code, one of the draft's "2/64")."""

    exit_code = EXIT_CODES["usage"]


class AnalysisLevelError(UsageError):
    """The analysis level is neither ``participant`` nor ``group``: exit 17."""

    exit_code = EXIT_CODES["analysis_level"]


class BIDSFilterError(UsageError):
    """A ``--bids-filter-file`` is malformed or names an unknown entity: exit 2."""


class TemplateSpecError(UsageError):
    """A space or template specification is malformed or names nothing that exists: exit 2."""


class DeviceUnavailableError(UsageError):
    """The requested compute device does not exist here: exit 2."""


class BIDSValidationError(UgiError):
    """``BIDS_DIR`` is not a valid BIDS dataset: exit 16."""

    exit_code = EXIT_CODES["bids_validation"]


class NoDataError(UgiError):
    """The participant/session labels or filters selected no usable image: exit 18."""

    exit_code = EXIT_CODES["no_data"]


class InputDataError(UgiError):
    """The data are unusable (constant image, NaN, wrong dimensionality): exit 65."""

    exit_code = EXIT_CODES["data"]


class MissingInputError(UgiError):
    """A named input (file, folder, dataset, template) does not exist: exit 66."""

    exit_code = EXIT_CODES["missing_input"]


class WeightsError(MissingInputError):
    """Weights are missing, truncated or of the wrong architecture: exit 66."""


class TemplateError(MissingInputError):
    """A template file is missing, an empty placeholder, or could not be downloaded: exit 66."""


class OutputError(UgiError):
    """An output cannot be written: exit 73."""

    exit_code = EXIT_CODES["output"]


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` (a message or an exception) on one line: ITK's "ITK ERROR: Class(0x..):" preamble
    dropped, line breaks and runs of blanks collapsed to single spaces, and cut to ``limit``
    characters (with "...") when a limit is given. An exception without text gives its class
    name."""
    text_ = str(text)
    marker = text_.find("ITK ERROR:")
    if marker >= 0:  # ITK: "ITK ERROR: ImageIO(0x55d...): the message"
        text_ = text_[marker:].split(":", 2)[-1]
    line = " ".join(text_.split())
    if not line and isinstance(text, BaseException):
        line = type(text).__name__
    if limit is not None and len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


def print_error(prog: str, message: object, stream: TextIO | None = None) -> None:
    """Print ``<prog>: error: <message on one line>`` on ``stream`` (stderr): the form of every
    error line of the console scripts."""
    print(f"{prog}: error: {one_line(message)}", file=stream or sys.stderr)


def report(prog: str, error: UgiError, stream: TextIO | None = None) -> int:
    """Print ``<prog>: error: <one line>`` on ``stream`` (stderr); return the error's exit code."""
    print_error(prog, error, stream)
    return error.exit_code


def guarded(prog: str, action: Callable[[], int | None]) -> int:
    """Run a console script's work; return its exit code, never a stack trace for user errors.

    ``action`` returns an exit code (``None`` means 0). A :class:`UgiError` prints one line and
    returns its code; Ctrl-C returns 130; any other exception is a bug: one line naming its type
    and exit 1, or the full traceback when the environment sets ``UGI_BIDS_DEBUG``.
    ``SystemExit`` (argparse's ``--help``/``--version`` and usage errors) passes through.
    """
    try:
        code = action()
    except UgiError as error:
        return report(prog, error)
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return EXIT_CODES["interrupted"]
    except Exception as exc:  # a bug or an unforeseen library failure
        if os.environ.get("UGI_BIDS_DEBUG"):
            raise
        print(f"{prog}: error: unexpected {type(exc).__name__}: {one_line(exc, 300)} "
              f"(set UGI_BIDS_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_CODES["failure"]
    return EXIT_CODES["success"] if code is None else int(code)
