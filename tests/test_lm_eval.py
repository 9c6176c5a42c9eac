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


DOCUMENTS = [{"text": "Spent 12 dollars on lunch and 40 on groceries."},
             {"text": "The total was forty dollars, paid on Monday."}]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
  """Two tasks of lm_eval's YAML format over local JSONL files (nothing downloaded): multiple
  choice (acc) and a perplexity task (loglikelihood_rolling: a continuous score)."""
  import json
  folder = tmp_path_factory.mktemp("lm_eval_task")
  (folder / "choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in CHOICES))
  (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
  data = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                       f"{folder / name}\n  cache_dir: {folder / 'cache'}\ntest_split: test\n")
  (folder / "tiny_choice.yaml").write_text(
      "task: tiny_choice\n" + data("choice.jsonl") + "output_type: multiple_choice\n"
      "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
      "metric_list:\n  - metric: acc\n    higher_is_better: true\n")
  (folder / "tiny_ppl.yaml").write_text(
      "task: tiny_ppl\n" + data("docs.jsonl") + "output_type: loglikelihood_rolling\n"
      "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
      "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
  return folder


@pytest.fixture(scope="module")
def local_tasks(task_folder):
  # only this folder's tasks: indexing lm_eval's hundreds of built-in task files costs ~10 s
  from lm_eval.tasks import TaskManager
  return TaskManager(include_path=str(task_folder), include_defaults=False)


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


# --- eval.lm_eval_tasks: the run's end hook (ftjax/evaluation/harness.py) ---------------------

def _task_scores(lm, task_manager, tasks=("tiny_choice", "tiny_ppl")):
  from lm_eval import evaluator
  out = evaluator.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager,
                                  log_samples=False)
  return out["results"]


@pytest.fixture(scope="module")
def tuned_run(model_dir, task_folder, tmp_path_factory):
  """A tiny LoRA run (lr 1e-2: the adapter moves) with both local tasks, by folder and by file."""
  import json
  import os
  from ftjax import train as train_lib
  from tiny import quickstart_data, run_config
  data_dir = quickstart_data(tmp_path_factory, n_train=8, n_eval=4)
  workdir = str(tmp_path_factory.mktemp("lm_eval_run"))
  c = run_config(model_dir, data_dir, **{
      "train.steps": 3, "train.lr": 1e-2, "eval.forgetting": False,
      "eval.lm_eval_tasks": f"{task_folder / 'tiny_choice.yaml'}, {task_folder}"})
  summary = train_lib.train(c, workdir)
  results = json.load(open(os.path.join(workdir, "eval_results.json")))
  return workdir, summary, results


def test_run_scores_lm_eval_tasks_base_vs_tuned(tuned_run, model_dir, local_tasks):
  """The run's base scores are the base model's, its fine-tuned scores the saved adapter's,
  each as lm_eval scores that model loaded from disk (same code path: equal to float rounding;
  1e-4 relative covers a perplexity's exp of a sum of log-probs)."""
  import os
  from ftjax.lm_eval import FtjaxLM
  workdir, summary, results = tuned_run
  got = results["lm_eval"]
  assert "error" not in got, got.get("error")
  assert set(got["base"]) == set(got["fine-tuned"]) == {"tiny_choice", "tiny_ppl"}
  base = _task_scores(FtjaxLM(pretrained=model_dir), local_tasks)
  tuned = _task_scores(FtjaxLM(pretrained=model_dir, adapter=os.path.join(workdir, "adapter")),
                       local_tasks)
  for name, want in (("base", base), ("fine-tuned", tuned)):
    for task in ("tiny_choice", "tiny_ppl"):
      for metric in got[name][task]:
        np.testing.assert_allclose(got[name][task][metric], want[task][metric], rtol=1e-4,
                                   err_msg=f"{name} {task} {metric}")
  # training moved the model: base and fine-tuned are two models' scores
  assert got["base"]["tiny_ppl"]["word_perplexity,none"] != got["fine-tuned"]["tiny_ppl"]["word_perplexity,none"]
  assert summary["lm_eval"]["fine-tuned"] == got["fine-tuned"]


def test_report_shows_lm_eval_scores_in_forgetting_section(tuned_run):
  import os
  workdir, _, results = tuned_run
  report = open(os.path.join(workdir, "report.md")).read()
  section = report.split("## Forgetting", 1)[1].split("\n## ", 1)[0]
  assert "### lm-evaluation-harness" in section
  ppl = results["lm_eval"]["fine-tuned"]["tiny_ppl"]["word_perplexity,none"]
  base = results["lm_eval"]["base"]["tiny_ppl"]["word_perplexity,none"]
  row = next(line for line in section.splitlines() if line.startswith("| tiny_ppl | word_perplexity |"))
  assert f"{base:.4f}" in row and f"{ppl:.4f}" in row and f"{ppl - base:+.4f}" in row
  assert any(line.startswith("| tiny_choice | acc |") for line in section.splitlines())


@pytest.mark.parametrize("tasks, message", [
    ("no_such_task_anywhere", "unknown lm_eval task 'no_such_task_anywhere'"),
    ("{folder}/missing.yaml", "missing.yaml: no such task file"),
    ("{folder}/broken.yaml", "broken.yaml: no 'task:'"),
])
def test_bad_lm_eval_tasks_fail_before_training(tasks, message, model_dir, task_folder, tmp_path):
  """A task problem stops the run at config validation: nothing trained or written."""
  import os
  from ftjax import train as train_lib
  from ftjax.errors import FtjaxError
  from tiny import run_config
  (task_folder / "broken.yaml").write_text("dataset_path: json\n") if "broken" in tasks else None
  c = run_config(model_dir, str(tmp_path), **{"eval.lm_eval_tasks": tasks.format(folder=task_folder)})
  workdir = str(tmp_path / "wd")
  with pytest.raises(FtjaxError, match="eval.lm_eval_tasks") as e:
    train_lib.train(c, workdir)
  assert message in str(e.value)
  assert not os.path.exists(workdir)


def test_lm_eval_not_installed_is_a_config_error(monkeypatch, task_folder):
  import importlib.util
  from ftjax import config as config_lib
  from ftjax.errors import FtjaxError
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "lm_eval" else real(name, *a))
  c = config_lib.base_config()
  c.data.train = "train.jsonl"  # validate() reads no file: any name passes
  c.eval.lm_eval_tasks = str(task_folder)
  with pytest.raises(FtjaxError, match=r"eval.lm_eval_tasks=.* needs lm-evaluation-harness.*"
                                       r"pip install 'ftjax\[lm_eval\]'"):
    config_lib.validate(c)
  c.eval.lm_eval_tasks = ""
  config_lib.validate(c)  # off: lm_eval is not needed


def test_a_task_failing_after_training_is_recorded_not_raised(monkeypatch):
  """After training the checkpoint and exports exist: a task that fails then (a dataset gone, a
  download refused) becomes a line in the report, not a crash that skips summary and report."""
  import types
  from ftjax import config as config_lib
  from ftjax.evaluation import harness, report
  def fail(*args, **kwargs):
    raise FileNotFoundError("docs.jsonl vanished")
  monkeypatch.setattr(harness, "score", fail)
  c = config_lib.base_config()
  c.eval.lm_eval_tasks = "tiny_ppl.yaml"
  out = harness.base_vs_tuned(types.SimpleNamespace(config=c, tokenizer=None), tuned=None)
  assert out == {"tasks": ["tiny_ppl.yaml"], "limit": 0,
                 "error": "FileNotFoundError: docs.jsonl vanished"}
  assert "**Not scored:** FileNotFoundError: docs.jsonl vanished" in "\n".join(
      report._lm_eval_section(out, under_forgetting=True))
  c.eval.lm_eval_tasks = ""
  assert harness.base_vs_tuned(types.SimpleNamespace(config=c, tokenizer=None), tuned=None) is None
