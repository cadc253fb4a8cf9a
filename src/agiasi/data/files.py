"""File kinds → rows: every dataset source a user passes to ``--dataset``, read as plain records.

One :class:`Row` per record, with where it came from (``FILE: line N`` / ``FILE: row N``) for
the error messages further down. What each row *means* (text, chat, Alpaca, …) is decided in
:mod:`agiasi.data.formats`; this module only reads.

Kinds: ``.txt``/``.md`` (documents separated by blank lines), ``.jsonl``, ``.json`` (an array of
records), ``.parquet``, ``.csv``/``.tsv``, a folder of such files, a ``datasets``
``save_to_disk`` folder, and any other string is handed to ``datasets.load_dataset`` (a Hub id
where there is network, or a local dataset folder; ``hf:NAME`` forces that path).

Text is read line by line and a file is sniffed only at its start, so a huge or endless input
never has to fit in memory to be called what it is; devices, pipes and sockets are refused
(``/dev/zero`` would otherwise grow without bound).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agiasi.errors import AgiasiError, first_line
from agiasi.textfiles import decode_bytes, text_lines

SNIFF_BYTES = 8192
# Characters of one document read before it is handed on in pieces: a file of one paragraph a
# line and no blank line is one document, and tokenizing 100 MB at once took 9 GB of RAM.
DOC_PIECE_CHARS = 1 << 20
TEXT_SUFFIXES = (".txt", ".text", ".md")
FILE_KINDS = {
    **{s: "text" for s in TEXT_SUFFIXES},
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
HF_PREFIX = "hf:"  # `hf:NAME` always goes to datasets.load_dataset (an id that is also a path)
ACCEPTED = ".txt/.md, .jsonl, .json (an array), .parquet, .csv/.tsv, a folder of these, a `datasets` save_to_disk folder, or a dataset id"


@dataclass(frozen=True)
class Row:
    where: str
    record: dict[str, Any]


def source_kind(source: str) -> str:
    """``text``, ``jsonl``, ``json``, ``parquet``, ``csv``, ``tsv``, ``folder``, ``hf-disk`` or
    ``hf-id`` (what :func:`read_rows` will do with it)."""
    if source.startswith(HF_PREFIX):
        return "hf-id"
    path = Path(source).expanduser()
    if path.is_dir():
        return "hf-disk" if any((path / m).exists() for m in HF_DISK_MARKERS) else "folder"
    if path.exists() or path.is_symlink():
        _check_regular(path)
        if path.suffix.lower() == "":
            return "text"
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise AgiasiError(f"unsupported dataset file {path.name!r}: use {ACCEPTED}")
        return kind
    if "/" in source and not source.startswith((".", "/", "~")) and path.suffix == "":
        return "hf-id"  # owner/name: only load_dataset can say whether it exists
    raise AgiasiError(f"dataset not found: {source!r}")


def read_rows(source: str) -> Iterator[Row]:
    """The rows of one source, in file order (a folder: its files sorted by path)."""
    kind = source_kind(source)
    path = Path(source).expanduser()
    if kind == "folder":
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in FILE_KINDS and not any(x.startswith(".") for x in p.parts)
        )
        if not files:
            raise AgiasiError(f"dataset folder {path} has no dataset files ({ACCEPTED})")
        for f in files:
            yield from read_rows(str(f))
        return
    if kind == "hf-disk":
        yield from _hf_rows(_load_from_disk(path), str(path))
        return
    if kind == "hf-id":
        yield from _hf_rows(load_dataset_id(source.removeprefix(HF_PREFIX)), source)
        return
    _check_regular(path)
    yield from _READERS[kind](path)


# --------------------------------------------------------------------------- plain files


def _check_regular(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise AgiasiError(f"dataset {path} cannot be read: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise AgiasiError(
            f"dataset {path} is not a regular file (a device, pipe or socket); pass a file"
        )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` in UTF-8, UTF-16 with a BOM or Shift-JIS (:mod:`agiasi.textfiles`)."""
    return text_lines(path, "dataset")


def _text_rows(path: Path) -> Iterator[Row]:
    """Documents: blocks of lines separated by blank lines. A document longer than
    ``DOC_PIECE_CHARS`` comes in pieces (each but the last marked ``_continues`` and ending in
    the newline that joined it to the next, all placed at the document's first line), so no
    document has to be held whole."""
    block: list[str] = []
    size = 0
    start = 1
    pending: str | None = None  # a finished piece of the current document, not yet yielded

    def end_document() -> Iterator[Row]:
        where = f"{path}: line {start}"
        text = "\n".join(block).strip()
        if pending is not None and text:
            yield Row(where, {"text": pending, "_continues": True})
            yield Row(where, {"text": text})
        elif pending is not None:
            yield Row(where, {"text": pending.rstrip()})
        elif text:
            yield Row(where, {"text": text})

    for lineno, line in _lines(path):
        if line.strip():
            if not block and pending is None:
                start = lineno
            block.append(line.rstrip())
            size += len(line)
            if size >= DOC_PIECE_CHARS:
                if pending is not None:
                    yield Row(f"{path}: line {start}", {"text": pending, "_continues": True})
                piece = "\n".join(block) + "\n"
                pending = piece.lstrip() if pending is None else piece
                block, size = [], 0
        elif block or pending is not None:
            yield from end_document()
            block, size, pending = [], 0, None
    yield from end_document()


def _jsonl_rows(path: Path) -> Iterator[Row]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        yield Row(
            f"{path}: line {lineno}", _as_record(_parse_json(line, path, lineno), path, lineno)
        )


