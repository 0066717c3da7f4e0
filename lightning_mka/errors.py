"""The one exception type users see for bad input.

Every message is a single line that names the bad value and says how to fix it; the CLI prints it
as ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Iterator


class MKAError(ValueError):
    """Bad input or an unusable environment, reported as one line."""

    # The most recent one, so the CLI can still report it when a library (jsonargparse instantiating a callback)
    # wraps it into an exception of its own whose text merely contains it.
    last: MKAError | None = None

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
        MKAError.last = self


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it (``__cause__``, else ``__context__``), and so on; each exception once."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``error``'s text (its type name if it has none), at most ``limit`` characters: a
    longer line is cut at a word boundary in its second half (a cut mid-word reads like a typo in the message), else
    mid-word, and ends in an ellipsis."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip()
    if len(line) <= limit:
        return line
    limit = max(limit, 1)
    cut = line[:limit - 1]
    head = cut.rpartition(" ")[0]
    # Back to the last space only when that keeps most of the line: a long path or URL near the start is cut inside
    # itself rather than dropped with everything after it.
    if not line[limit - 1].isspace() and len(head) >= limit // 2:
        cut = head
    return cut.rstrip(" ,;:") + "…"


def find_mka_error(error: BaseException) -> MKAError | None:
    """The MKAError behind ``error``: itself, one in its cause chain, or the last one raised if its text shows it."""
    for current in exception_chain(error):
        if isinstance(current, MKAError):
            return current
    last = MKAError.last
    return last if last is not None and str(last) in str(error) else None
