"""lm-evaluation-harness adapter (ftjax/lm_eval.py): the same scores as lm_eval's own HF adapter
on the same tiny random-init model, offline (requests built by hand, no task downloads)."""

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'ftjax[lm_eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

# f32 on both sides with jax's "highest" matmul precision (tests/conftest.py): the sums of a few
# log-probs (totals up to ~-120) differed by at most 1.3e-5 when measured; 1e-4 is the bound.
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


def test_is_greedy_matches_hf_adapter_on_a_greedy_continuation(models):
  """A random model's continuations of PAIRS are never greedy: score its own greedy tokens
  (True) and the same with the last token changed (False) at the token level on both sides."""
  from ftjax.generate import generate_ids
  ours, reference = models
  context = ours.tok_encode("Spent 12 dollars on")
  greedy = generate_ids(ours.model, [context], 3, eos_ids=())[0]
  changed = greedy[:-1] + [(greedy[-1] + 1) % 400]
  requests = [(("", ""), context, greedy), (("", ""), context, changed)]
  got = ours._loglikelihood_tokens(requests)
  want = reference._loglikelihood_tokens(requests, disable_tqdm=True)
  assert [g[1] for g in got] == [w[1] for w in want] == [True, False]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=TOL, rtol=0)


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


CHOICES = [{"question": "Spent 12 dollars on", "choices": [" lunch", " dinner"], "answer": 0},
           {"question": "The total was", "choices": [" 40", " twelve dollars"], "answer": 1}]


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
  """A multiple-choice task of lm_eval's YAML format over a local JSONL file: nothing downloaded."""
  import json
  folder = tmp_path_factory.mktemp("lm_eval_task")
  (folder / "choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in CHOICES))
  (folder / "tiny_choice.yaml").write_text(
      "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n"
      f"  data_files:\n    test: {folder / 'choice.jsonl'}\n  cache_dir: {folder / 'cache'}\n"
      "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
      "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
      "metric_list:\n  - metric: acc\n    higher_is_better: true\n")
  # only this folder's tasks: indexing lm_eval's hundreds of built-in task files costs ~10 s
  from lm_eval.tasks import TaskManager
  return TaskManager(include_path=str(folder), include_defaults=False)


def _choice_scores(lm, task_manager):
  from lm_eval import evaluator
  out = evaluator.simple_evaluate(model=lm, tasks=["tiny_choice"], log_samples=True,
                                  task_manager=task_manager)
  samples = sorted(out["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
  return [float(r[0][0]) for s in samples for r in s["resps"]], out["results"]["tiny_choice"]


def test_local_task_through_lm_eval_evaluator(models, local_tasks):
  """lm_eval's own evaluator on a task file: the ftjax model's per-choice scores and accuracy
  equal the HF adapter's."""
  ours, reference = models
  got, got_results = _choice_scores(ours, local_tasks)
  want, want_results = _choice_scores(reference, local_tasks)
  assert len(got) == 4
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  assert got_results["acc,none"] == want_results["acc,none"]



@pytest.fixture(scope="module")
def exact_vocab_dir(model_dir, tmp_path_factory):
  """The tiny model with as many embedding rows as its tokenizer has tokens: HFLM(peft=...)
  resizes the embeddings to the tokenizer's length (tests/tiny.py pads them to 512), which
  would change the reference's softmax, not ours."""
  import transformers
  from tiny import make_model_dir
  n = len(transformers.AutoTokenizer.from_pretrained(model_dir))
  return make_model_dir(tmp_path_factory.mktemp("tiny_llama_exact"), vocab_size=n)


@pytest.fixture(scope="module")
def adapter_dir(exact_vocab_dir, tmp_path_factory):
  """A LoRA adapter of the tiny model, moved off its init (B = 0 would change nothing)."""
  import jax
  from ftjax import models, peft
  model, _ = models.load(exact_vocab_dir)
  model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                     target_modules=["q_proj", "v_proj"]))
  for i, (_, layer) in enumerate(peft.adapter_layers(model)):
    layer.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), layer.lora_b.shape))
  folder = str(tmp_path_factory.mktemp("lora"))
  peft.save_adapter(model, folder, exact_vocab_dir)
  return folder


def test_adapter_scores_match_hf_adapter_with_peft(exact_vocab_dir, adapter_dir):
  """`adapter=DIR`: the base model with the run's adapter, as HFLM(peft=DIR) scores it."""
  from lm_eval.models.huggingface import HFLM
  from ftjax.lm_eval import FtjaxLM
  ours = FtjaxLM(pretrained=exact_vocab_dir, adapter=adapter_dir, batch_size=2, max_length=64)
  reference = HFLM(pretrained=exact_vocab_dir, peft=adapter_dir, device="cpu", dtype="float32",
                   batch_size=2, max_length=64)
  got = ours.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
  want = reference.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=TOL, rtol=0)
  # the adapter is on (its B is 0.1-scale noise, so HFLM(peft=) scores differ from the base's
  # by whole nats): matching them is matching the adapter
  from ftjax import peft
  assert list(peft.configs(ours.model)) == ["default"]