def _parse_json(text: str, path: Path, lineno: int | None) -> Any:
    at = f"line {lineno}" if lineno is not None else "the file"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {lineno}" if lineno is not None else f"line {e.lineno}"
        raise AgiasiError(f"{path}: {where} is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise AgiasiError(f"{path}: {at} is nested too deeply to be a record") from None


def _as_record(value: Any, path: Path, lineno: int | None, label: str = "line") -> dict:
    if not isinstance(value, dict):
        at = f"{label} {lineno}" if lineno is not None else "the file"
        raise AgiasiError(
            f"{path}: {at} is a JSON {type(value).__name__}, not a record (an object of fields)"
        )
    return value


def _json_rows(path: Path) -> Iterator[Row]:
    """A JSON array of records (the Hub's ``.json`` files; read whole, as json has no stream)."""
    text = decode_bytes(path.read_bytes(), path, "dataset")
    if not text.strip():
        return
    value = _parse_json(text, path, None)
    if not isinstance(value, list):
        raise AgiasiError(
            f"{path} holds a JSON {type(value).__name__}; a .json dataset is an array of records "
            "(use .jsonl for one record a line)"
        )
    for i, rec in enumerate(value, start=1):
        yield Row(f"{path}: record {i}", _as_record(rec, path, i, "record"))


def _parquet_rows(path: Path) -> Iterator[Row]:
    pq = _pyarrow("parquet", path)
    try:
        pf = pq.ParquetFile(str(path))
        batches = pf.iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for rec in batch.to_pylist():
                row += 1
                yield Row(f"{path}: row {row}", rec)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise AgiasiError(
            f"dataset {path} is not a readable parquet file: {first_line(e)}"
        ) from None


# The longest value a CSV cell may hold (Python's csv refuses fields past 128 KiB by default; a
# long conversation in one cell is normal data, a cell of gigabytes is not).
MAX_CELL_CHARS = 64 << 20


def _delimited_rows(path: Path, delimiter: str) -> Iterator[Row]:
    """Every cell as the text it is, byte for byte: Python's ``csv`` rather than pyarrow, whose
    type inference turned an answer ``0010001`` into ``10001`` (and dates, booleans and floats
    into other spellings) before any cast back to text could help. Read as a stream, in the
    encodings every text file takes; values may span lines inside quotes."""
    import csv

    csv.field_size_limit(MAX_CELL_CHARS)
    lines = (line for _, line in text_lines(path, "dataset", keepends=True))
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    kind = "CSV" if delimiter == "," else "TSV"
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip() for h in header]
        if len(set(names)) != len(names) or not all(names):
            dup = next((n for n in names if not n or names.count(n) > 1), "")
            raise AgiasiError(
                f"dataset {path}: the header row names column {dup!r} "
                f"{'twice' if dup else '(an empty name)'}; every column needs its own name"
            )
        row = 0
        for cells in reader:
            if not cells or cells == [""]:
                continue  # a blank line
            row += 1
            if len(cells) != len(names):
                raise AgiasiError(
                    f"dataset {path}: row {row} (line {reader.line_num}) has {len(cells)} "
                    f"values for {len(names)} columns ({', '.join(names)}); a value holding "
                    f"{'a comma' if delimiter == ',' else 'a tab'} or a line break must be quoted"
                )
            yield Row(f"{path}: row {row}", dict(zip(names, cells, strict=True)))
    except csv.Error as e:
        raise AgiasiError(
            f"dataset {path} is not readable as {kind} (line {reader.line_num}: {e})"
        ) from None


def _pyarrow(module: str, path: Path):
    try:
        import importlib

        return importlib.import_module(f"pyarrow.{module}")
    except ImportError:
        raise AgiasiError(
            f"reading {path.name} needs pyarrow: pip install 'agiasi[datasets]'"
        ) from None


_READERS = {
    "text": _text_rows,
    "jsonl": _jsonl_rows,
    "json": _json_rows,
    "parquet": _parquet_rows,
    "csv": lambda p: _delimited_rows(p, ","),
    "tsv": lambda p: _delimited_rows(p, "\t"),
}


# --------------------------------------------------------------------------- `datasets`


def _datasets():
    try:
        import datasets
    except ImportError:
        raise AgiasiError("this dataset needs the datasets library: pip install datasets") from None
    return datasets


def _train_split(ds, name: str):
    datasets = _datasets()
    if isinstance(ds, (datasets.DatasetDict, dict)):
        if "train" not in ds:
            raise AgiasiError(f"dataset {name} has splits {list(ds)} but no 'train' split")
        ds = ds["train"]
    return ds


def _load_from_disk(path: Path):
    datasets = _datasets()
    try:
        return _train_split(datasets.load_from_disk(str(path)), str(path))
    except AgiasiError:
        raise
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, JSON errors, …
        raise AgiasiError(
            f"dataset folder {path} is not a readable `datasets` folder: {first_line(e)}"
        ) from None


def load_dataset_id(source: str):
    """``datasets.load_dataset(source, split="train")``: a Hub id, or a local dataset folder."""
    datasets = _datasets()
    try:
        return _train_split(datasets.load_dataset(source, split="train"), source)
    except AgiasiError:
        raise
    except Exception as e:
        raise AgiasiError(
            f"dataset not found: {source!r} is neither a file nor a folder, and "
            f"datasets.load_dataset could not load it ({first_line(e)})"
        ) from None


def _hf_rows(ds, name: str) -> Iterator[Row]:
    for i, rec in enumerate(ds, start=1):
        yield Row(f"{name}: row {i}", dict(rec))
