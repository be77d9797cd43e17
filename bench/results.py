"""The paper's claims on a real model (docs/results.md): one cache, one HierarchicalTopK SAE,
TopK and BatchTopK baselines at several k, all trained on the same tokens, then evaluated at
every inference ℓ0. Every step is a plain `sae` command; this script only sequences them and
records timings, so anyone with the model and text can rerun it.

  python bench/results.py harvest --model M.gguf --text DIR --layer 11 --tokens 20M --work W
  python bench/results.py train --work W --saes hierarchical:64,topk:16,...
  python bench/results.py report --work W --out OUT
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

KS = "1,2,4,8,16,32,64,128"
DEFAULT_SAES = "hierarchical:64,topk:16,topk:32,topk:64,batchtopk:16,batchtopk:32,batchtopk:64"


def sae(*args: object) -> float:
    """Run `python -m sae ARGS`, streaming its output; return wall seconds."""
    cmd = [sys.executable, "-m", "sae", *map(str, args)]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def record(work: Path, key: str, value: object) -> None:
    path = work / "timings.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2))


def harvest(a: argparse.Namespace) -> None:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    seconds = sae(
        "harvest", "--model", a.model, "--layer", a.layer, "--tokens", a.tokens,
        "--dataset", a.text, "--context", 1024, "--batch-size", 32, "--device", "cuda",
        "--out", work / "cache", "--no-progress",
    )  # fmt: skip
    record(work, "harvest_seconds", seconds)
    record(work, "harvest_command", f"sae harvest --model {a.model} --layer {a.layer} "
           f"--tokens {a.tokens} --dataset {a.text} --context 1024")  # fmt: skip


def train(a: argparse.Namespace) -> None:
    work = Path(a.work)
    for spec in a.saes.split(","):
        arch, k = spec.split(":")
        run = work / "runs" / f"{arch}-k{k}"
        if (run / "summary.json").is_file():
            continue
        seconds = sae(
            "train", "--cache", work / "cache", "--out", run, "--arch", arch, "--k", k,
            "--expansion", 16, "--batch", 4096, "--tokens", a.tokens, "--device", "cuda",
            "--eval-every", 0, "--checkpoint-every", 100000, "--no-progress", "--overwrite",
        )  # fmt: skip
        record(work, f"train_seconds/{arch}-k{k}", seconds)
        sae("eval", run, "--cache", work / "cache", "--k", KS, "--tokens", "2M", "--device", "cuda")


def report(a: argparse.Namespace) -> None:
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = sorted((work / "runs").iterdir())
    sae("plot", *runs, "--out", out / "results_fvu_vs_l0.png")
    evals = {run.name: json.loads((run / "eval.json").read_text()) for run in runs}
    summaries = {run.name: json.loads((run / "summary.json").read_text()) for run in runs}
    timings = json.loads((work / "timings.json").read_text())
    (out / "results.json").write_text(
        json.dumps({"evals": evals, "summaries": summaries, "timings": timings}, indent=1)
    )
    print(json.dumps(timings, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="step", required=True)
    h = sub.add_parser("harvest")
    h.add_argument("--model", required=True)
    h.add_argument("--text", required=True)
    h.add_argument("--layer", type=int, default=11)
    h.add_argument("--tokens", default="20M")
    h.add_argument("--work", required=True)
    t = sub.add_parser("train")
    t.add_argument("--work", required=True)
    t.add_argument("--saes", default=DEFAULT_SAES)
    t.add_argument("--tokens", default="19M")
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True)
    a = p.parse_args()
    {"harvest": harvest, "train": train, "report": report}[a.step](a)


if __name__ == "__main__":
    main()
