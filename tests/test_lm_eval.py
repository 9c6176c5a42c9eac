"""lm-evaluation-harness adapter (ftjax/lm_eval.py): the same scores as lm_eval's own HF adapter
on the same tiny random-init model, offline (requests built by hand, no task downloads)."""

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'ftjax[lm_eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

# f32 on both sides with jax's "highest" matmul precision (tests/conftest.py): the sums of a few
# log-probs agreed to ~1e-6 when measured; 1e-4 is the bound.
TOL = 1e-4

PAIRS = [("Spent 12 dollars on", " lunch"), ("The total was", " 40 dollars and some change"),
         ("", "groceries on Monday"), ("user: hello ", "assistant"),
         ("a much longer context that repeats: lunch, lunch, lunch, dinner and", " lunch")]
DOCS = ["Spent 12 dollars on lunch. " * 3, "groceries", "The total was 40 dollars. " * 40]  # several windows


def _requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def models(model_dir):
  from lm_eval.models.huggingface import HFLM
  from ftjax.lm_eval import FtjaxLM
  ours = FtjaxLM(pretrained=model_dir, batch_size=2, max_length=64)
  reference = HFLM(pretrained=model_dir, device="cpu", dtype="float32", batch_size=2, max_length=64)
  return ours, reference


def test_loglikelihood_matches_hf_adapter(models):
  ours, reference = models
  got = ours.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
  want = reference.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=TOL, rtol=0)
  assert [g[1] for g in got] == [w[1] for w in want]
  assert all(np.isfinite(g[0]) and g[0] < 0 for g in got)


def test_loglikelihood_rolling_matches_hf_adapter(models):
  ours, reference = models
  # the third document is longer than max_length=64: several rolling windows
  assert len(ours.tok_encode(DOCS[2])) > 64
  got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in DOCS]),
                                   disable_tqdm=True)
  want = reference.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in DOCS]),
                                         disable_tqdm=True)
  # lm_eval's HF adapter sums a window's log-probs in float32: a total of ~-5600 carries its
  # rounding (float32's spacing there is ~5e-4; measured difference 1.1e-4), so relative 1e-7
  # beside the 1e-4 bound of the short documents
  np.testing.assert_allclose(got, want, atol=TOL, rtol=1e-7)


def test_generate_until_cuts_at_until_strings(models):
  ours, _ = models
  prompts = ["Spent 12 dollars on", "The total was"]
  free = ours.generate_until(_requests("generate_until", [(p, {"until": [], "max_gen_toks": 12})
                                                          for p in prompts]))
  assert all(isinstance(t, str) and t for t in free)
  # cut each free text at a character it contains: the result must end just before it
  stops = [t[len(t) // 2] for t in free]
  cut = ours.generate_until(_requests("generate_until", [(p, {"until": [s], "max_gen_toks": 12})
                                                         for p, s in zip(prompts, stops)]))
  for text, full, stop in zip(cut, free, stops):
    assert text == full.split(stop)[0]
    assert stop not in text


def test_registered_under_the_name_ftjax():
  from lm_eval.api.registry import get_model
  from ftjax.lm_eval import FtjaxLM
  assert get_model("ftjax") is FtjaxLM
