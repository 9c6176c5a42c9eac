"""lm-evaluation-harness tasks at the end of a run (`eval.lm_eval_tasks`): the base model and
the fine-tuned one scored on the same tasks, for the report's forgetting section.

A task is a name lm_eval knows (e.g. `arc_easy`: its dataset comes from the Hugging Face Hub or
its cache), a task YAML file, or a folder of them. A local YAML over files on disk runs offline:

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc}]

The tasks are resolved (lm_eval installed, files parsed, names found) when the config is
validated, before training; the scores are taken after training (ftjax.lm_eval.FtjaxLM over the
in-memory models: nothing is reloaded from disk).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging
import os

from ftjax import peft
from ftjax.errors import FtjaxError

log = logging.getLogger(__name__)

KEY = "eval.lm_eval_tasks"


def task_entries(spec: str) -> tuple[str, ...]:
  """"arc_easy, tasks/my_task.yaml" -> ("arc_easy", "tasks/my_task.yaml")."""
  return tuple(t.strip() for t in spec.split(",") if t.strip())


def _is_local(entry: str) -> bool:
  return entry.endswith((".yaml", ".yml")) or os.sep in entry or os.path.isdir(entry)


def validate(eval_cfg) -> None:
  """Config-time checks: the tasks' package is installed, their files exist and parse, and
  their names are known (a run must not train for hours and then fail on a task name)."""
  if not task_entries(eval_cfg.lm_eval_tasks):
    return
  limit = eval_cfg.lm_eval_limit
  if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
    raise FtjaxError(f"config: eval.lm_eval_limit={limit!r}; expected an integer >= 0 "
                     "(examples per task; 0: all)")
  if importlib.util.find_spec("lm_eval") is None:
    raise FtjaxError(f"config: {KEY}={eval_cfg.lm_eval_tasks!r} needs lm-evaluation-harness, "
                     "which is not installed: pip install 'ftjax[lm_eval]' (or set it to \"\")")
  resolve(eval_cfg.lm_eval_tasks)


@functools.lru_cache(maxsize=8)  # validate() runs several times per run: resolve once
def resolve(spec: str):
  """(TaskManager, [task name | task config dict]) for lm_eval.simple_evaluate."""
  from lm_eval.tasks import TaskManager
  from lm_eval.tasks._yaml_loader import load_yaml  # what lm_eval's own CLI loads --tasks files with
  entries = task_entries(spec)
  names = [e for e in entries if not _is_local(e)]
  tasks, folders = [], []
  for entry in (e for e in entries if _is_local(e)):
    files = sorted(glob.glob(os.path.join(entry, "*.yaml"))) if os.path.isdir(entry) else [entry]
    if not files or not all(os.path.isfile(f) for f in files):
      raise FtjaxError(f"config: {KEY}: {entry}: no such task file (expected a task YAML file "
                       "or a folder of them)")
    for path in files:
      try:
        config = load_yaml(path, resolve_func=True)
      except Exception as e:  # a YAML or !function error: name the file
        raise FtjaxError(f"config: {KEY}: {path}: not a readable lm_eval task YAML "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
      if not isinstance(config, dict) or not (config.get("task") or config.get("group")):
        raise FtjaxError(f"config: {KEY}: {path}: no 'task:' (or 'group:') key; not an lm_eval "
                         "task YAML")
      tasks.append(config)
    folders.append(os.path.dirname(os.path.abspath(files[0])))
  # lm_eval's built-in index (hundreds of YAML files, ~10 s) only when a task is named
  manager = TaskManager(include_path=folders or None, include_defaults=bool(names))
  for name in names:
    matched = manager.match_tasks([name])
    if not matched:
      raise FtjaxError(f"config: {KEY}: unknown lm_eval task {name!r} (`lm-eval ls tasks` lists "
                       "them; a local task is given as the path of its YAML file)")
    tasks.extend(m for m in matched if m not in tasks)
  return manager, tasks


def score(model, tokenizer, eval_cfg, max_length: int | None = None) -> dict:
  """{task: {metric: value}} of one in-memory model on the eval.lm_eval_tasks."""
  from lm_eval import evaluator
  # lm-evaluation-harness is optional and heavy (ftjax.lm_eval imports it): only when scoring
  from ftjax.lm_eval import FtjaxLM
  manager, tasks = resolve(eval_cfg.lm_eval_tasks)
  # eval.batch_size 0 means "as few batches as memory allows" for ftjax's own decoding
  # (ftjax.generate); the harness adapter takes a fixed size, so 0 is its default of 8 here.
  lm = FtjaxLM.from_model(model, tokenizer, batch_size=eval_cfg.batch_size or 8,
                          max_length=max_length)
  out = evaluator.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                  limit=eval_cfg.lm_eval_limit or None, log_samples=False,
                                  bootstrap_iters=eval_cfg.bootstrap)
  return {task: {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
          for task, metrics in out["results"].items()}


def base_vs_tuned(run, tuned) -> dict | None:
  """The run's end hook: {"tasks", "limit", "base", "fine-tuned"} scores (None: the key is
  unset). The base is the run's initial model with its adapters disabled, as the prompting
  baselines score it. A task that fails here (after training) is logged and recorded as
  {"error"}: the checkpoint, exports and the rest of the report are not lost to it."""
  cfg = run.config
  if not task_entries(cfg.eval.lm_eval_tasks):
    return None
  out = {"tasks": list(task_entries(cfg.eval.lm_eval_tasks)), "limit": cfg.eval.lm_eval_limit}
  try:  # the model's whole context, as lm_eval's HF adapter: scores comparable to published ones
    out["fine-tuned"] = score(tuned, run.tokenizer, cfg.eval)
    with peft.disable_adapters(run.model()) as base:
      out["base"] = score(base, run.tokenizer, cfg.eval)
  except Exception as e:  # noqa: BLE001 -- see the docstring
    log.error("%s: the lm-evaluation-harness tasks failed after training: %s", KEY, e)
    out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
  return out


def table(result: dict) -> list[tuple]:
  """Rows (task, metric, base, fine-tuned, base stderr, fine-tuned stderr) of a result; a value
  lm_eval did not report is None. The metric is named without lm_eval's default filter suffix
  ("acc,none" -> "acc")."""
  rows = []
  base, tuned = result.get("base") or {}, result.get("fine-tuned") or {}
  for task in tuned:
    for key, value in tuned[task].items():
      if "_stderr" in key:
        continue
      metric, _, filt = key.partition(",")
      err = f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr"
      label = metric if filt in ("", "none") else f"{metric} ({filt})"
      rows.append((task, label, base.get(task, {}).get(key), value,
                   base.get(task, {}).get(err), tuned[task].get(err)))
  return rows
