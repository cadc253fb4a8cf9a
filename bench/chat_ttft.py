"""Time to first token: the studio's chat against ``agiasi chat``, the same model and message.

Both run as their own processes with the model loaded once (the first message of each is
untimed: it loads the model), then take turns: a message to ``agiasi chat`` on its stdin (after
``/reset``, so every prompt is the same), timed to the first byte of the reply on its stdout; the
same message POSTed to the studio's ``/api/chat``, timed to its first ``token`` frame. Greedy,
the reply's first piece is the same text in both (the same streamer: agiasi.generate's).

    python bench/chat_ttft.py                       # the shipped tiny model, 15 rounds
    python bench/chat_ttft.py --model PATH --rounds 30 --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

MESSAGES = {
    "short": "日本の首都について教えてください。",
    # a page of context with the question: what a user pastes (the prefill dominates)
    "long": "次の文章を読んで、要点を三つにまとめてください。" + "吾輩は猫である。名前はまだ無い。"
    "どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは"
    "記憶している。" * 3,
}
MESSAGE = MESSAGES["short"]


class CliChat:
    def __init__(self, model: str, max_new: int):
        self.p = subprocess.Popen(
            [sys.executable, "-u", "-m", "agiasi", "chat", model, "--max-new-tokens", str(max_new),
             "--temperature", "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self._until(b"> ", 300)

    def _until(self, marker: bytes, timeout: float) -> bytes:
        got = b""
        deadline = time.time() + timeout
        fd = self.p.stdout.fileno()
        while not got.endswith(marker):
            if time.time() > deadline:
                raise TimeoutError(got[-200:])
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"agiasi chat exited: {got[-500:]!r}")
                got += chunk
        return got

    def ttft(self) -> float:
        self.p.stdin.write(b"/reset\n")
        self.p.stdin.flush()
        self._until(b"> ", 60)
        fd = self.p.stdout.fileno()
        t0 = time.perf_counter()
        self.p.stdin.write(MESSAGE.encode() + b"\n")
        self.p.stdin.flush()
        select.select([fd], [], [], 120)
        first = time.perf_counter() - t0
        self._until(b"> ", 120)  # the rest of the reply
        return first

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


def studio_ttft(port: int, model: str, max_new: int) -> float:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": MESSAGE}],
                       "temperature": 0, "max_new_tokens": max_new})  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/api/chat", body=body.encode(), headers={
        "Content-Type": "application/json", "X-Agiasi-Studio": "1",
        "Origin": f"http://127.0.0.1:{port}"})  # fmt: skip
    r = conn.getresponse()
    buf, first = b"", None
    while True:
        chunk = r.read1(4096)
        if not chunk:
            break
        buf += chunk
        if first is None and b"event: token" in buf:
            first = time.perf_counter() - t0
    conn.close()
    if first is None:
        raise RuntimeError(f"no token from the studio: {buf[-500:]!r}")
    return first


def main() -> None:
    from agiasi.shipped import tiny_model_path
    from agiasi.testing.studio import StudioProcess, free_port

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(tiny_model_path()))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--message", choices=sorted(MESSAGES), default="short")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    global MESSAGE
    MESSAGE = MESSAGES[args.message]
    # the studio reads only under its root: a model of the user's is served from its own folder
    if Path(args.model).resolve() == tiny_model_path().resolve():
        root = Path(tempfile.mkdtemp()) / "root"
        root.mkdir()
    else:
        root = Path(args.model).resolve().parent
    studio = StudioProcess(root, free_port()).start()
    cli = CliChat(args.model, args.max_new_tokens)
    try:
        studio_ttft(studio.port, args.model, args.max_new_tokens)  # loads the model: untimed
        cli.ttft()  # the CLI's first message, for symmetry
        page, term = [], []
        for _ in range(args.rounds):
            term.append(cli.ttft())
            page.append(studio_ttft(studio.port, args.model, args.max_new_tokens))
    finally:
        cli.close()
        studio.stop()
    row = {
        "model": args.model,
        "message": args.message,
        "rounds": args.rounds,
        "cli_ttft_ms_median": 1000 * statistics.median(term),
        "studio_ttft_ms_median": 1000 * statistics.median(page),
        "cli_ttft_ms": [round(1000 * x, 2) for x in term],
        "studio_ttft_ms": [round(1000 * x, 2) for x in page],
    }
    row["studio_over_cli"] = row["studio_ttft_ms_median"] / row["cli_ttft_ms_median"]
    print(f"agiasi chat: {row['cli_ttft_ms_median']:.1f} ms  studio: "
          f"{row['studio_ttft_ms_median']:.1f} ms  ratio {row['studio_over_cli']:.3f} "
          f"(median of {args.rounds})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
