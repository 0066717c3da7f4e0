"""The one exception type users see for bad input.

Every message is a single line that names the bad value and says how to fix it; the CLI prints it
as ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations


class MKAError(ValueError):
    """Bad input or an unusable environment, reported as one line."""

    # The most recent one, so the CLI can still report it when a library (jsonargparse instantiating a callback)
    # wraps it into an exception of its own whose text merely contains it.
    last: MKAError | None = None

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
        MKAError.last = self


def find_mka_error(error: BaseException) -> MKAError | None:
    """The MKAError behind ``error``: itself, one in its cause chain, or the last one raised if its text shows it."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, MKAError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    last = MKAError.last
    return last if last is not None and str(last) in str(error) else None
