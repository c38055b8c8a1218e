"""examples/estimator.ipynb executed for real: nbclient on an ipykernel, the network and metric defined in cells."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("torch")

pytestmark = [pytest.mark.spark, pytest.mark.timeout(400)]

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "estimator.ipynb"


def test_the_estimator_notebook_fits_scores_and_reloads(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=360, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(
        output.get("text", "") for cell in nb.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )
    epochs = re.findall(r"epoch (\d+): train_loss=([\d.]+)", text)
    assert [int(e) for e, _ in epochs] == [0, 1, 2, 3], text
    assert float(epochs[-1][1]) < float(epochs[0][1]), text  # the loss went down
    found = re.search(r"test accuracy ([\d.]+), after save/load ([\d.]+)", text)
    assert found, text
    assert float(found.group(1)) >= 0.85
    assert found.group(1) == found.group(2)  # the reloaded pipeline predicts the same
    assert (tmp_path / "estimator-pipeline" / "metadata").is_dir()
