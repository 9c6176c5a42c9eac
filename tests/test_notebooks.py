"""The notebooks under notebooks/ run top to bottom, headless, with SMOKE = True.

Each notebook runs as papermill runs one: the parameters are injected in a new cell right after
the cell tagged `parameters`, and the notebook is executed by a Jupyter kernel (nbclient) that is
this interpreter (so the kernel sees the venv's ftjax, not some other installed kernel). Each
starts in a different working directory (the repository root, notebooks/, an unrelated folder),
because a notebook must find the repository's files from wherever Jupyter or Colab starts it.
Also: ftjax.notebook's helpers, and that the committed notebooks carry no outputs.
"""

import glob
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
KERNEL = "ftjax-test-python"


def notebook_paths():
  return sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))


def test_every_notebook_has_one_parameters_cell_with_smoke_and_no_outputs():
  import nbformat
  paths = notebook_paths()
  assert {os.path.basename(p) for p in paths} >= {
      "quickstart.ipynb", "bring_your_own_data.ipynb", "bring_your_own_flax_model.ipynb"}
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path}: {len(tagged)} cells tagged 'parameters'"
    assert tagged[0].cell_type == "code" and "SMOKE = False" in tagged[0].source, path
    for i, cell in enumerate(nb.cells):
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, \
            f"{path}: cell {i} was committed with outputs (clear them)"


def inject(nb, params: dict):
  """Papermill's convention: a cell tagged `injected-parameters` after the `parameters` cell."""
  import nbformat
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(index + 1, cell)
  return nb


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
  """A kernelspec for this interpreter (ipykernel's own spec writer), found through a spec
  manager that looks only there: a 'python3' kernel installed elsewhere is never picked."""
  from ipykernel.kernelspec import write_kernel_spec
  from jupyter_client import KernelManager
  from jupyter_client.kernelspec import KernelSpecManager
  kernels = tmp_path_factory.mktemp("kernels")
  write_kernel_spec(str(kernels / KERNEL))
  specs = KernelSpecManager(kernel_dirs=[str(kernels)])
  return lambda: KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def execute(path, cwd, params, kernel_manager_factory, timeout=300):
  import nbformat
  from nbclient import NotebookClient
  nb = inject(nbformat.read(path, as_version=4), params)
  client = NotebookClient(nb, km=kernel_manager_factory(), timeout=timeout,
                          resources={"metadata": {"path": str(cwd)}})
  client.execute()
  return nb


def outputs(nb, mime):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if mime in o.get("data", {})]


def stream_text(nb):
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.output_type == "stream")


@pytest.fixture
def kernel_env(monkeypatch):
  """The kernel inherits this environment: this checkout's ftjax first on the path (whatever
  else is installed, and whatever the working directory), and one CPU device (what a CPU
  machine has, and faster to compile than the suite's 8 fake ones)."""
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_quickstart_runs_from_the_repository_root(kernel_env, kernel_manager_factory, tmp_path):
  workdir = tmp_path / "run"
  nb = execute(os.path.join(NOTEBOOKS, "quickstart.ipynb"), REPO,
               {"SMOKE": True, "WORKDIR": str(workdir)}, kernel_manager_factory)
  # the loss curve, and the report's comparison, curves and forgetting PNGs, inline
  assert len(outputs(nb, "image/png")) >= 4
  assert outputs(nb, "text/markdown")  # the before / after table and the report
  for name in ("metrics.jsonl", "report.md", "comparison.png", "adapter/adapter_config.json",
               "adapter/adapter_model.safetensors", "merged/config.json"):
    assert (workdir / name).exists(), name
  with open(workdir / "summary.json") as f:
    assert json.load(f)["steps"] == 3
  assert "SMOKE: model.num_layers: 0 -> 2" in stream_text(nb)
