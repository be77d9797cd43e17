"""The demo's pieces that run without the embedded model: sizes, report, and the missing-model error."""

import subprocess
import sys

from sae.demo.plan import DemoPlan
from sae.demo.report import render_report


def _eval(label: str, arch: str, k: int, fvus: dict[int, float], threshold: float | None = None):
    results = [
        {"mode": "topk", "k": kk, "fvu": f, "l0": float(kk), "dead": 3, "almost_dead": 5}
        for kk, f in fvus.items()
    ]
    if threshold is not None:
        results.append(
            {
                "mode": "threshold",
                "k": None,
                "fvu": threshold,
                "l0": 9.5,
                "dead": 1,
                "almost_dead": 2,
            }
        )
    return {"label": label, "sae": {"arch": arch, "k": k}, "results": results}


def test_plan_sizes_cpu_and_gpu():
    cpu = DemoPlan.for_device("m.gguf", 15, "cpu", None)
    gpu = DemoPlan.for_device("m.gguf", 15, "cuda:0", None)
    assert cpu.tokens < gpu.tokens and cpu.expansion < gpu.expansion
    names = [s.name for s in cpu.saes]
    assert names == ["hierarchical-k32", "topk-k8", "topk-k32", "batchtopk-k8", "batchtopk-k32"]
    assert DemoPlan.for_device("m.gguf", 15, "cpu", 5000).tokens == 5000


def test_report_tables_hold_every_value():
    evals = [
        _eval("hierarchical-k32", "hierarchical", 32, {1: 0.5, 8: 0.25}),
        _eval("batchtopk-k8", "batchtopk", 8, {8: 0.3125}, threshold=0.28125),
    ]
    text = render_report(evals, "fvu_vs_l0.png", {"model": "tiny"})
    assert "![FVU vs l0](fvu_vs_l0.png)" in text
    assert "| hierarchical-k32 | 32 | top-8 | 8.00 | 0.2500 | 5 | 3 |" in text
    assert "| batchtopk-k8 | 8 | threshold θ | 9.50 | 0.2812 | 2 | 1 |" in text
    assert "| 1 | 0.5000 | – |" in text
    assert "| 8 | 0.2500 | 0.3125 |" in text
    assert "- **model**: tiny" in text


def test_missing_model_file_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sae", "demo", "--model", str(tmp_path / "nope.gguf"),
         "--out", str(tmp_path / "out"), "--tokens", "2K", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr
