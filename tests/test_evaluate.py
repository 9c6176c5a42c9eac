"""Evaluation: metrics against references (the quickstart scorer, rouge-score), the paired
bootstrap and verdict, bad input refused before anything compiles, perplexity vs transformers,
and whole runs: a planted overfitting run that stops early and restores its best checkpoint, a
task prompting already solves, and prompting-only evaluation from the command line."""

import json
import os

import pytest

from ftjax import config as config_lib
from ftjax import evaluate
from ftjax import train as train_lib
from ftjax.data import quickstart_task
from ftjax.errors import FtjaxError
from ftjax.evaluation import metrics, stats
from ftjax.evaluation.generation import EvalPlan
from tiny import quickstart_data, run_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return quickstart_data(tmp_path_factory, n_train=8, n_eval=16)


def tiny_config(model_dir, data_dir, **overrides):
  return run_config(model_dir, data_dir, **{"train.log_every": 1, **overrides})


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(path)


# --- metrics -------------------------------------------------------------------------------

def _variants(ref: str) -> list[str]:
  obj = json.loads(ref)
  reordered = json.dumps(dict(reversed(list(obj.items()))))
  wrong = json.dumps(dict(obj, amount=obj["amount"] + 1))
  missing = json.dumps({k: v for k, v in obj.items() if k != "vendor"})
  return [ref, "  " + ref + "\n", reordered, wrong, missing, ref[:-1], "not json", "[1, 2]"]


def test_json_metrics_equal_the_quickstart_scorer():
  """exact_match, json_valid and field_accuracy (defaults) give quickstart_task.score's values on
  every kind of prediction: exact, padded, reordered keys, a wrong field, a missing key, broken."""
  opts = metrics.Options()
  for ex in quickstart_task.make_examples(10, seed=1):
    for pred in _variants(ex["output"]):
      want = quickstart_task.score(pred, ex["output"])
      got = {name: float(metrics.METRICS[name].per_example(pred, ex["output"], opts))
             for name in ("exact_match", "json_valid", "field_accuracy")}
      assert got == want, (pred, got, want)


def test_field_accuracy_compares_json_types():
  """true is not 1 and false is not 0.0 (Python's bool is an int); 1 and 1.0 are one JSON number."""
  fa = metrics.METRICS["field_accuracy"]
  ref = '{"paid": true, "refund": false, "n": 1, "tags": [true, 2]}'
  assert fa.score(['{"paid": 1, "refund": 0.0, "n": 1.0, "tags": [1, 2.0]}'], [ref], metrics.Options()) == 0.25
  assert fa.score(['{"paid": true, "refund": false, "n": 1, "tags": [true, 2.0]}'], [ref], metrics.Options()) == 1.0
  assert fa.score(['{"paid": "true", "refund": null, "n": "1", "tags": [true]}'], [ref], metrics.Options()) == 0.0


def test_primary_metric_falls_back_to_loss_visibly(caplog):
  """With eval.generate=False the first generation metric can't be computed: the primary is the
  first metric that is (else loss), as the config comment says, and a log line says so."""
  e = config_lib.base_config().eval
  e.metrics, e.generate = "exact_match,token_accuracy", False
  with caplog.at_level("WARNING", logger="ftjax.evaluation.metrics"):
    assert metrics.primary(e) == "token_accuracy"
  assert "eval.primary is 'token_accuracy': eval.metrics lists exact_match first" in caplog.text
  e.metrics = "rouge_l"
  assert metrics.primary(e) == "loss"
  e.generate = True
  assert metrics.primary(e) == "rouge_l"


