"""The studio's cost and responsiveness, measured in a real browser (issue 44).

* idle: the server's CPU time and resident memory over ``--idle`` seconds with no tab open, and
  again with one tab watching a run that does not move (its event stream polling the files);
* latency: a line appended to a run's ``metrics.jsonl`` → the point on the loss chart, in
  Chromium (Playwright), ``--appends`` times; the page reports each point by the chart's
  ``data-points`` attribute, read from the test's side (so the figure includes the browser's
  draw, the event stream and the server's poll).

    python bench/studio.py --json bench/data/2026-12-07_cpu_studio.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from agiasi.testing.studio import StudioProcess as Studio
from agiasi.testing.studio import free_port

CHROMIUM = "/usr/bin/chromium"


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds used, resident MiB) of a process, from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return cpu, rss


def line(step: int) -> str:
    return json.dumps({"step": step, "loss": 3.0, "task_loss": 3.0 + 1 / step, "ortho_loss": 0.0,
                       "alpha": -5.0, "gate": 0.0067, "phase": "🔵 Stable",
                       "rotation_distance": 0.0, "lr": 2e-4, "tokens": 256,
                       "tokens_per_s": 1000.0, "step_time_s": 0.25, "peak_mem_gib": 1.0})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--appends", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        run = root / "runs" / "still"
        run.mkdir(parents=True)
        (run / "train_config.json").write_text(json.dumps({"max_steps": 1000}))
        (run / "metrics.jsonl").write_text("".join(line(s) + "\n" for s in range(1, 6)))
        studio = Studio(root, free_port()).start()
        try:
            time.sleep(3)
            c0, _ = proc_stats(studio.proc.pid)
            time.sleep(args.idle)
            c1, rss = proc_stats(studio.proc.pid)
            out["idle_no_tab"] = {"cpu_percent": 100 * (c1 - c0) / args.idle, "rss_mib": rss}
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1366, "height": 800})
                page.goto(studio.url + "#run=runs%2Fstill")

                def points() -> int:
                    return int(page.get_attribute("#chart-loss", "data-points") or 0)

                deadline = time.time() + 30
                while points() < 5 and time.time() < deadline:
                    time.sleep(0.05)
                time.sleep(2)
                c0, _ = proc_stats(studio.proc.pid)
                time.sleep(args.idle)
                c1, rss = proc_stats(studio.proc.pid)
                out["idle_one_tab"] = {"cpu_percent": 100 * (c1 - c0) / args.idle, "rss_mib": rss}
                delays = []
                for k in range(args.appends):
                    step = 6 + k
                    want = points() + 1
                    with open(run / "metrics.jsonl", "a") as fh:
                        fh.write(line(step) + "\n")
                    t0 = time.perf_counter()
                    while points() < want:
                        time.sleep(0.005)
                    delays.append(time.perf_counter() - t0)
                    time.sleep(0.3 + (k % 5) * 0.05)  # not in step with the server's poll
                out["latency_s"] = {
                    "n": len(delays),
                    "median": statistics.median(delays),
                    "max": max(delays),
                    "p90": sorted(delays)[int(0.9 * (len(delays) - 1))],
                }
                browser.close()
        finally:
            studio.stop()
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
