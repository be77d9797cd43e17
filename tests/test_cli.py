"""The CLI as a user meets it: a real subprocess, real exit codes, real stderr."""

import subprocess
import sys

import pytest

SUBCOMMANDS = ["harvest", "train", "eval", "plot", "export", "store", "demo"]


def run_sae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_subcommand():
    result = run_sae("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


def test_store_help_lists_info_and_verify():
    result = run_sae("store", "--help")
    assert result.returncode == 0
    assert "info" in result.stdout and "verify" in result.stdout


@pytest.mark.parametrize("bad", ["lots", "-5", "1.5"])
def test_bad_token_count_is_one_line_exit_2(bad):
    result = run_sae("harvest", f"--tokens={bad}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --tokens:")


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("sae")
    assert exe is not None, "the `sae` console script is not on PATH; run `pip install -e .`"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