def test_text_metrics():
  em = metrics.METRICS["exact_match"]
  assert em.score([" Paris. "], ["paris"], metrics.Options(("strip",))) == 0.0
  assert em.score([" Paris. "], ["paris"], metrics.Options(("strip", "lower", "punctuation"))) == 1.0
  assert em.score(["a  b"], ["a b"], metrics.Options(("whitespace",))) == 1.0
  # field_accuracy over chosen fields only
  ref, pred = '{"a": 1, "b": 2, "c": 3}', '{"a": 1.0, "b": 5, "c": 3}'
  assert metrics.METRICS["field_accuracy"].score([pred], [ref], metrics.Options(fields=("a", "b"))) == 0.5
  # token F1 by hand: pred {the, cat, sat}, ref {the, cat, ran, away}: 2 common, P 2/3, R 2/4
  assert metrics.METRICS["token_f1"].score(["The cat sat."], ["the cat ran away"], metrics.Options()) \
      == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5), abs=1e-12)
  # label accuracy and macro-F1 by hand: labels a (3 refs), b (1 ref)
  preds, refs = ["A", "a.", "b", "b"], ["a", "a", "a", "b"]
  lab = metrics.METRICS["label_accuracy"].score(preds, refs, metrics.Options())
  assert lab == 0.75
  f1_a = 2 * 2 / (2 * 2 + 0 + 1)  # tp 2, fp 0, fn 1
  f1_b = 2 * 1 / (2 * 1 + 1 + 0)  # tp 1, fp 1, fn 0
  assert metrics.METRICS["macro_f1"].score(preds, refs, metrics.Options()) == pytest.approx((f1_a + f1_b) / 2)
  assert metrics.confusion(preds, refs)["pairs"][("a", "b")] == 1
  from ftjax.evaluation import confusion_summary
  assert confusion_summary(preds, refs, metrics.Options()) == {
      "labels": 2, "recall": {"a": 2 / 3, "b": 1.0}, "mistakes": [["a", "b", 1]]}


def test_overfitting_warning_needs_rising_eval_loss_and_a_growing_gap():
  from ftjax.evaluation.curves import EarlyStopping, overfitting_warnings
  train = [(s, 3.0 - 0.1 * s) for s in range(1, 21)]
  assert overfitting_warnings(train, [(5, 2.8), (10, 2.6), (15, 2.5)]) == []  # eval improving
  warned = overfitting_warnings(train, [(5, 2.8), (10, 2.6), (15, 2.7)])
  assert len(warned) == 1 and warned[0].startswith("step 15: eval loss rose 2.6000 -> 2.7000")
  # eval loss rising but the train loss rising faster (gap shrinking): no warning
  assert overfitting_warnings([(5, 1.0), (10, 2.0)], [(5, 2.0), (10, 2.1)]) == []
  stop = EarlyStopping(higher_is_better=True, patience=2)
  assert [stop.update(s, v) for s, v in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7))] == [True, True, False, False]
  assert stop.should_stop and stop.best_step == 2


def test_rouge_l_equals_rouge_score():
  """ROUGE-L F-measure equals google-research's rouge-score (no stemming) on ASCII texts, to
  float rounding."""
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  pairs = [("the cat sat on the mat", "the cat was on a mat"),
           ("police killed the gunman", "the gunman police killed"),
           ("a b c d e f", "f e d c b a"), ("Nothing in common", "at all here"),
           ("Fine-tuning adds 20 points over prompting.", "prompting adds 20 points, over nothing")]
  for pred, ref in pairs:
    want = scorer.score(ref, pred)["rougeL"].fmeasure
    assert metrics.METRICS["rouge_l"].score([pred], [ref], metrics.Options()) == pytest.approx(want, abs=1e-12)


