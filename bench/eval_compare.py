"""Two SAEs' held-out FVU side by side at every inference k both were evaluated at.

Usage: python3 bench/eval_compare.py "LABEL A" A/eval.json "LABEL B" B/eval.json
(the quality scripts in bench/ call it on the `sae eval` output of their two runs).
"""

from __future__ import annotations

import json
import sys


def topk_rows(path: str) -> dict[int, dict]:
    return {r["k"]: r for r in json.load(open(path))["results"] if r["mode"] == "topk"}


def main(label_a: str, path_a: str, label_b: str, path_b: str) -> None:
    a, b = topk_rows(path_a), topk_rows(path_b)
    print(f"| k | FVU, {label_a} | FVU, {label_b} |")
    print("|---|---|---|")
    for k in sorted(a.keys() & b.keys()):
        print(f"| {k} | {a[k]['fvu']:.4f} | {b[k]['fvu']:.4f} |")
    last = max(a.keys() & b.keys(), default=None)
    if last is not None:
        print(f"dead latents: {label_a} {a[last]['dead']}, {label_b} {b[last]['dead']}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
