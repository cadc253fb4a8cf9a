"""Text files as Japanese users have them: one decoding rule for every text agiasi reads.

A CSV or TSV saved by Excel on Japanese Windows is Shift-JIS (CP932), Notepad writes UTF-8 with
a BOM or UTF-16 with one, and every Windows tool ends lines with CRLF. Datasets (``.txt``,
``.jsonl``, ``.json``, ``.csv``, ``.tsv``), ``--calibration``, ``--text``, benchmark task files and
``--config`` are all read here, so they all take the same encodings and fail with the same line:

* a BOM decides: UTF-8 (dropped), UTF-16 LE/BE;
* otherwise UTF-8, strictly. While every byte so far was ASCII (common to UTF-8 and CP932) a
  line that is not UTF-8 but is CP932 switches the file to CP932 — so a Shift-JIS spreadsheet
  whose first lines are ASCII headers is still read, and nothing is decided from a guess about
  bytes already accepted;
* nothing is ever replaced: a byte that fits neither is one error naming the line and what to
  do (``errors="replace"`` would silently train or calibrate on U+FFFD).

Lines are split on ``\\n`` in bytes before decoding: in UTF-8 and CP932 the byte 0x0A only ever
means a line feed (CP932's trail bytes are 0x40–0xFC), so one line at a time is read, never the
whole file. UTF-16 goes through Python's incremental decoder instead.
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator
from pathlib import Path

from agiasi.errors import AgiasiError

SNIFF_BYTES = 8192
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
WHAT_TO_DO = "save it as UTF-8 (Excel: 'CSV UTF-8'; Notepad: 'UTF-8')"


def _bom_encoding(head: bytes) -> str | None:
    if head.startswith(UTF8_BOM):
        return "utf-8-sig"
    if head.startswith(UTF16_BOMS):
        return "utf-16"
    return None


def check_not_binary(path: Path, what: str, head: bytes | None = None) -> None:
    """NUL bytes in the first block of a file without a UTF-16 BOM: binary, or UTF-16 without
    its BOM (which nothing can tell apart from binary reliably)."""
    if head is None:
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    if _bom_encoding(head) == "utf-16":
        return
    if b"\x00" in head:
        raise AgiasiError(
            f"{what} {path} looks binary (NUL bytes in its first {SNIFF_BYTES} bytes), or is "
            f"UTF-16 text without a byte-order mark; expected text: {WHAT_TO_DO}"
        )


# What Python's cp932 codec makes of the single bytes 0x80, 0xA0 and 0xFD-0xFF, which no
# Shift-JIS text holds: seeing one means the file is not CP932 either (binary, Latin-1, ...).
_NOT_SHIFT_JIS = frozenset("\x80\uf8f0\uf8f1\uf8f2\uf8f3")


class _Decoder:
    """UTF-8, switching to CP932 on the first undecodable line while everything before was ASCII."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.encoding = "utf-8"
        self.ascii_so_far = True

    def __call__(self, raw: bytes, lineno: int) -> str:
        try:
            text = raw.decode(self.encoding)
        except UnicodeDecodeError as e:
            if self.encoding == "utf-8" and self.ascii_so_far:
                try:
                    text = raw.decode("cp932")
                except UnicodeDecodeError:
                    pass
                else:
                    if any(c in _NOT_SHIFT_JIS for c in text):
                        raise AgiasiError(self._message(e, lineno)) from None
                    self.encoding = "cp932"
                    return text
            raise AgiasiError(self._message(e, lineno)) from None
        if self.ascii_so_far and not raw.isascii():
            self.ascii_so_far = False
        return text

    def _message(self, e: UnicodeDecodeError, lineno: int) -> str:
        bad = e.object[e.start : e.start + 2].hex(" ")
        name = {"utf-8": "UTF-8", "cp932": "Shift-JIS (CP932)"}[self.encoding]
        other = (
            "; earlier lines were UTF-8 — the file mixes encodings"
            if self.encoding == "utf-8"
            else ""
        )
        return (
            f"{self.what} {self.path}: line {lineno} is not {name} text (bytes {bad} at byte "
            f"{e.start} of the line){other}; agiasi reads UTF-8, UTF-16 with a BOM and "
            f"Shift-JIS (CP932): {WHAT_TO_DO}"
        )


def text_lines(
    path: str | Path, what: str = "file", keepends: bool = False
) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a text file in any of the accepted encodings, one line at a
    time (CRLF and LF alike; with ``keepends`` each line keeps its own ending, as ``csv`` needs
    for values that span lines)."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
        check_not_binary(path, what, head)
        fh.seek(0)
        bom = _bom_encoding(head)
        if bom == "utf-16":
            reader = io.TextIOWrapper(fh, encoding="utf-16", errors="strict", newline="")
            try:
                for lineno, line in enumerate(reader, start=1):
                    yield lineno, line if keepends else line.rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise AgiasiError(
                    f"{what} {path} starts with a UTF-16 byte-order mark but is not UTF-16 text "
                    f"({e.reason}); {WHAT_TO_DO}"
                ) from None
            return
        if bom == "utf-8-sig":
            fh.seek(len(UTF8_BOM))
        decode = _Decoder(path, what)
        for lineno, raw in enumerate(fh, start=1):
            if b"\x00" in raw:
                raise AgiasiError(f"{what} {path}: line {lineno} holds NUL bytes; expected text")
            text = decode(raw, lineno)
            yield lineno, text if keepends else text.rstrip("\r\n")


def read_text(path: str | Path, what: str = "file", max_chars: int | None = None) -> str:
    """The text of a file (at most ``max_chars`` characters, read no further than that), lines
    ending in ``\\n`` as Python's universal newlines give them."""
    parts: list[str] = []
    size = 0
    for _, line in text_lines(path, what, keepends=True):
        if line.endswith("\r\n"):
            line = line[:-2] + "\n"
        elif line.endswith("\r"):
            line = line[:-1] + "\n"
        parts.append(line)
        size += len(line)
        if max_chars is not None and size >= max_chars:
            break
    text = "".join(parts)
    return text if max_chars is None else text[:max_chars]


def decode_bytes(data: bytes, path: str | Path, what: str = "file") -> str:
    """Bytes already read whole (a ``.json`` array, which has no stream), by the same rule."""
    bom = _bom_encoding(data[:4])
    if bom is not None:
        try:
            return codecs.decode(data, bom)
        except UnicodeDecodeError as e:
            raise AgiasiError(
                f"{what} {path} is not text in the encoding its byte-order mark names "
                f"({bom}, byte {e.start}); {WHAT_TO_DO}"
            ) from None
    path = Path(path)
    check_not_binary(path, what, data[:SNIFF_BYTES])
    decode = _Decoder(path, what)
    return "".join(decode(raw, n) for n, raw in enumerate(data.splitlines(True), start=1))