def test_paired_bootstrap_and_verdict():
  """A 60-point gain on 100 examples has a CI well above 0 (verdict: fine-tuning pays off);
  identical predictions have difference 0 and CI [0, 0] (verdict: prompting suffices)."""
  em, opts = metrics.METRICS["exact_match"], metrics.Options()
  refs = [str(i) for i in range(100)]
  tuned = [r if i < 90 else "x" for i, r in enumerate(refs)]
  prompted = [r if i < 30 else "x" for i, r in enumerate(refs)]
  c = stats.paired_bootstrap(em, tuned, prompted, refs, opts, resamples=2000)
  assert c["difference"] == pytest.approx(0.6)
  # The paired difference per example is 1 on 60 examples, else 0: its sd is ~0.049, so the
  # 95% CI is ~0.6 +- 0.096; allow bootstrap noise of +-0.03 on each end.
  assert 0.47 < c["ci95"][0] < 0.53 and 0.67 < c["ci95"][1] < 0.73
  v = stats.verdict("exact_match", 0.9, {"zero-shot": 0.1, "3-shot": 0.3}, {"3-shot": c, "zero-shot": c})
  assert v["kind"] == "finetuning_pays_off" and v["best_baseline"] == "3-shot"
  assert v["text"].startswith("Fine-tuning adds 60.0 points of exact_match over the best prompting baseline (3-shot")
  same = stats.paired_bootstrap(em, prompted, prompted, refs, opts)
  assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
  v = stats.verdict("exact_match", 0.3, {"zero-shot": 0.3}, {"zero-shot": same})
  assert v["kind"] == "prompting_suffices" and "is the cheaper choice" in v["text"]


# --- bad input, before anything compiles --------------------------------------------------

