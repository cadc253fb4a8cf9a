"""Japanese users' files as their tools save them — Excel's Shift-JIS CSV, Notepad's UTF-8 with
a BOM and UTF-16, CRLF everywhere — are read as the same records as clean UTF-8, by every text
reader; a file in none of those encodings is one line saying what to do. Every CSV/TSV cell is
the text it is, byte for byte (pyarrow's type inference once trained ``0010001`` as ``10001``)."""

from __future__ import annotations

import json

import pytest

from agiasi.cli import main
from agiasi.data import load_records
from agiasi.errors import AgiasiError

RECS = [
    {"instruction": "日本の首都は？", "input": "ｶﾀｶﾅ・①・髙﨑", "output": "東京です。\n二行目"},
    {"instruction": "富士山", "input": "", "output": "3776m"},
]

# (name, encode): how a tool on Japanese Windows saves the same characters
ENCODINGS = [
    ("utf-8", lambda s: s.encode("utf-8")),
    ("utf-8-bom", lambda s: b"\xef\xbb\xbf" + s.encode("utf-8")),
    ("cp932", lambda s: s.encode("cp932")),
    ("utf-16-bom", lambda s: s.encode("utf-16")),  # Python writes the BOM
    ("utf-16-be-bom", lambda s: b"\xfe\xff" + s.encode("utf-16-be")),
]
NEWLINES = [("lf", "\n"), ("crlf", "\r\n")]


def _csv(recs, sep: str, nl: str) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(recs[0]), delimiter=sep, lineterminator=nl)
    w.writeheader()
    w.writerows(recs)
    return buf.getvalue()


def _jsonl(recs, nl: str) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + nl for r in recs)


def _json(recs, nl: str) -> str:
    return json.dumps(recs, ensure_ascii=False, indent=1).replace("\n", nl)


KINDS = {
    "csv": lambda recs, nl: _csv(recs, ",", nl),
    "tsv": lambda recs, nl: _csv(recs, "\t", nl),
    "jsonl": _jsonl,
    "json": _json,
}


def _plain(records):
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("enc", ENCODINGS, ids=[e[0] for e in ENCODINGS])
@pytest.mark.parametrize("nl", NEWLINES, ids=[n[0] for n in NEWLINES])
def test_every_encoding_and_newline_gives_the_same_records(tmp_path, kind, enc, nl):
    reference = tmp_path / f"ref.{kind}"
    reference.write_bytes(KINDS[kind](RECS, "\n").encode("utf-8"))
    p = tmp_path / f"d.{kind}"
    p.write_bytes(enc[1](KINDS[kind](RECS, nl[1])))
    assert _plain(load_records(str(p))) == _plain(load_records(str(reference)))


@pytest.mark.parametrize("enc", ENCODINGS, ids=[e[0] for e in ENCODINGS])
def test_plain_text_in_every_encoding(tmp_path, enc):
    text = "吾輩は猫である。\r\n名前はまだ無い。\r\n\r\nｶﾀｶﾅ①髙﨑\r\n"
    p = tmp_path / "d.txt"
    p.write_bytes(enc[1](text))
    from agiasi.textfiles import read_text

    docs = [r["text"] for r in load_records(str(p))]
    assert docs == ["吾輩は猫である。\n名前はまだ無い。", "ｶﾀｶﾅ①髙﨑"]
    assert read_text(p) == text.replace("\r\n", "\n")


def test_a_shift_jis_file_whose_first_lines_are_ascii(tmp_path):
    """Excel's header row is ASCII, which is UTF-8 too: the first Japanese row decides."""
    p = tmp_path / "d.csv"
    body = "instruction,output\n" + "".join(f"q{i},a{i}\n" for i in range(3000))
    p.write_bytes((body + "質問,答え\n").encode("cp932"))
    recs = load_records(str(p))
    assert recs[-1]["messages"][0]["content"] == "質問"


# Each column holds one kind of value, the way a spreadsheet column does: that is what a type
# inference turns into numbers, booleans, dates or nulls (an answer "0010001" trained as "10001").
COLUMNS = {
    "zero-padded ids": ["0010001", "0000", "007"],
    "decimals": ["1.50", "2.500", "-0.10"],
    "exponents": ["1e5", "2E-3", "3e+07"],
    "booleans": ["TRUE", "false", "True"],
    "dates": ["2024-01-01", "2024-12-31", "2025-02-03"],
    "times": ["09:00", "23:59:59", "00:00:00.5"],
    "nulls": ["NaN", "null", "N/A"],
    "signed": ["-0", "+81", "-1"],
    "thousands": ["1,234", "12,345,678", "0,5"],
    "spaced and quoted": ["  両端に空白  ", '"引用"', "=SUM(A1)"],
    "line breaks": ["改行\nあり", "a\r\nb", "末尾\n"],
}


