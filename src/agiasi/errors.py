"""The one exception type users see: a clear message, no traceback (the CLI prints it)."""

import re


class AgiasiError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, unsafe checkpoint.

    The message says what is wrong and what to do; the CLI prints it and exits non-zero.
    """


def shown(value: object, limit: int = 80) -> str:
    """A value as an error message may quote it: ``repr`` with every nesting level and length
    bounded, so a crafted value (a YAML alias bomb expands to 10^9 items) is never formatted whole."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict = 2, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def out_of_memory_facts(e: BaseException) -> str:
    """' (it asked for 1.50 GiB more, 10.75 GiB in use)' from PyTorch's CUDA out-of-memory
    message (a page of allocator advice on one line), or '' where it says neither."""
    text = str(e)
    asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", text)
    held = re.search(r"([\d.]+ [KMGT]iB) is allocated by PyTorch", text)
    facts = ([f"it asked for {asked[1]} more"] if asked else []) + (
        [f"{held[1]} in use"] if held else []
    )
    return f" ({', '.join(facts)})" if facts else ""
