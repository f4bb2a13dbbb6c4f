#!/usr/bin/env python3
"""Markdown tables of the GPU error-compensator runs (tools/device/cuda_run.sh ec:LIKE): decode ms/step by EC
density and path as a ratio to W4 without ECs, and prefill tokens/s. Usage: ec_table.py RESULTS_DIR"""
import json
import sys
from pathlib import Path


def main(d: Path) -> None:
    for like in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"):
        f = d / f"ec_decode-{like}.json"
        if not f.exists():
            continue
        rows = json.loads(f.read_text())["rows"]
        base = {r["batch"]: r["step_ms_median"] for r in rows if r["ec_density"] == 0}
        batches = sorted(base)
        print(f"\n{like}: decode ms/step (× W4 without ECs)\n")
        print("| EC density | path | " + " | ".join(f"batch {b}" for b in batches) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in batches) + " |")
        print("| 0 | W4 | " + " | ".join(f"{base[b]:.3f}" for b in batches) + " |")
        for dens in sorted({r["ec_density"] for r in rows if r["ec_density"] > 0}):
            cells = {}
            for r in rows:
                if r["ec_density"] == dens:
                    cells[(r["ec_path"], r["batch"])] = r["step_ms_median"]
            best = {b: min(v for (p, bb), v in cells.items() if bb == b) for b in batches}
            for path in ("naive", "overlapped", "fused", "auto"):
                if (path, batches[0]) not in cells:
                    continue
                out = []
                for b in batches:
                    v = cells[(path, b)]
                    s = f"{v:.3f} ({v / base[b]:.2f}×)"
                    out.append(f"**{s}**" if v == best[b] else s)
                name = "dispatched" if path == "auto" else path
                print(f"| {100 * dens:.0f}% | {name} | " + " | ".join(out) + " |")
        pre = []
        for n in (512, 2048):
            g = d / f"ec_prefill{n}-{like}.json"
            if g.exists():
                for r in json.loads(g.read_text())["rows"]:
                    name = "W4" if r["ec_density"] == 0 else ("dispatched" if r["ec_path"] == "auto" else r["ec_path"])
                    pre.append((n, name, r["prefill_tokens_per_s"]))
        if pre:
            print(f"\n{like}: prefill tokens/s (batch 1, EC density 38% for the EC rows)\n")
            print("| tokens | " + " | ".join(p for n, p, _ in pre if n == 512) + " |")
            print("| --- | " + " | ".join("---" for n, _, _ in pre if n == 512) + " |")
            for n in (512, 2048):
                print(f"| {n} | " + " | ".join(f"{v:.0f}" for nn, _, v in pre if nn == n) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
