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
import re

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
  km = kernel_manager_factory()
  client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(cwd)}})
  try:
    client.execute()
  finally:
    # nbclient shuts down only the kernels it created: one handed in (km=) kept running after
    # its notebook, holding ~1 GB and a jax runtime each until the test session ended
    if km.has_kernel:
      km.shutdown_kernel(now=True)
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
  machine has, and faster to compile than the suite's 8 fake ones). Not conftest's fast
  compile: the quickstart runs the real SmolLM2's layers, where unoptimised code cost more
  (48.8 -> 70.9 CPU s) than the compiles saved."""
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_quickstart_runs_from_the_repository_root(kernel_env, kernel_manager_factory, tmp_path):
  workdir = tmp_path / "run"
  nb = execute(os.path.join(NOTEBOOKS, "quickstart.ipynb"), REPO,
               {"SMOKE": True, "WORKDIR": str(workdir)}, kernel_manager_factory)
  # the loss curve, and the report's comparison and curves PNGs (SMOKE: no forgetting probe)
  assert len(outputs(nb, "image/png")) >= 3
  assert outputs(nb, "text/markdown")  # the before / after table and the report
  for name in ("metrics.jsonl", "report.md", "comparison.png", "adapter/adapter_config.json",
               "adapter/adapter_model.safetensors", "merged/config.json"):
    assert (workdir / name).exists(), name
  with open(workdir / "summary.json") as f:
    assert json.load(f)["steps"] == 3
  assert "SMOKE: model.num_layers: 0 -> 2" in stream_text(nb)


def test_bring_your_own_data_runs_from_the_notebooks_folder(kernel_env, kernel_manager_factory,
                                                             tmp_path, model_dir):
  """A model the user names (a HF folder: tests/tiny.py's random Llama), the demo data as CSV,
  and QLoRA: the options the quickstart does not take."""
  workdir = tmp_path / "byod"
  nb = execute(os.path.join(NOTEBOOKS, "bring_your_own_data.ipynb"), NOTEBOOKS,
               {"SMOKE": True, "MODEL": model_dir, "METHOD": "qlora", "FORM": "csv",
                "WORKDIR": str(workdir)}, kernel_manager_factory)
  text = stream_text(nb)
  # the planted problems: the whitespace answer, the duplicate, the leaked eval example
  assert "[empty_output]" in text and "1 exact duplicates" in text
  # the planted leak is the one exact pair; the templated demo texts also give near pairs
  # (one slot changed: "send 50 euros to Anna today" / "... yesterday"), whose count moves with
  # the similarity measure, so only their consistency is pinned
  leak = re.search(r"leakage: (\d+) train/eval pairs \(1 exact, (\d+) near\); (\d+) train examples dropped", text)
  assert leak, text
  pairs, near, dropped = map(int, leak.groups())
  assert pairs == 1 + near and 1 <= dropped <= pairs
  assert "peak memory" in text and "fits in" in text  # the probed cost plan
  for method in ("lora", "qlora", "prefix", "prompt", "adapter"):
    assert f"\n{method}: " in text
  assert len(outputs(nb, "image/png")) >= 3  # loss curve, curves.png, comparison.png
  run = workdir / "run-qlora"
  for name in ("demo_data/train.csv", "demo_data/hf/dataset_dict.json", "report.md",
               "adapter/adapter_config.json", "merged/config.json"):
    assert (workdir / name).exists() or (run / name).exists(), name
  with open(run / "config.json") as f:
    saved = json.load(f)
  assert saved["method"] == "qlora" and saved["data"]["train"].endswith("train.csv")


def test_bring_your_own_flax_model_runs_from_another_folder(kernel_env, kernel_manager_factory,
                                                            tmp_path):
  """Not a language model: the notebook asserts itself that the base is unchanged and the
  reloaded adapter gives the trained outputs; here, that it ran and saved them."""
  workdir = tmp_path / "flax"
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  nb = execute(os.path.join(NOTEBOOKS, "bring_your_own_flax_model.ipynb"), cwd,
               {"SMOKE": True, "WORKDIR": str(workdir)}, kernel_manager_factory)
  text = stream_text(nb)
  assert "outputs unchanged at init" in text and "base arrays unchanged" in text
  assert "reloaded adapter: outputs match" in text
  assert outputs(nb, "image/png")
  assert (workdir / "adapter-lora" / "adapter_model.safetensors").exists()
  assert (workdir / "base.msgpack").exists()


# --- ftjax.notebook's helpers ----------------------------------------------------------------

def test_configs_are_found_from_any_working_directory(tmp_path, monkeypatch):
  from ftjax import notebook
  from ftjax.config import validate
  monkeypatch.chdir(tmp_path)
  assert notebook.repo_root() == REPO  # beside the imported package
  config = notebook.load_config("quickstart")
  assert config.data.generate == "quickstart" and config.train.steps == 20
  validate(config)
  # without a checkout beside the package (a wheel install): walk up from the directory
  monkeypatch.setattr(notebook, "PACKAGE_DIR", str(tmp_path / "site-packages" / "ftjax"))
  assert notebook.repo_root(os.path.join(REPO, "notebooks")) == REPO
  assert notebook.repo_root(str(tmp_path)) is None
  with pytest.raises(notebook.FtjaxError, match="no ftjax checkout found"):
    notebook.config_path("quickstart")


def test_unknown_config_names_the_known_ones():
  from ftjax import notebook
  with pytest.raises(notebook.FtjaxError, match="no such config; known: .*quickstart"):
    notebook.load_config("quikstart")


def test_fit_to_backend_meshes_every_chip_and_picks_dtype_and_batch():
  from ftjax import notebook
  from ftjax.config import base_config
  tpu = notebook.Backend("tpu", "TPU v5 lite", devices=8, local_devices=4, processes=2)
  config = base_config()
  choices = notebook.fit_to_backend(config, tpu)
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (-1, 1, 1)
  assert config.model.dtype == "bfloat16" and config.model.trainable_dtype == "float32"
  assert config.train.batch_size == 64 and any("8 devices" in c for c in choices)
  cpu = notebook.Backend("cpu", "cpu", devices=3, local_devices=3, processes=1)
  config = base_config()
  notebook.fit_to_backend(config, cpu)
  assert config.model.dtype == "float32" and config.train.batch_size == 9  # 8, whole rows per device


def test_smoke_and_methods_give_valid_configs():
  from ftjax import notebook
  from ftjax.config import base_config, validate
  config = notebook.load_config("quickstart")
  changes = notebook.smoke(config)
  assert "model.num_layers: 0 -> 2" in changes and "eval.few_shot: 3 -> 1" in changes
  assert config.train.steps == 3 and not config.eval.forgetting
  validate(config)
  for method in notebook.METHOD_SETTINGS:
    config = base_config()
    config.data.train = "train.jsonl"
    changes = notebook.use_method(config, method)
    assert config.train.lr == "auto" and "train.lr: 0.0002 -> 'auto'" in changes
    validate(config)
  with pytest.raises(notebook.FtjaxError, match="METHOD='ia4'"):
    notebook.use_method(base_config(), "ia4")


def test_plot_loss_generations_and_report_from_a_workdir(tmp_path, capsys):
  from ftjax import notebook
  with pytest.raises(notebook.FtjaxError, match="metrics.jsonl: no train/loss"):
    notebook.plot_loss(str(tmp_path))
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step, loss in ((1, 2.0), (2, 1.5), (3, 1.0)):
      f.write(json.dumps({"step": step, "train/loss": loss}) + "\n")
    f.write(json.dumps({"step": 3, "eval/loss": 1.2}) + "\n")
  fig = notebook.plot_loss(str(tmp_path))
  lines = fig.axes[0].get_lines()
  assert [list(l.get_ydata()) for l in lines] == [[2.0, 1.5, 1.0], [1.2]]

  results = {"inputs": ["a | b", "c"], "references": ["x", "y"],
             "baselines": {"zero-shot": {"predictions": ["p", "q"]}},
             "finetuned": {"predictions": ["x", "y"]}}
  with open(tmp_path / "eval_results.json", "w") as f:
    json.dump(results, f)
  table = notebook.generations(str(tmp_path), n=5, show=False)
  assert table.splitlines()[0] == "| input | reference | zero-shot | fine-tuned |"
  assert table.splitlines()[2] == "| a \\| b | x | p | x |" and len(table.splitlines()) == 4

  fig.savefig(tmp_path / "curves.png")
  with open(tmp_path / "report.md", "w") as f:
    f.write("# Report\n\ntext\n\n![curves](curves.png)\n\n## After\n\n![gone](missing.png)\nend\n")
  capsys.readouterr()
  assert notebook.show_report(str(tmp_path)) == [str(tmp_path / "curves.png")]
  printed = capsys.readouterr().out  # no kernel here: Markdown printed, images named
  assert printed.index("# Report") < printed.index("[image: ") < printed.index("## After")
  assert "missing.png" not in printed and "end" in printed
