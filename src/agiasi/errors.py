"""The one exception type users see: a clear message, no traceback (the CLI prints it)."""


class AgiasiError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, unsafe checkpoint.

    The message says what is wrong and what to do; the CLI prints it and exits non-zero.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
