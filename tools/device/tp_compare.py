#!/usr/bin/env python3
"""Compares `spear generate --margins --json` outputs of --tp 1 and --tp 2, given as consecutive lines of a JSONL
file (one pair per model): identical ids, or the first step where they part and both runs' logit margins there
(top-1 minus top-2 logit). Two runs whose arithmetic differs by bf16 rounding can only part at a near-tie, i.e.
where the margin is about as small as the logits' rounding noise (~0.1 at bf16 for logits of magnitude ~10)."""
import json
import sys


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    for a, b in zip(rows[0::2], rows[1::2]):
        ids_a, ids_b = a["output_ids"], b["output_ids"]
        name = a.get("prompt", "")[:24]
        part = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), None)
        if part is None:
            low = f"smallest margin {min(a['margins']):.4f}" if a.get("margins") else "no margins recorded"
            print(f"tp {a['tp']} vs {b['tp']} '{name}': {min(len(ids_a), len(ids_b))} ids identical ({low})")
            continue
        ma, mb = a.get("margins"), b.get("margins")
        margins = f"margins there {ma[part]:.4f} / {mb[part]:.4f}" if ma and mb else "no margins recorded"
        print(f"tp {a['tp']} vs {b['tp']} '{name}': part at new token {part} ({ids_a[part]} vs {ids_b[part]}), "
              f"{margins}")


if __name__ == "__main__":
    main(sys.argv[1])
