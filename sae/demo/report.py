"""demo-out/report.md: the FVU-vs-ℓ0 table of every SAE and the figure."""

from __future__ import annotations

from pathlib import Path

REPORT_FILE = "report.md"


def _fmt(value: float | int | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render_report(evals: list[dict], figure: str, header: dict[str, str]) -> str:
    """Markdown: provenance, one row per (SAE, inference setting), and the figure."""
    lines = ["# sae demo report", ""]
    lines += [f"- **{key}**: {value}" for key, value in header.items()]
    lines += [
        "",
        "FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² on the cache's held-out tokens (never trained on). "
        "Each SAE is evaluated at every inference k; HierarchicalTopK is one SAE for all k.",
        "",
        f"![FVU vs l0]({figure})",
        "",
        "| SAE | trained k | inference | ℓ0 | FVU | almost-dead | dead |",
        "|---|---|---|---|---|---|---|",
    ]
    for ev in evals:
        sae = ev["sae"]
        for row in ev.get("results", []):
            setting = f"top-{row['k']}" if row["mode"] == "topk" else "threshold θ"
            lines.append(
                f"| {ev['label']} | {sae['k']} | {setting} | {_fmt(row.get('l0'), '.2f')} | "
                f"{_fmt(row.get('fvu'), '.4f')} | {row.get('almost_dead', '–')} | "
                f"{row.get('dead', '–')} |"
            )
    lines += ["", "## Best FVU at each inference ℓ0 (top-k settings)", ""]
    ks = sorted(
        {row["k"] for ev in evals for row in ev.get("results", []) if row["mode"] == "topk"}
    )
    lines.append("| k | " + " | ".join(ev["label"] for ev in evals) + " |")
    lines.append("|---|" + "---|" * len(evals))
    for k in ks:
        cells = []
        for ev in evals:
            match = [r for r in ev.get("results", []) if r["mode"] == "topk" and r["k"] == k]
            cells.append(_fmt(match[0]["fvu"], ".4f") if match else "–")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, evals: list[dict], figure: Path, header: dict[str, str]) -> Path:
    path = out_dir / REPORT_FILE
    path.write_text(render_report(evals, figure.name, header))
    return path
