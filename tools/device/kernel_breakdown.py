#!/usr/bin/env python3
"""Per-kernel GPU time of one decode step, from an ncu CSV (--csv --page raw --metrics gpu__time_duration.sum
--print-units base). Steps end with argmax_rows_kernel; the last complete step is summarised: every kernel
in launch order is timed alone by ncu (serialized, no PDL overlap), so the sum is the step's kernel time and
the step's measured time minus that sum is launch and dependency overhead.
usage: kernel_breakdown.py NCU_CSV [measured_ms]"""
import collections
import csv
import re
import sys

rows = list(csv.reader(open(sys.argv[1], errors="replace")))
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
cols = rows[head]
kn, dur = cols.index("Kernel Name"), cols.index("gpu__time_duration.sum")
kernels = []
for r in rows[head + 1:]:
    if len(r) <= max(kn, dur):
        continue
    try:
        kernels.append((r[kn], float(r[dur].replace(",", "")) / 1000.0))  # ns -> us
    except ValueError:
        continue  # the units row
ends = [i for i, (n, _) in enumerate(kernels) if "argmax" in n]
if len(ends) < 2:  # on stdout: the caller keeps stdout only
    print(f"fewer than two decode steps among {len(kernels)} kernels")
    sys.exit(1)
step = kernels[ends[-2] + 1: ends[-1] + 1]


def short(name):
    name = re.sub(r"\(.*$", "", name)
    name = re.sub(r"^.*::", "", name) if "<" not in name else re.sub(r"^[^<]*::", "", name)
    return name.replace("void ", "")


agg = collections.OrderedDict()
for n, us in step:
    k = short(n)
    c, t = agg.get(k, (0, 0.0))
    agg[k] = (c + 1, t + us)
total = sum(t for _, t in agg.values())
print(f"{'kernel (one decode step, each timed alone by ncu)':<52} {'calls':>6} {'total us':>10} {'mean us':>9} {'share':>7}")
for k, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"{k[:52]:<52} {c:>6} {t:>10.1f} {t / c:>9.2f} {100 * t / total:>6.1f}%")
print(f"{'sum':<52} {len(step):>6} {total:>10.1f}")
if len(sys.argv) > 2:
    ms = float(sys.argv[2])
    print(f"measured step {ms * 1000:.1f} us (graph replay): kernels alone {100 * total / (ms * 1000):.0f}%, "
          f"the rest {ms * 1000 - total:.1f} us = {(ms * 1000 - total) / len(step):.2f} us per launch")
