"""Test-wide setup: an 8-device CPU mesh, f32 matmuls, and the shared data folder."""

import os
import tempfile

# The tests' programs are tiny and run a few times each, but the suite compiles ~3,000 of them,
# and LLVM's optimisation passes were most of each compile: at level 0 they are skipped. Measured
# on test_quant + test_generate + test_step (2 cores): 303 -> 228 CPU s, every result within its
# test's tolerance (bitsandbytes' bytes still equal). Subprocess tests pass it on to their runs.
FAST_COMPILE = "--xla_backend_optimization_level=0"
# Must happen before jax is imported anywhere: sharding tests run on 8 fake CPU devices.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Token caches of test runs go to a throwaway folder, not the user's ~/.cache/ftjax/tokens.
os.environ.setdefault("FTJAX_TOKEN_CACHE", tempfile.mkdtemp(prefix="ftjax-token-cache-"))
# No baseline cache across tests (each computes its own); the cache's tests set their own folder.
os.environ.setdefault("FTJAX_BASELINE_CACHE", "off")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


# The modules that take longest, longest first (from CI's --durations on the 2-core machine).
# CI runs `-n 2` with `--dist loadfile` (setup.cfg): a module's tests stay on one worker, so its
# module fixtures (a trained run, a loaded model, the notebook kernels) are built once, and the
# long modules start first so the two workers end together instead of one running a long
# module alone at the end.
# Whole modules go to a worker (--dist loadfile), so the long ones must start first or one
# worker runs the tail alone (a clean-clone CI with the newest modules unranked, so last: 1085 s,
# its last 6% of tests taking 4.5 min).
SLOWEST_FIRST = ["test_notebooks", "test_train", "test_multihost", "test_preference",
                 "test_classification", "test_faults", "test_models", "test_grpo", "test_moe",
                 "test_bench", "test_lm_eval", "test_evaluate", "test_gguf_export", "test_peft",
                 "test_generate", "test_step", "test_quant", "test_gguf", "test_cost", "test_hooks",
                 "test_run_build", "test_objectives"]


@pytest.hookimpl(tryfirst=True)  # before plugins that reorder on purpose (--ff, pytest-randomly)
def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(getattr(getattr(item, "module", None), "__name__", ""), len(rank)))


# Every compile goes to the persistent cache (jax's default keeps only those over 1 s): most of
# a tiny run's ~40 compiles (LoRA init, the step, eval) take well under 1 s, and the suite
# repeats them in process after process. Measured: one `python -m ftjax.train` run of the tiny
# model took 16.8 CPU s with a cold cache and 8.5 s with a warm one (41 entries, 0.4 MB).
CACHE_MIN_COMPILE_S = 0
# The two xdist workers and their subprocesses share one folder: a program one worker compiled
# (the tiny model's step, its eval, the eager ops) loads in the other. No size limit: with one,
# jax locks the folder and lists and stats every entry on every write to find what to evict
# (O(entries) per write, ~3,000 entries by the end of the suite). Without the lock a read that
# races a write of the same entry gets a truncated file, which jax reports as a warning and
# compiles instead: a lost hit, never a wrong result.


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
  """XLA's persistent compilation cache for the session, in-process and in every subprocess
  (the CLI runs, the multi-host processes, the notebook kernels inherit the environment): a
  computation compiled once (the same HLO, devices and options) is loaded, not compiled again.
  Under xdist the workers' temp folders share a parent, and the cache lives there."""
  from jax.experimental.compilation_cache import compilation_cache
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # basetemp/popen-gwN -> basetemp: the same folder for every worker
  path = str(root / "xla_cache")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
  compilation_cache.reset_cache()  # in case it was set up, without a folder, by an earlier compile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(CACHE_MIN_COMPILE_S)
  yield path


@pytest.fixture
def shared_data():
  if not os.path.isdir(SHARED_DATA):
    pytest.skip(f"shared data folder {SHARED_DATA} is absent (only present beside a dev checkout)")
  return SHARED_DATA


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
  """A tiny random-init HF Llama (untied head) saved once for the session."""
  import hf_models
  path = str(tmp_path_factory.mktemp("hf_llama"))
  hf_models.build("llama").save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
  """A tiny random-init HF Llama + tokenizer folder (tests/tiny.py), built once per session
  (2.4 CPU s each; it was built per module): read it, never write into it (copy it first)."""
  from tiny import make_model_dir
  return make_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def token_cache(tmp_path, monkeypatch):
  """A token cache folder of the test's own (FTJAX_TOKEN_CACHE), the in-process memo cleared."""
  from ftjax.data import cache
  monkeypatch.setenv("FTJAX_TOKEN_CACHE", str(tmp_path / "tokens"))
  cache._last.clear()
  yield tmp_path / "tokens"
  cache._last.clear()
