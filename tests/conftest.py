"""Test-wide setup: an 8-device CPU mesh, f32 matmuls, and the shared data folder."""

import os
import tempfile

# Must happen before jax is imported anywhere: sharding tests run on 8 fake CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny random-init HF Llama + tokenizer folder (tests/tiny.py), one per test module."""
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
