"""spark-submit --py-files <zip> on local-cluster, in a Python where spark-hydrogen is NOT installed."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def _python_without_the_package(tmp_path: Path) -> Path:
    """A python that sees pyspark's site-packages but not our editable install (.pth files are skipped)."""
    wrapper = tmp_path / "python-without-sparkhydrogen"
    site = sysconfig.get_paths()["purelib"]
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}" exec "{sys.executable}" -S "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_spark_submit_py_files_zip(tmp_path: Path) -> None:
    python = _python_without_the_package(tmp_path)
    probe = subprocess.run([str(python), "-c", "import pyspark, sparkhydrogen"], capture_output=True, text=True)
    assert "No module named 'sparkhydrogen'" in probe.stderr  # really not installed there

    zip_path = tmp_path / "sparkhydrogen.zip"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_zip.py"), "--output", str(zip_path)], check=True)
    submit = Path(sys.executable).parent / "spark-submit"
    env = dict(os.environ, PYSPARK_PYTHON=str(python), PYSPARK_DRIVER_PYTHON=str(python),
               SPARK_LOCAL_IP="127.0.0.1")
    result = subprocess.run(
        [str(submit), "--master", "local-cluster[2,1,1024]", "--conf", "spark.executor.memory=512m",
         "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.hydrogen.launch.slotWaitTimeout=60",
         "--py-files", str(zip_path), str(ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "2 ranks launched together on local-cluster[2,1,1024]" in out
    assert "rank 1: 500 rows, global mean 499.5" in out
    assert "GangFailedError: gang 'flaky' failed: rank 1 raised RuntimeError: rank 1 ran out of data" in out
    assert out.rstrip().endswith("done")
