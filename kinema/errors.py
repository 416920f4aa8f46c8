"""The one error type kinema raises for bad input.

A `KinemaError` carries a message written for the person at the keyboard: what is wrong and how to fix it.
The CLI prints it as one line and exits 1; library users catch it like any `ValueError`.
"""


class KinemaError(ValueError):
    """Bad input (file, size, frame count, config or checkpoint), with a message that names the problem and the fix."""
