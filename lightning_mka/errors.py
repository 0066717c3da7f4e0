"""The one exception type users see for bad input.

Every message is a single line that names the bad value and says how to fix it; the CLI prints it
as ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations


class MKAError(ValueError):
    """Bad input or an unusable environment, reported as one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