def test_unknown_and_unimportable_metrics_are_refused(tmp_path, monkeypatch):
  c = config_lib.base_config()
  c.data.train = "x.jsonl"
  c.eval.metrics = "exact_match,bleu"
  with pytest.raises(FtjaxError, match="unknown metric 'bleu'"):
    config_lib.validate(c)
  c.eval.metrics = "no_such_module_xyz:score"
  with pytest.raises(FtjaxError, match="custom metric 'no_such_module_xyz:score' failed to import: ModuleNotFoundError"):
    config_lib.validate(c)
  (tmp_path / "broken_metric.py").write_text("import not_installed_dependency_xyz\ndef f(p, r): return 1.0\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  c.eval.metrics = "broken_metric:f"
  with pytest.raises(FtjaxError, match="failed to import"):
    config_lib.validate(c)
  c.eval.metrics = "operator:eq"  # importable and callable: accepted
  config_lib.validate(c)
  c.eval.metrics, c.eval.primary = "exact_match", "rouge_l"
  with pytest.raises(FtjaxError, match="eval.primary='rouge_l' is not among"):
    config_lib.validate(c)


def test_a_negative_eval_batch_size_is_refused():
  c = config_lib.base_config()
  c.eval.batch_size = -1
  with pytest.raises(FtjaxError, match=r"eval.batch_size=-1; expected an integer >= 0"):
    metrics.validate(c.eval)


def test_eval_set_without_references_is_refused(tmp_path):
  path = write_jsonl(tmp_path / "eval.jsonl", [{"text": "just some text"}, {"text": "more"}])
  with pytest.raises(FtjaxError, match=r"eval.jsonl:1: eval example without a reference answer \(2 of 2"):
    EvalPlan.build(path, config_lib.base_config().eval)


def test_few_shot_pool_overlapping_eval_is_refused(model_dir, data_dir, tmp_path):
  """A pool whose shot repeats an eval input (even re-cased) is refused, naming both lines,
  and train() refuses it before its first compile."""
  evals = [json.loads(line) for line in open(os.path.join(data_dir, "eval.jsonl"))]
  train = [json.loads(line) for line in open(os.path.join(data_dir, "train.jsonl"))]
  leaked = dict(evals[5], input=evals[5]["input"].upper())
  pool = write_jsonl(tmp_path / "train.jsonl", [train[0], leaked] + train[1:])
  e = config_lib.base_config().eval
  with pytest.raises(FtjaxError, match=r"few-shot pool overlaps the eval set: .*train.jsonl:2 repeats .*eval.jsonl:6 \(exact"):
    EvalPlan.build(os.path.join(data_dir, "eval.jsonl"), e, pool_path=pool)
  with pytest.raises(FtjaxError, match="is the eval set itself"):
    EvalPlan.build(os.path.join(data_dir, "eval.jsonl"), e, pool_path=os.path.join(data_dir, "eval.jsonl"))
  c = tiny_config(model_dir, data_dir, **{"train.steps": 2, "eval.generate": True, "eval.few_shot_pool": pool})
  with pytest.raises(FtjaxError, match="few-shot pool overlaps the eval set"):
    train_lib.train(c, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd" / "metrics.jsonl")  # no step ran


def test_skip_policy_reads_eval_and_shots_as_training_does(data_dir, tmp_path):
  """data.check.on_error="skip": records the check skips (an empty CSV answer, bad JSON) are
  skipped by the eval set and the few-shot pool too, not an error half-way through a run."""
  train = [json.loads(line) for line in open(os.path.join(data_dir, "train.jsonl"))][:6]
  pool = tmp_path / "train.csv"
  pool.write_text("input,output\n" + "x,\n" + "".join(f'"{r["input"]}","{r["output"].replace(chr(34), 2 * chr(34))}"\n' for r in train))
  evals = tmp_path / "eval.jsonl"
  evals.write_text(open(os.path.join(data_dir, "eval.jsonl")).read() + "{not json\n")
  c = config_lib.base_config()
  c.eval.few_shot = 3
  with pytest.raises(FtjaxError, match=r"eval.jsonl:\d+: not valid JSON"):
    EvalPlan.build(str(evals), c.eval, pool_path=str(pool), data_cfg=c.data)
  c.data.check.on_error = "skip"
  plan = EvalPlan.build(str(evals), c.eval, pool_path=str(pool), data_cfg=c.data)
  assert [w.rsplit("/", 1)[1] for w in plan.shot_sources] == ["train.csv:3", "train.csv:4", "train.csv:5"]
  assert plan.references[0] == json.loads(open(os.path.join(data_dir, "eval.jsonl")).readline())["output"]


# --- forgetting -----------------------------------------------------------------------------

def test_perplexity_equals_transformers_on_tinyshakespeare(model_dir, shared_data):
  """General-text perplexity of the tiny Llama equals exp(mean NLL) of transformers' model on the
  same windows (f32; 1e-4 relative covers accumulation order)."""
  import torch
  import transformers
  from ftjax.evaluation import forgetting
  from ftjax.models import load
  text = forgetting.read_text(os.path.join(shared_data, "tinyshakespeare"))[:4000]
  model, tok = load(model_dir)
  seq = 64
  ours = forgetting.perplexity(model, tok, text, seq_len=seq, max_tokens=320, batch_size=2)
  ids = tok.encode(text, add_special_tokens=False)[:321]
  windows = torch.tensor([ids[i * seq:(i + 1) * seq + 1] for i in range(320 // seq)])
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  with torch.no_grad():
    logits = ref_model(windows[:, :-1]).logits
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
  assert ours == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_builtin_general_text_is_a_few_kb():
  from ftjax.evaluation import forgetting
  text = forgetting.read_text("")
  assert 2000 < len(text.encode()) < 8000 and "Four score and seven years ago" in text


# --- whole runs -----------------------------------------------------------------------------

def test_planted_overfitting_stops_early_restores_best_and_warns(model_dir, data_dir, tmp_path):
  """8 train examples, full fine-tuning at a high constant lr: the eval loss bottoms out and
  rises while train loss keeps falling. Patience 2 stops the run, the final evaluation is the
  best step's (restored from WORKDIR/best), and the report warns of overfitting."""
  workdir = str(tmp_path / "wd")
  c = tiny_config(model_dir, data_dir, method="full", **{
      "train.steps": 40, "train.lr": 1e-2, "train.schedule": "constant", "train.eval_every": 4,
      "train.patience": 2, "eval.metrics": "loss"})
  summary = train_lib.train(c, workdir)
  evals = {json.loads(l)["step"]: json.loads(l)["eval/loss"] for l in open(os.path.join(workdir, "metrics.jsonl"))
           if "eval/loss" in l}
  best = min(evals, key=evals.get)
  assert summary["stopped_early"] and summary["steps"] < 40
  assert summary["best_step"] == best < summary["steps"]
  assert summary["steps"] == best + 2 * 4  # two evals without improvement
  assert summary["eval"]["loss"] == pytest.approx(evals[best], rel=1e-6)  # the restored best state
  assert os.path.isdir(os.path.join(workdir, "best", str(best)))
  report = open(os.path.join(workdir, "report.md")).read()
  assert f"Early stopping at step {summary['steps']}" in report
  assert "**Warning:**" in report and "overfitting" in report
  assert "(restored from the best checkpoint)" in report
  assert os.path.exists(os.path.join(workdir, "curves.png"))
  # With the data check's report in the workdir, `--workdir` adds its data and cost figures.
  from ftjax.data_check import run_check
  from ftjax.models.resolve import tokenizer_for
  run_check(c, tokenizer_for(model_dir), out_dir=workdir)
  evaluate.main(["--workdir", workdir])
  report = open(os.path.join(workdir, "report.md")).read()
  assert "## Data check (data_report.json)" in report and "| train | 8 |" in report
  assert f"## Cost\n\n{summary['steps']} steps of full" in report


def test_prompting_suffices_when_the_base_model_already_solves_the_task(model_dir, data_dir, tmp_path):
  """By construction: the eval references are the base model's own greedy zero-shot answers, so
  zero-shot scores 100%; a near-zero learning rate leaves the fine-tuned model the same, and
  the verdict is "prompting suffices". The report has every section and its PNGs."""
  from ftjax.evaluation.generation import answer_ids
  from ftjax.models import load
  model, tok = load(model_dir)
  inputs = [json.loads(l)["input"] for l in open(os.path.join(data_dir, "eval.jsonl"))]
  ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True),
                    add_special_tokens=False) for x in inputs]
  answers = answer_ids(model, tok, ids, 6, 16, "references")
  solved = [{"input": x, "output": a} for x, a in zip(inputs, answers) if a.strip()][:5]
  assert len(solved) >= 4  # a random model stops at once on some inputs: those have no reference
  eval_path = write_jsonl(tmp_path / "eval.jsonl", solved)
  workdir = str(tmp_path / "wd")
  c = tiny_config(model_dir, data_dir, **{
      "data.eval": eval_path, "train.steps": 2, "train.lr": 1e-9, "eval.generate": True,
      "eval.metrics": "exact_match,token_f1", "eval.few_shot": 1, "eval.max_new_tokens": 6,
      "eval.bootstrap": 200, "eval.forgetting": True, "eval.forgetting_tokens": 256})
  summary = train_lib.train(c, workdir)
  assert summary["baseline"]["zero-shot"]["exact_match"] == 1.0
  assert summary["finetuned"]["exact_match"] == 1.0
  assert summary["verdict"].startswith("Prompting suffices")
  results = json.load(open(os.path.join(workdir, "report.json")))["results"]
  assert results["verdict"]["kind"] == "prompting_suffices"
  assert set(results["baselines"]) == {"zero-shot", "1-shot"}
  assert abs(results["forgetting"]["relative_change"]) < 1e-3  # lr 1e-9: nothing forgotten
  assert not results["forgetting"]["flagged"]
  report = open(os.path.join(workdir, "report.md")).read()
  for section in ("**Verdict: Prompting suffices", "## Prompting baselines vs fine-tuned",
                  "## Forgetting", "## Leakage", "## Sample predictions", "## Config"):
    assert section in report, section
  for png in ("comparison.png", "forgetting.png", "curves.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000


def test_cli_evaluates_prompting_alone_and_rewrites_a_report(model_dir, data_dir, tmp_path, capsys):
  out = str(tmp_path / "prompting")
  evaluate.main(["--model", model_dir, "--data", os.path.join(data_dir, "eval.jsonl"),
                 "--few-shot", "0", "--template", "Extract as JSON: {input}",
                 "--metrics", "exact_match,json_valid", "--max-examples", "4",
                 "--max-new-tokens", "4", "--output", out])
  results = json.load(open(os.path.join(out, "eval_results.json")))
  assert list(results["baselines"]) == ["zero-shot", "your template"]
  assert results["examples"] == 4 and results["finetuned"] is None
  assert os.path.exists(os.path.join(out, "comparison.png"))
  os.remove(os.path.join(out, "report.md"))
  evaluate.main(["--workdir", out])
  assert "## Prompting baselines vs fine-tuned" in open(os.path.join(out, "report.md")).read()
  with pytest.raises(SystemExit):
    evaluate.main(["--model", model_dir, "--data", os.path.join(data_dir, "eval.jsonl"), "--output", out])
  assert "--few-shot 3 needs --shots" in capsys.readouterr().err


# --- the baseline cache (ftjax/evaluation/baseline_cache.py) ----------------------------------

@pytest.fixture
def base_generations(monkeypatch):
  """The `desc` of every answer_ids call (one per batch of answers: "zero-shot", "1-shot",
  "forgetting (base)", "fine-tuned", ...), in order."""
  from ftjax.evaluation import generation
  calls, real = [], generation.answer_ids

  def counting(model, tokenizer, ids, max_new_tokens, batch_size, desc):
    calls.append(desc)
    return real(model, tokenizer, ids, max_new_tokens, batch_size, desc)
  monkeypatch.setattr(generation, "answer_ids", counting)
  return calls


BASE_DESCS = {"zero-shot", "1-shot", "forgetting (base)"}


def test_a_second_method_on_the_same_data_reads_the_baselines_from_the_cache(
    model_dir, data_dir, tmp_path, monkeypatch, base_generations, caplog):
  """LoRA, then full fine-tuning on the same model, data and eval config: the second run
  generates nothing with the base model (no zero-shot, 1-shot or base forgetting answers) and
  reports the same baselines, logging where they came from."""
  monkeypatch.setenv("FTJAX_BASELINE_CACHE", str(tmp_path / "baselines"))
  overrides = {"train.steps": 1, "eval.generate": True, "eval.few_shot": 1,
               "eval.max_examples": 4, "eval.max_new_tokens": 4, "eval.bootstrap": 50,
               "eval.forgetting": True, "eval.forgetting_tokens": 256}
  first = train_lib.train(tiny_config(model_dir, data_dir, **overrides), str(tmp_path / "lora"))
  assert BASE_DESCS <= set(base_generations)
  base_generations.clear()
  caplog.set_level("INFO", logger="ftjax.evaluate")
  second = train_lib.train(tiny_config(model_dir, data_dir, method="full", **overrides),
                           str(tmp_path / "full"))
  assert not BASE_DESCS & set(base_generations), base_generations
  assert "fine-tuned" in base_generations  # the run's own model still answers
  assert second["baseline"] == first["baseline"]
  entry, = os.listdir(tmp_path / "baselines")
  assert f"baseline from cache {tmp_path / 'baselines' / entry}" in caplog.text
  results = {name: json.load(open(tmp_path / name / "eval_results.json")) for name in ("lora", "full")}
  assert results["full"]["baselines"] == results["lora"]["baselines"]
  assert results["full"]["forgetting"]["perplexity_before"] == results["lora"]["forgetting"]["perplexity_before"]


def test_the_baseline_cache_misses_on_a_changed_key_and_ignores_bad_entries(
    model_dir, data_dir, tmp_path, monkeypatch, base_generations, caplog):
  """A changed eval setting (max_new_tokens) is another key; a truncated entry, or one whose
  predictions do not fit the run, is ignored with a warning, computed again and rewritten."""
  from ftjax.run import setup
  folder = tmp_path / "baselines"
  monkeypatch.setenv("FTJAX_BASELINE_CACHE", str(folder))
  c = tiny_config(model_dir, data_dir, **{"eval.generate": True, "eval.few_shot": 1,
                                          "eval.max_examples": 3, "eval.max_new_tokens": 3,
                                          "eval.forgetting": False})
  run = setup(c)
  plan = evaluate.plan_for_run(c)
  fresh = evaluate.base_model_eval(run, plan)
  assert base_generations == ["zero-shot", "1-shot"]
  path, = folder.iterdir()
  base_generations.clear()
  assert evaluate.base_model_eval(run, plan) == fresh and base_generations == []

  c.eval.max_new_tokens = 2  # a changed eval key: a miss, a second entry
  evaluate.base_model_eval(run, evaluate.plan_for_run(c))
  assert base_generations == ["zero-shot", "1-shot"] and len(list(folder.iterdir())) == 2
  c.eval.max_new_tokens = 3

  caplog.set_level("WARNING", logger="ftjax.evaluation.baseline_cache")
  text = path.read_text()
  entry = json.loads(text)
  entry["baseline"]["systems"]["zero-shot"]["predictions"].pop()
  for bad in (text[: len(text) // 2], json.dumps(entry)):
    path.write_text(bad)
    base_generations.clear()
    caplog.clear()
    assert evaluate.base_model_eval(run, plan) == fresh
    assert base_generations == ["zero-shot", "1-shot"]  # computed again, not trusted
    assert f"ignoring the baseline cache entry {path}" in caplog.text
    assert json.loads(path.read_text())["baseline"] == fresh  # and rewritten whole


# --- the last periodic eval is the final eval --------------------------------------------------

def _final_step_run(model_dir, data_dir, workdir):
  c = tiny_config(model_dir, data_dir, **{
      "train.steps": 2, "train.eval_every": 1, "eval.generate": True, "eval.few_shot": 0,
      "eval.forgetting": False, "eval.max_examples": 4, "eval.periodic_examples": 2,
      "eval.max_new_tokens": 4, "eval.bootstrap": 50})
  summary = train_lib.train(c, str(workdir))
  evals = {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "eval/loss" in r}
  results = json.load(open(workdir / "eval_results.json"))
  return summary, evals, results


def test_the_periodic_eval_at_the_last_step_reuses_the_final_eval(
    model_dir, data_dir, tmp_path, monkeypatch, base_generations):
  """eval_every 1 of 2 steps: step 2's periodic eval is the final eval of the same state, so
  it is not run twice: one pass of the eval loss and one set of fine-tuned answers after step
  1's eval; step 2's logged numbers are the final ones (its exact match: the first
  eval.periodic_examples final answers). Step 1's exact match is reported as -1 so that step 2
  is the best (a tie would keep step 1 and restore it)."""
  real_periodic = train_lib.periodic_eval
  monkeypatch.setattr(train_lib, "periodic_eval",
                      lambda *a, **k: dict(real_periodic(*a, **k), exact_match=-1.0))
  loss_passes = []
  real_loss = train_lib.evaluate_loss
  monkeypatch.setattr(train_lib, "evaluate_loss",
                      lambda *a, **k: loss_passes.append(1) or real_loss(*a, **k))
  summary, evals, results = _final_step_run(model_dir, data_dir, tmp_path / "wd")
  assert base_generations == ["zero-shot", "eval", "fine-tuned"]
  assert len(loss_passes) == 2  # step 1's periodic eval, the final eval (not step 2's again)
  assert summary["best_step"] == 2 and not results["training"].get("restored_best")
  assert evals[2]["eval/loss"] == summary["eval"]["loss"]
  answers, refs = results["finetuned"]["predictions"][:2], results["references"][:2]
  assert evals[2]["eval/exact_match"] == metrics.resolve(["exact_match"])["exact_match"].score(
      answers, refs, metrics.options(config_lib.base_config().eval))


def test_a_restored_best_step_is_evaluated_again(model_dir, data_dir, tmp_path, monkeypatch,
                                                 base_generations):
  """When step 2 is not the best (forced here: its exact match reported as -1), the final
  evaluation is the restored step 1's: the final state's answers are not reused for it."""
  real = evaluate.periodic_from_final
  monkeypatch.setattr(evaluate, "periodic_from_final",
                      lambda *a, **k: dict(real(*a, **k), exact_match=-1.0))
  summary, evals, results = _final_step_run(model_dir, data_dir, tmp_path / "wd")
  assert summary["best_step"] == 1 and results["training"]["restored_best"]
  assert base_generations == ["zero-shot", "eval", "fine-tuned", "fine-tuned"]
  assert summary["eval"]["loss"] == pytest.approx(evals[1]["eval/loss"], rel=1e-6)
