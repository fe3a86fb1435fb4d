"""The tooling around the suite: `make test` fails loudly when pytest collects nothing, and every
measured number the README's performance table quotes is one that bench/RESULTS.md records."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def performance_rows() -> dict[str, str]:
    """README *Performance* table: what -> the measured column."""
    section = (ROOT / "README.md").read_text().split("\n## Performance")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[1] != "target" and not set(cells[0]) <= set("-"):
            rows[cells[0]] = cells[2]
    return rows


def test_every_measured_number_in_the_readme_is_recorded_in_bench_results():
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    rows = performance_rows()
    assert len(rows) >= 7 and any("soak" in what for what in rows), rows
    for what, measured in rows.items():
        for number in re.findall(r"\d[\d,]*\.\d+", measured):  # the specific ones: with decimals
            assert number in results, f"README {what!r} quotes {number}, which bench/RESULTS.md does not record"


def test_the_soak_figures_quoted_are_the_soak_table_rows():
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    soak = results.split("## 6. Soak")[1].split("\n## ")[0]
    table = {int(r): float(m) for r, m in re.findall(r"^\s*(\d+)\s+([\d.]+)\s+[\d.]+\s*$", soak, re.M)}
    assert len(table) >= 10 and max(table) == 500
    claims = re.findall(r"([\d.]+) MiB at round (\d+)", performance_rows()[next(w for w in performance_rows()
                                                                                 if "soak" in w)])
    assert claims
    for mib, rnd in claims:
        assert table[int(rnd)] == float(mib), f"README: {mib} MiB at round {rnd}; RESULTS.md: {table[int(rnd)]}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_fails_and_says_so_when_pytest_collects_nothing(tmp_path):
    # the Makefile's own test target with VENV pointing at a stand-in for .venv whose python is
    # this interpreter (so it needs no .venv, whoever runs the suite); -o: never install from here
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    env = {**os.environ, "PYTEST_ARGS": ""}
    done = subprocess.run(["make", "-s", f"VENV={venv}", "-o", f"{venv}/.installed", "test",
                           "PYTEST_ARGS=tests/test_partition.py -k no_such_test_anywhere -p no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "error: pytest collected no tests (exit 5)" in done.stderr, done.stderr
    script = (ROOT / ".ci" / "run").read_text()
    assert "make test" in script and "set -e" in script  # CI runs exactly that target and stops on failure
