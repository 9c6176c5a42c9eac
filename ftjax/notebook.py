"""Helpers the notebooks under notebooks/ share, kept here so the notebooks stay short and these
are tested (tests/test_notebooks.py).

  repo_root()               the ftjax checkout: beside the imported package (an editable install
                            or a kernel started inside the checkout), else found by walking up
                            from the working directory; None when there is none (a wheel install)
  load_config(name)         configs/<name>.py of that checkout, by path: works whatever the
                            kernel's working directory is (Jupyter's, the notebook's folder, Colab)
  default_workdir(name)     <checkout or cwd>/workdirs/notebook-<name>[-smoke]
  backend()                 what JAX runs on here: platform, chips, processes
  fit_to_backend(config)    mesh over every chip, bfloat16 compute on TPU / GPU, batch per chip
  load_model(config)        (model, tokenizer) as the run loads them, for a look before training
  smoke(config)             shrink a run to well under a minute on a CPU (the SMOKE parameter)
  use_method(config, m)     lora / qlora / prefix / prompt / adapter, as METHOD_SETTINGS says
  config_changes(a, b)      the keys two configs differ in ("what METHOD changes")
  plot_loss(workdir)        train / eval loss from WORKDIR/metrics.jsonl, shown inline
  generations(workdir)      before / after answers from WORKDIR/eval_results.json, as Markdown
  show_report(workdir)      report.md rendered, with its PNGs in place

Everything shown is displayed through IPython when it is present (a notebook kernel) and printed
otherwise, so the same calls work in a script.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import re
import sys

from ftjax.config import flat
from ftjax.errors import FtjaxError
from ftjax.evaluation.curves import read_curves
from ftjax.run import load_model as run_load_model

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
PER_DEVICE_BATCH = 8  # sequences per chip on an accelerator (the quickstart's 8 x 256 tokens)


# --- where things are ----------------------------------------------------------------------------

def _is_checkout(folder: str) -> bool:
  return (os.path.isfile(os.path.join(folder, "configs", "quickstart.py"))
          and os.path.isdir(os.path.join(folder, "ftjax")))


def repo_root(start: str | None = None) -> str | None:
  """The ftjax checkout: the folder above the imported package when it holds configs/ (an
  editable install, or a kernel started inside the checkout), else the first folder at or above
  `start` (default: the working directory) that does; None when neither (a wheel install)."""
  beside = os.path.dirname(PACKAGE_DIR)
  if _is_checkout(beside):
    return beside
  folder = os.path.abspath(start or os.getcwd())
  while True:
    if _is_checkout(folder):
      return folder
    parent = os.path.dirname(folder)
    if parent == folder:
      return None
    folder = parent


def config_path(name: str) -> str:
  """configs/<name>.py of the checkout; FtjaxError saying how to get one when there is none."""
  root = repo_root()
  if root is None:
    raise FtjaxError(
        f"configs/{name}.py: no ftjax checkout found beside the installed package or above "
        f"{os.getcwd()}; the configs live in the repository. Clone it and `pip install -e` it "
        "(or start the kernel inside it)")
  path = os.path.join(root, "configs", f"{name}.py")
  if not os.path.isfile(path):
    known = sorted(f[:-3] for f in os.listdir(os.path.join(root, "configs")) if f.endswith(".py"))
    raise FtjaxError(f"{path}: no such config; known: {', '.join(known)}")
  return path


def load_config(name: str, arg: str = ""):
  """get_config(arg) of configs/<name>.py, imported by path (the working directory may be
  anything, and configs/ is not a package on sys.path)."""
  path = config_path(name)
  spec = importlib.util.spec_from_file_location(f"ftjax_notebook_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def default_workdir(name: str, smoke: bool = False) -> str:
  """<checkout or cwd>/workdirs/notebook-<name>, with -smoke for a SMOKE run (so a real run
  never resumes a smoke run's checkpoint, or the other way round)."""
  base = repo_root() or os.getcwd()
  return os.path.join(base, "workdirs", f"notebook-{name}" + ("-smoke" if smoke else ""))


def in_colab() -> bool:
  return "google.colab" in sys.modules


# --- the backend ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Backend:
  platform: str  # cpu | gpu | tpu
  device_kind: str  # e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3", "cpu"
  devices: int  # over every process (a TPU slice's chips)
  local_devices: int
  processes: int

  def describe(self) -> str:
    where = f"{self.devices} x {self.device_kind} ({self.platform})"
    if self.processes > 1:
      where += f" over {self.processes} hosts"
    return where


def backend() -> Backend:
  import jax
  device = jax.devices()[0]
  return Backend(platform=device.platform, device_kind=device.device_kind,
                 devices=jax.device_count(), local_devices=jax.local_device_count(),
                 processes=jax.process_count())


def fit_to_backend(config, where: Backend | None = None,
                   per_device_batch: int = PER_DEVICE_BATCH) -> list[str]:
  """Sets the mesh, dtypes and batch size of `config` for this machine; returns the choices,
  each with its reason. Every chip joins one data-parallel mesh (a TPU slice: all its chips);
  TPU and GPU compute in bfloat16 (their matmul units' native type; trained params and optimizer
  state stay float32, model.trainable_dtype); on CPU the config's batch stays, rounded up to a
  multiple of the devices so each gets whole rows."""
  where = where or backend()
  choices = []

  def choose(key, value, why):
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
    choices.append(f"{key}={value!r}: {why}")

  choose("mesh.data", -1, f"data parallel over all {where.devices} devices")
  choose("mesh.fsdp", 1, "a model this size fits on each chip whole")
  choose("mesh.tensor", 1, "no tensor parallelism needed")
  accelerator = where.platform in ("tpu", "gpu")
  choose("model.dtype", "bfloat16" if accelerator else "float32",
         "bfloat16 matmuls on TPU / GPU (trained params stay float32)" if accelerator
         else "CPUs compute float32 faster than bfloat16")
  batch = config.train.batch_size
  if accelerator:
    choose("train.batch_size", per_device_batch * where.devices,
           f"{per_device_batch} sequences per device x {where.devices} devices")
  elif isinstance(batch, int) and batch % where.devices:
    choose("train.batch_size", -(-batch // where.devices) * where.devices,
           f"{batch} rounded up to a multiple of the {where.devices} devices")
  return choices


def load_model(config, name_or_path: str | None = None):
  """(model, tokenizer) as a run of `config` loads them: model.name_or_path (or `name_or_path`,
  e.g. an exported folder) stored in model.param_dtype, computing in model.dtype, cut to
  model.num_layers when set; on the default device (a notebook's look, not the sharded run)."""
  return run_load_model(config, name_or_path=name_or_path)


# --- SMOKE: the same notebook, shrunk ------------------------------------------------------------

SMOKE_SETTINGS = {
    "model.num_layers": 2,  # the first 2 of the model's layers: a real model's shapes, less compute
    "data.seq_len": 128,
    "train.epochs": 0,  # train.steps decides
    "train.steps": 3,
    "train.warmup_steps": 0,
    "train.log_every": 1,
    "train.eval_every": 0,
    "eval.max_examples": 4,
    "eval.max_new_tokens": 8,
    "eval.periodic_examples": 4,
    "eval.forgetting": False,
    "eval.bootstrap": 100,
    "cost.probe_steps": 1,
}


def smoke(config, **overrides) -> list[str]:
  """Shrinks `config` so a run takes seconds on a CPU and still goes through every phase (data
  check, baselines, training, evaluation, report, exports; not the forgetting probe, whose
  general prompts cost more than the rest of the evaluation); returns the changes. The answers
  of a 2-layer model are nonsense: a smoke run checks the plumbing, not the quality."""
  settings = dict(SMOKE_SETTINGS, **overrides)
  if config.eval.few_shot > 1:
    settings.setdefault("eval.few_shot", 1)
  changes = []
  for key, value in settings.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if node[leaf] != value:
      changes.append(f"{key}: {node[leaf]!r} -> {value!r}")
      node[leaf] = value
  return changes


# What each PEFT method sets in a config (bring_your_own_data.ipynb's METHOD); train.lr "auto"
# takes the method's usual learning rate (ftjax/data/auto.py). Prompt / prefix tuning and
# bottleneck adapters have no merged form, so only the adapter is exported for them.
METHOD_SETTINGS = {
    "lora": {"method": "lora", "lora.rank": 8, "lora.alpha": 16.0, "lora.targets": "all-linear",
             "export.merged": True},
    "qlora": {"method": "qlora", "lora.rank": 8, "lora.alpha": 16.0, "lora.targets": "all-linear",
              "export.merged": True},
    "prefix": {"method": "prefix", "prefix.num_virtual_tokens": 10, "export.merged": False},
    "prompt": {"method": "prompt", "prompt.num_virtual_tokens": 10, "export.merged": False},
    "adapter": {"method": "adapter", "adapter.reduction_factor": 16, "export.merged": False},
}


def use_method(config, method: str) -> list[str]:
  """Sets `config` up for one PEFT method (METHOD_SETTINGS) with train.lr="auto"; returns the
  keys it changed, as config_changes writes them."""
  if method not in METHOD_SETTINGS:
    raise FtjaxError(f"METHOD={method!r}; expected one of {', '.join(METHOD_SETTINGS)}")
  before = config.copy_and_resolve_references()
  _set(config, dict(METHOD_SETTINGS[method], **{"train.lr": "auto"}))
  return config_changes(before, config)


def _set(config, settings: dict) -> None:
  for key, value in settings.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value


def config_changes(before, after) -> list[str]:
  """"key: old -> new" for every key whose value differs between two configs."""
  a, b = flat(before.to_dict()), flat(after.to_dict())
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# --- showing results -----------------------------------------------------------------------------

def _display(obj, text: str) -> None:
  """IPython's display when a kernel is running, else print `text`."""
  shell = _ipython()
  if shell is None:
    print(text)
    return
  from IPython.display import display
  display(obj)


def _ipython():
  ipython = sys.modules.get("IPython")
  return ipython.get_ipython() if ipython is not None else None


def show_markdown(text: str) -> None:
  if _ipython() is None:
    print(text)
    return
  from IPython.display import Markdown
  _display(Markdown(text), text)


def show_png(path: str) -> None:
  if _ipython() is None:
    print(f"[image: {path}]")
    return
  from IPython.display import Image
  _display(Image(filename=path), path)


def show_figure(fig) -> None:
  """A matplotlib Figure as an inline PNG (no pyplot state, so it is never shown twice)."""
  if _ipython() is None:
    return
  from IPython.display import Image
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  _display(Image(data=buf.getvalue(), format="png"), "")


def plot_loss(workdir: str, show: bool = True):
  """Train loss per logged step and eval loss per eval, from WORKDIR/metrics.jsonl (the file
  the run writes as it goes); returns the matplotlib Figure."""
  from matplotlib.figure import Figure
  curves = read_curves(workdir)
  if not curves.get("train/loss"):
    raise FtjaxError(f"{os.path.join(workdir, 'metrics.jsonl')}: no train/loss lines (has the run "
                     "trained a step?)")
  fig = Figure(figsize=(6, 3.5))
  ax = fig.add_subplot()
  for key, style, label in (("train/loss", "o-", "train loss"), ("eval/loss", "s--", "eval loss")):
    if curves.get(key):
      steps, values = zip(*curves[key])
      ax.plot(steps, values, style, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (answer tokens)")
  ax.set_title(os.path.basename(os.path.normpath(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  if show:
    show_figure(fig)
  return fig


def _cell(text: str, limit: int = 120) -> str:
  text = " ".join(str(text).split()).replace("|", "\\|")
  return text if len(text) <= limit else text[: limit - 1] + "…"


def generations(workdir: str, n: int = 5, show: bool = True) -> str:
  """The first `n` eval examples: input, reference, each prompting baseline's answer and the
  fine-tuned model's, from WORKDIR/eval_results.json, as a Markdown table."""
  path = os.path.join(workdir, "eval_results.json")
  if not os.path.isfile(path):
    raise FtjaxError(f"{path}: missing; it is written at the end of a run with eval.generate=True")
  with open(path) as f:
    results = json.load(f)
  systems = {name: r["predictions"] for name, r in (results.get("baselines") or {}).items()}
  if results.get("finetuned"):
    systems["fine-tuned"] = results["finetuned"]["predictions"]
  header = ["input", "reference"] + [f"{name}" for name in systems]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i in range(min(n, len(results["inputs"]))):
    cells = [results["inputs"][i], results["references"][i]] + [p[i] for p in systems.values()]
    rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  text = "\n".join(rows)
  if show:
    show_markdown(text)
  return text


_IMAGE = re.compile(r"^!\[[^\]]*\]\(([^)\s]+\.png)\)\s*$", re.M)


def show_report(workdir: str) -> list[str]:
  """WORKDIR/report.md rendered as Markdown with its PNGs shown where the report places them
  (Markdown image links are relative to the notebook, not the workdir, so each PNG is shown as
  an image output instead). Returns the PNG paths shown."""
  path = os.path.join(workdir, "report.md")
  if not os.path.isfile(path):
    raise FtjaxError(f"{path}: missing; the run writes it at its end (eval.report=True), or "
                     f"run `python -m ftjax.evaluate --workdir {workdir}`")
  with open(path) as f:
    text = f.read()
  shown, start = [], 0
  for match in _IMAGE.finditer(text):
    if text[start:match.start()].strip():
      show_markdown(text[start:match.start()])
    png = os.path.join(workdir, match.group(1))
    if os.path.isfile(png):
      show_png(png)
      shown.append(png)
    start = match.end()
  if text[start:].strip():
    show_markdown(text[start:])
  return shown
