"""examples/notebook.ipynb executed for real: nbclient on an ipykernel, functions defined in cells."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook.ipynb"


def test_notebook_runs_end_to_end(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(
        output.get("text", "") for cell in nb.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )
    fitted = re.search(r"fitted y = ([\d.]+) x \+ ([\d.]+)", text)
    assert fitted, text
    assert abs(float(fitted.group(1)) - 3.0) < 0.05 and abs(float(fitted.group(2)) - 0.5) < 0.05
    rmse = re.search(r"rmse ([\d.]+)", text)
    assert rmse and float(rmse.group(1)) < 0.2
