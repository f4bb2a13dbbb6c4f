#!/usr/bin/env python3
"""The W4 decode plans a process tuned, and its step times, from a bench decode log written with
SPEAR_W4_TUNE_LOG=1 (e.g. cuda_run.sh ab:LIKE with AB_RUNS="...,SPEAR_W4_TUNE_LOG=1").

  python3 tools/experiments/tune_plans.py LOG [LOG ...]

For every launch shape tuned before a step-time line: the three fastest plans alone, and (where the shape was
also timed behind its predecessor launch) the three fastest that way; then the step times."""
import re
import sys

LINE = re.compile(r"w4 tune m=(\d+) (.+?) (R\d+S\d+|bulk) gate (\d+)(, after its predecessor)?: ([\d.]+) us")
STEP = re.compile(r"batch (\d+): ([\d.]+) ms/step")


def top(v):
    return " ".join(f"{p} {t:.1f}" for t, p in sorted(v)[:3])


def main(paths):
    for path in paths:
        print(path)
        alone, behind, order = {}, {}, []
        for line in open(path, errors="replace"):
            m = LINE.search(line)
            if m:
                key = f"m={m.group(1)} {m.group(2)}"
                if key not in order:
                    order.append(key)
                (behind if m.group(5) else alone).setdefault(key, []).append((float(m.group(6)), m.group(3)))
                continue
            s = STEP.search(line)
            if s:
                for key in order:
                    print(f"  {key:52s} alone: {top(alone.get(key, []))}")
                    if key in behind:
                        print(f"  {'':52s} behind: {top(behind[key])}")
                alone.clear(), behind.clear(), order.clear()
                print(f"  batch {s.group(1)}: {s.group(2)} ms/step")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    main(sys.argv[1:])
