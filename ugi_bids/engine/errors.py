"""Errors the engine raises for bad input, each with the BIDS-App exit code it maps to.

Every message is one line that says what is wrong and what to do about it; the command-line
entry points print ``str(error)`` and exit with ``error.exit_code`` (no stack trace).
"""

from __future__ import annotations


class UgiError(Exception):
    """Base class: a failure the user can act on. ``exit_code`` follows the BIDS-App draft."""

    exit_code = 1


class InputDataError(UgiError):
    """The data are unusable (constant image, NaN, wrong dimensionality): exit 65."""

    exit_code = 65


class MissingInputError(UgiError):
    """A named input file does not exist: exit 66."""

    exit_code = 66


class WeightsError(UgiError):
    """Weights are missing, truncated or of the wrong architecture: exit 66."""

    exit_code = 66


class OutputError(UgiError):
    """An output cannot be written: exit 73."""

    exit_code = 73


class DeviceUnavailableError(UgiError):
    """The requested compute device does not exist here (a usage error): exit 2."""

    exit_code = 2
