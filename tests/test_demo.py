"""The demo's pieces that run without the embedded model: sizes, report, and the missing-model error."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


# --- the demo end to end on a tiny LM: reruns, refusals, --overwrite, Ctrl-C ---------------------

TINY = ("--layer", "1", "--tokens", "6K")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    from tinylm import make_tiny_lm

    return str(make_tiny_lm(tmp_path_factory.mktemp("tinylm")))


def demo_command(lm: str, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sae", "demo", "--model", lm, "--device", "cpu",
            "--out", str(out), *args]  # fmt: skip


def run_demo(lm: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(demo_command(lm, out, *args), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory, tiny_lm) -> Path:
    """One finished tiny demo; each test works on its own copy."""
    out = tmp_path_factory.mktemp("demo") / "out"
    result = run_demo(tiny_lm, out, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def copy_demo(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "out"))


def mtimes(out: Path) -> dict[str, int]:
    """When each run's weights were written (0: none yet)."""
    weights = {run.name: run / "sae.safetensors" for run in out.glob("runs/*")}
    return {name: w.stat().st_mtime_ns if w.exists() else 0 for name, w in weights.items()}


def test_rerun_with_the_same_settings_reuses_what_is_finished(finished_demo, tiny_lm, tmp_path):
    out = copy_demo(finished_demo, tmp_path)
    # what a train that was interrupted leaves: its config, no weights, no summary
    for name in ("summary.json", "sae.safetensors", "eval.json"):
        (out / "runs" / "topk-k8" / name).unlink()
    before = mtimes(out)
    result = run_demo(tiny_lm, out, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reusing the finished cache" in result.stderr
    assert result.stderr.count("reusing the finished run") == 4
    after = mtimes(out)
    assert {name for name in after if after[name] != before.get(name)} == {"topk-k8"}
    assert "layer**: 1 " in (out / "report.md").read_text()


def test_rerun_with_other_settings_is_refused(finished_demo, tiny_lm, tmp_path):
    out = copy_demo(finished_demo, tmp_path)
    report = (out / "report.md").read_text()
    result = run_demo(tiny_lm, out, "--layer", "2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {out} holds a demo made with other settings:")
    runs = (
        "runs/hierarchical-k32, runs/topk-k8, runs/topk-k32, runs/batchtopk-k8, runs/batchtopk-k32"
    )
    assert f"layer 1 there, 2 now (cache, {runs})" in message
    assert "tokens 6,000 there, 80,000 now (cache)" in message
    assert "Pass a new --out, or --overwrite" in message
    assert (out / "report.md").read_text() == report  # refused before any stage ran
    assert "1/4 harvest" not in result.stderr


def test_a_run_trained_otherwise_is_refused(finished_demo, tiny_lm, tmp_path):
    """The cache matches, but one run in the demo's folder was trained with another batch."""
    out = copy_demo(finished_demo, tmp_path)
    config = out / "runs" / "topk-k32" / "config.json"
    config.write_text(config.read_text().replace('"batch": 1024', '"batch": 2048'))
    result = run_demo(tiny_lm, out, *TINY)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "batch 2,048 there, 1,024 now (runs/topk-k32)" in result.stderr
    assert "(cache" not in result.stderr


def test_overwrite_replaces_an_earlier_demo(finished_demo, tiny_lm, tmp_path):
    from sae.store import open_cache

    out = copy_demo(finished_demo, tmp_path)
    result = run_demo(tiny_lm, out, "--layer", "2", "--tokens", "6K", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reusing" not in result.stderr
    assert open_cache(str(out / "cache")).layer == 2
    for run in out.glob("runs/*"):
        assert json.loads((run / "config.json").read_text())["layer"] == 2, run
    assert "layer**: 2 " in (out / "report.md").read_text()


def test_ctrl_c_stops_the_demo_and_a_rerun_continues(tiny_lm, tmp_path):
    out = tmp_path / "out"
    # Python ignores SIGINT when it starts with it ignored (a background job): reset it
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from sae.cli import main; main(sys.argv[1:])"
    )
    argv = demo_command(tiny_lm, out, "--layer", "1", "--tokens", "40K")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv[3:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "cache" / "writers").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the harvest never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # the harvest has begun: 40K tokens take seconds
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted in `sae harvest`" in stderr
    assert not (out / "runs").exists() and not (out / "report.md").exists()

    result = run_demo(tiny_lm, out, "--layer", "1", "--tokens", "40K")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(out.glob("runs/*/summary.json"))) == 5 and (out / "report.md").is_file()


def test_a_stage_that_fails_stops_the_demo(finished_demo, tmp_path):
    """`sae store verify` exits 1 on a damaged cache: the stage runner turns that into an error."""
    from sae.demo.command import run_stage
    from sae.errors import SaeError

    cache = Path(shutil.copytree(finished_demo / "cache", tmp_path / "cache"))
    shard = cache / "activations" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SaeError, match=r"`sae store verify` failed with exit code 1"):
        run_stage("store verify", cache)
    run_stage("store verify", finished_demo / "cache")  # a sound cache passes