@pytest.mark.parametrize("sep", [",", "\t"], ids=["csv", "tsv"])
@pytest.mark.parametrize("column", sorted(COLUMNS))
def test_csv_cells_are_text_byte_for_byte(tmp_path, sep, column):
    cells = COLUMNS[column]
    recs = [{"prompt": f"質問{i}", "completion": c} for i, c in enumerate(cells)]
    p = tmp_path / ("d.csv" if sep == "," else "d.tsv")
    p.write_bytes(_csv(recs, sep, "\n").encode("utf-8"))
    got = [r["messages"][1]["content"] for r in load_records(str(p))]
    assert got == cells


NOT_TEXT = [
    ("latin-1", "café résumé\n".encode("latin-1"), "is not UTF-8 text"),
    ("invalid-both", b"\x85\x40\x85\x41\n", "is not UTF-8 text"),
    ("utf-8-then-cp932", "日本語\n".encode() + "日本語\n".encode("cp932"), "mixes encodings"),
    ("cp932-then-invalid", "日本語\n".encode("cp932") + b"\x85\x40\n", "Shift-JIS (CP932) text"),
    ("utf-16-no-bom", "日本語のテキスト\n".encode("utf-16-le"), "UTF-16 text without a byte-order"),
    ("binary", b"\x00\x01\x02PK\x03", "looks binary"),
]


# two-line cases: their first line is valid text but no JSON record, where JSON kinds stop first
UNDECODABLE = [
    (case, kind)
    for case in NOT_TEXT
    for kind in ("txt", "jsonl", "csv", "json")
    if not (case[0] in ("utf-8-then-cp932", "cp932-then-invalid") and kind.startswith("json"))
]


@pytest.mark.parametrize(("case", "kind"), UNDECODABLE, ids=[f"{c[0]}-{k}" for c, k in UNDECODABLE])
def test_undecodable_files_are_one_line_naming_what_to_do(
    tiny_phi3_tok, tmp_path, capsys, case, kind
):
    _, data, message = case
    p = tmp_path / f"d.{kind}"
    p.write_bytes(data)
    assert main(["data", str(p), "--base-model", str(tiny_phi3_tok)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agiasi: error: ") and message in err[0], err
    if message != "looks binary":
        assert "save it as UTF-8" in err[0]


def test_every_text_reader_takes_the_same_encodings(tmp_path):
    """--text (eval and export), --calibration, task data and --config read Shift-JIS too, and
    never replace an undecodable byte."""
    from agiasi.cli import _read_yaml
    from agiasi.eval.perplexity import prefix_ids
    from agiasi.eval.tasks import TASKS, read_items
    from agiasi.export.calibration import Calibration, calibration_text

    sjis = tmp_path / "t.txt"
    sjis.write_bytes("吾輩は猫である。\r\n名前はまだ無い。\r\n".encode("cp932"))
    ids, _, chars = prefix_ids(lambda t: list(t.encode()), sjis, 10**6)
    assert bytes(ids).decode() == "吾輩は猫である。\n名前はまだ無い。\n"

    class Tok:
        pass

    cal = Calibration("a file", str(sjis))
    assert calibration_text(cal, Tok(), 1000) == "吾輩は猫である。\n名前はまだ無い。\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes("日本語\n".encode() + b"\x85\x40\n")
    with pytest.raises(AgiasiError, match="line 2 is not UTF-8 text"):
        calibration_text(Calibration("a file", str(bad)), Tok(), 1000)

    item = {"q_id": 1, "question": "質問", "label": 0,
            **{f"choice{i}": f"選択{i}" for i in range(5)}}  # fmt: skip
    task_file = tmp_path / "jcqa.json"
    task_file.write_bytes(json.dumps(item, ensure_ascii=False).encode("utf-16"))
    assert read_items(TASKS["jcommonsenseqa"], task_file)[0]["question"] == "質問"

    cfg = tmp_path / "c.yaml"
    cfg.write_bytes("dataset: データ.jsonl\r\nmax-steps: 3\r\n".encode("cp932"))
    assert _read_yaml(str(cfg)) == {"dataset": "データ.jsonl", "max-steps": 3}
