"""Seconds by thread and by innermost agiasi frame from a raw py-spy profile: the table the
export's profiles in bench/RESULTS.md were read from.

    py-spy record -r 100 --threads -f raw -o prof.txt -- python -m agiasi export CK ...
    python bench/spy_table.py prof.txt --rate 100 [--top 30]
"""

from __future__ import annotations

import argparse
import collections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", help="py-spy record -f raw output")
    ap.add_argument("--rate", type=float, default=100, help="the -r py-spy sampled at")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    by_frame: collections.Counter = collections.Counter()
    by_thread: collections.Counter = collections.Counter()
    for line in open(args.raw, encoding="utf-8"):
        line = line.rstrip()
        if not line:
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        ours = [f for f in frames if "agiasi/" in f]
        by_frame[(thread, ours[-1] if ours else "(outside agiasi)", frames[-1])] += int(count)
        by_thread[thread] += int(count)
    for thread, n in by_thread.most_common():
        print(f"{n / args.rate:8.2f} s  {thread}")
    print()
    print("       s  thread | innermost agiasi frame | innermost frame")
    for (thread, ours, inner), n in by_frame.most_common(args.top):
        print(f"{n / args.rate:8.2f}  {thread[:16]} | {ours[:70]} | {inner[:70]}")


if __name__ == "__main__":
    main()
