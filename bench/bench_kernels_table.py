"""Render bench_kernels.json files as the markdown tables of docs/benchmarks.md.

Usage: python bench/bench_kernels_table.py OUT1/bench_kernels.json [OUT2/bench_kernels.json ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def fmt(v: float, spec: str) -> str:
    return "OOM" if v != v else format(v, spec)


def table(rows: list[dict], part: str) -> list[str]:
    by_shape: dict[tuple[int, int], dict[str, dict]] = defaultdict(dict)
    variants: list[str] = []
    for r in rows:
        by_shape[(r["batch"], r["k"])][r["variant"]] = r
        if r["variant"] not in variants:
            variants.append(r["variant"])
    out = ["| batch | K | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for (b, k), cells in sorted(by_shape.items()):
        parts = []
        for v in variants:
            r = cells.get(v)
            if r is None:
                parts.append("")
                continue
            cell = f"{fmt(r['ms'], '.2f')} ms"
            if r.get("peak_gib") is not None and part != "piece":
                cell += f" / {fmt(r['peak_gib'], '.2f')} GiB"
            if part == "step" and r["ms"] == r["ms"]:
                cell += f" / {b / r['ms'] * 1e3 / 1e6:.2f} M tok/s"
            parts.append(cell)
        out.append(f"| {b} | {k} | " + " | ".join(parts) + " |")
    return out


def main() -> None:
    merged: dict[str, list] = defaultdict(list)
    for path in sys.argv[1:]:
        for part, rows in json.loads(Path(path).read_text()).items():
            merged[part] += rows
    for run in merged.pop("run", []):
        print("Run: " + ", ".join(f"{key} {value}" for key, value in run.items()) + "\n")
    checks = merged.pop("check", [])
    if checks:
        ok = sum(r["ok"] for r in checks)
        print(f"Correctness checks vs float64 on the GPU: {ok}/{len(checks)} passed.\n")
    steps = merged.pop("step", [])
    merged["step"] = [r for r in steps if r.get("part") == "step"]
    merged["piece"] = [r for r in steps if r.get("part") == "piece"]
    for part in ("op", "tune", "step", "piece"):
        if merged.get(part):
            print(
                f"**{part}** (median ms" + (" / peak GiB" if part in ("op", "step") else "") + ")\n"
            )
            print("\n".join(table(merged[part], part)) + "\n")


if __name__ == "__main__":
    main()
