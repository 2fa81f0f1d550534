"""Both notebooks run end to end on the real sample in a small setting and draw their figures, and the committed
copies carry the figures of a full run (`jupyter execute --inplace notebooks/<name>.ipynb`) at a modest size.

Executed with nbclient on the `python3` kernel (`make setup` installs it) in the notebooks' folder, as Jupyter
starts them; parameters are injected by appending to the cell tagged "parameters"; the executed copies stay in
memory and never go back into the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
import rasterio
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from rasterio.windows import Window

from s2match.config import PROJECT_ROOT

NOTEBOOKS = PROJECT_ROOT / "notebooks"
KERNEL = "python3"
CELL_TIMEOUT_S = 180
RESULT_TAG = "TEST-RESULT "
# Committed notebooks keep their figures (JPEG where they show a run's pictures) but stay small enough to review.
MAX_NOTEBOOK_BYTES = 4_000_000
MIN_FIGURES = {"dataset_creation.ipynb": 7, "demo.ipynb": 4}


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(f"no Jupyter kernel {KERNEL!r}: run `python -m ipykernel install --sys-prefix --name {KERNEL}`")


def execute(name: str, parameters: str, epilogue: str = "") -> nbformat.NotebookNode:
    """Run notebooks/<name> with `parameters` appended to its parameters cell (and `epilogue` as a last cell)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters', found {len(tagged)}"
    tagged[0].source += "\n# injected by tests/test_notebooks.py\n" + parameters
    if epilogue:
        notebook.cells.append(nbformat.v4.new_code_cell(epilogue))
    # Started in the notebooks' folder, as Jupyter does: the notebook finds the project from there.
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first error
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def pictures(notebook: nbformat.NotebookNode) -> int:
    return sum(bool({"image/png", "image/jpeg"} & set(output.get("data", {}))) for output in outputs(notebook))


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in outputs(notebook) if output.output_type == "stream")


def test_notebooks_are_committed_with_the_figures_of_a_full_run() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        # executed top to bottom in one kernel, without an error
        assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), f"{path.name}: not run in order"
        assert not [o for o in outputs(notebook) if o.output_type == "error"], f"{path.name}: has an error"
        assert pictures(notebook) >= MIN_FIGURES[path.name], f"{path.name}: too few figures"
        assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name}: {path.stat().st_size} bytes"
        # the reader sees where the figures came from: the project in the clone, not scratch paths of a test
        assert "/tmp/pytest" not in path.read_text()


def test_dataset_notebook_recomputes_from_the_sample(tmp_path: Path) -> None:
    # No pipeline outputs where it looks: it runs the stages' functions on the sample (a fresh clone's case).
    parameters = f"SMALL = True\nOUTPUTS = {str(tmp_path / 'none')!r}\nSCRATCH = {str(tmp_path)!r}\nPAIRS_SHOWN = 2\n"
    notebook = execute("dataset_creation.ipynb", parameters)
    text = printed(notebook)
    assert "running the stages on data/sample" in text
    assert "pair table agrees with the splits: True" in text
    assert "location groups in training and evaluation: none" in text
    # timeline, histograms, bands, normalisation, tiling, pairs, split map
    assert pictures(notebook) >= 7


def test_dataset_notebook_reads_pipeline_outputs(tmp_path: Path) -> None:
    if not (PROJECT_ROOT / "outputs" / "pairs" / "pairs.csv").is_file():
        pytest.skip("no pipeline outputs (run `dvc repro pairs`)")
    notebook = execute("dataset_creation.ipynb", f"SCRATCH = {str(tmp_path)!r}\nPAIRS_SHOWN = 1\n")
    assert "reading the pipeline's outputs in outputs/" in printed(notebook)
    assert pictures(notebook) >= 7


def crop(source: Path, window: Window, path: Path) -> Path:
    """A georeferenced crop of a sample scene."""
    with rasterio.open(source) as src:
        profile = src.profile | {"width": int(window.width), "height": int(window.height),
                                 "transform": src.window_transform(window)}
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
            dst.descriptions = src.descriptions
    return path


def test_demo_notebook_on_two_crops(tmp_path: Path) -> None:
    # Snowy winter vs summer crops of one strip, the second shifted: the pixel transform is a known translation.
    strip = PROJECT_ROOT / "data" / "sample" / "ukraine" / "T35UNQ"
    size, shift = 320, (24, 16)
    image0 = crop(strip / "winter.tif", Window(0, 4400, size, size), tmp_path / "winter.tif")
    image1 = crop(strip / "summer.tif", Window(shift[0], 4400 + shift[1], size, size), tmp_path / "summer.tif")
    parameters = (f"PAIR = None\nIMAGE0 = {str(image0)!r}\nIMAGE1 = {str(image1)!r}\nMAX_KEYPOINTS = 256\n"
                  f"SIFT_KEYPOINTS = 512\nCOARSE_SIZE = 512\nMAX_TILES = 1\nSCRATCH = {str(tmp_path)!r}\n")
    epilogue = (f"print({RESULT_TAG!r} + json.dumps({{'H': learned['homography'], "
                "'weights': model['weights']}))")
    notebook = execute("demo.ipynb", parameters, epilogue)
    text = printed(notebook)
    result = json.loads(text.split(RESULT_TAG, 1)[1].splitlines()[0])
    assert f"weights: {result['weights']} = " in text  # the notebook says which matcher weights it used
    assert result["weights"] in ("trained", "pretrained")
    H = np.asarray(result["H"])
    centre = np.array([size / 2, size / 2, 1.0])
    mapped = H @ centre
    assert np.allclose(mapped[:2] / mapped[2], centre[:2] - shift, atol=2.0)
    assert "SIFT + ratio test" in str(outputs(notebook))  # the comparison table ran (SIFT may well fail here)
    assert "corner distance between the two homographies" in text
    # the run's matches, keypoints and overlay, and SIFT's matches (when SIFT found any)
    assert pictures(notebook) >= 4
    assert {"learned", "sift"} <= {path.name for path in tmp_path.iterdir()}  # scratch runs, never outputs/
