"""The calibrator's user-fixable error: a MoesimError, so the CLI prints it as one line and exits 2."""

from sim.errors import MoesimError


class CalibrationError(MoesimError):
    """Bad calibration arguments (no such device, an unusable points file) or nothing to fit."""
