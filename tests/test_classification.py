"""Sequence classification (issue 23): the score head against transformers' *ForSequenceClassification
on every family, HF / PEFT SEQ_CLS export and import, the losses against torch, the metrics
against sklearn, and the data's label checks at file:line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import hf_models
from ftjax import peft
from ftjax.errors import FtjaxError
from ftjax.models import classifier
from ftjax.objectives import classification as cls_lib
from tiny import set_dotted

NUM_LABELS = 5
# f32 both sides; measured max |diff| 1.4e-7 on logits of order 1 over every family: 1e-5 is
# the bound and leaves room for summation order.
TOL = 1e-5


def _hf_classifier_dir(tmp_path_factory, family: str) -> str:
  """A tiny random HF *ForSequenceClassification of `family` (pad id 0, 5 named classes)."""
  import transformers
  lm = hf_models.build(family)
  lm.config.pad_token_id = 0
  base = str(tmp_path_factory.mktemp(f"{family}_lm"))
  lm.save_pretrained(base)
  torch.manual_seed(1)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      base, num_labels=NUM_LABELS, dtype=torch.float32,
      id2label={i: f"class{i}" for i in range(NUM_LABELS)},
      label2id={f"class{i}": i for i in range(NUM_LABELS)})
  out = str(tmp_path_factory.mktemp(f"{family}_cls"))
  model.save_pretrained(out)
  return out


@pytest.fixture(scope="module")
def llama_cls_dir(tmp_path_factory):
  return _hf_classifier_dir(tmp_path_factory, "llama")


def _padded(side: str):
  """Token ids (pad 0) and attention mask of 3 rows of 12, 7 and 3 real tokens."""
  ids = np.random.RandomState(0).randint(1, 128, (3, 12))
  tokens, mask = np.zeros_like(ids), np.zeros_like(ids)
  for i, n in enumerate((12, 7, 3)):
    where = slice(12 - n, 12) if side == "left" else slice(0, n)
    tokens[i, where], mask[i, where] = ids[i, :n], 1
  return tokens, mask


def _torch_logits(model, tokens, mask=None):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens),
                 attention_mask=None if mask is None else torch.tensor(mask)).logits.numpy()


def _hf_load(path):
  import transformers
  return transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", sorted(hf_models.FAMILIES))
def test_logits_equal_transformers_with_left_and_right_padding(family, tmp_path_factory):
  path = _hf_classifier_dir(tmp_path_factory, family)
  reference = _hf_load(path)
  ours, labels, problem = classifier.load_pretrained(path)
  assert labels == [f"class{i}" for i in range(NUM_LABELS)] and problem == "single_label"
  for side in ("left", "right"):
    tokens, mask = _padded(side)
    want = _torch_logits(reference, tokens, mask)
    got = np.asarray(ours(jnp.asarray(tokens), segment_ids=jnp.asarray(mask)))
    assert np.abs(want).max() > 0.1  # not a vacuous comparison
    assert np.abs(got - want).max() < TOL, (family, side)


def test_pooling_is_transformers_last_non_pad_token():
  tokens = jnp.asarray([[5, 6, 0, 0], [0, 0, 7, 8], [0, 0, 0, 0], [3, 0, 4, 0]])
  assert classifier.last_token_index(tokens, 0).tolist() == [1, 3, 0, 2]
  assert classifier.last_token_index(tokens, None).tolist() == [3, 3, 3, 3]
  segments = (tokens != 0).astype(jnp.int32)
  assert classifier.segment_last_index(segments).tolist() == [1, 3, 0, 2]


def test_exported_directory_loads_in_transformers(llama_cls_dir, tmp_path):
  ours, labels, _ = classifier.load_pretrained(llama_cls_dir)
  score = ours.score.kernel
  score.set_value(score[...] + 0.1)  # differs from the directory it came from
  out = str(tmp_path / "export")
  classifier.save_pretrained(ours, out, ["a", "b", "c", "d", "e"], problem_type="single_label")
  theirs = _hf_load(out)
  assert type(theirs).__name__ == "LlamaForSequenceClassification"
  assert theirs.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}
  assert theirs.config.problem_type == "single_label_classification"
  tokens, mask = _padded("right")
  got = np.asarray(ours(jnp.asarray(tokens), segment_ids=jnp.asarray(mask)))
  assert np.abs(_torch_logits(theirs, tokens, mask) - got).max() < TOL
  back, names, _ = classifier.load_pretrained(out)
  assert names == ["a", "b", "c", "d", "e"]
  assert np.abs(np.asarray(back(jnp.asarray(tokens), segment_ids=jnp.asarray(mask))) - got).max() < TOL


def _perturbed(model, scale=0.05):
  """Every adapter tensor (LoRA A / B, the score copy) moved off its init."""
  state = nnx.state(model, peft.AdapterParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                              for x, k in zip(leaves, keys)]))
  return model


def test_seq_cls_adapter_round_trips_with_peft(llama_cls_dir, tmp_path):
  """ftjax's SEQ_CLS adapter (LoRA + the score as modules_to_save) loads in peft with equal
  logits, and peft's loads in ftjax: the head's key is PEFT's `base_model.model.score.weight`."""
  import peft as hf_peft
  from safetensors.numpy import load_file
  ours, _, _ = classifier.load_pretrained(llama_cls_dir)
  ours = _perturbed(peft.get_peft_model(ours, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=("score",))))
  peft.save_adapter(ours, str(tmp_path / "ours"))
  saved = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
  assert [k for k in saved if "score" in k] == ["base_model.model.score.weight"]
  assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
  tokens, mask = _padded("right")
  got = np.asarray(ours(jnp.asarray(tokens), segment_ids=jnp.asarray(mask)))
  theirs = hf_peft.PeftModel.from_pretrained(_hf_load(llama_cls_dir), str(tmp_path / "ours")).eval()
  assert np.abs(_torch_logits(theirs, tokens, mask) - got).max() < TOL

  torch.manual_seed(0)
  trained = hf_peft.get_peft_model(_hf_load(llama_cls_dir), hf_peft.LoraConfig(
      r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS", init_lora_weights=False))
  with torch.no_grad():
    for name, p in trained.named_parameters():
      if "modules_to_save" in name:
        p.add_(0.1)
  trained.save_pretrained(str(tmp_path / "theirs"))
  want = _torch_logits(trained.eval(), tokens, mask)
  back = peft.load_adapter(classifier.load_pretrained(llama_cls_dir)[0], str(tmp_path / "theirs"))
  assert np.abs(np.asarray(back(jnp.asarray(tokens), segment_ids=jnp.asarray(mask))) - want).max() < TOL
  base = _torch_logits(_hf_load(llama_cls_dir), tokens, mask)
  assert np.abs(want - base).max() > 1e-3  # the adapter and head changed the logits


# --- losses and metrics ------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [(), (1.0, 2.0, 0.5, 3.0)])
def test_single_label_loss_is_torch_cross_entropy(weights):
  rng = np.random.RandomState(0)
  logits, labels = rng.randn(6, 4).astype(np.float32), rng.randint(0, 4, 6)
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last row is batch padding
  sums = cls_lib.ClassificationLoss("single_label", weights).sums(
      jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  want = torch.nn.functional.cross_entropy(
      torch.tensor(logits[:5]), torch.tensor(labels[:5]),
      weight=torch.tensor(weights) if weights else None).item()
  assert abs(float(sums["loss_sum"] / sums["count"]) - want) < 1e-6
  if not weights:
    assert float(sums["accuracy"] / sums["count"]) == pytest.approx(np.mean(logits[:5].argmax(-1) == labels[:5]))


@pytest.mark.parametrize("weights", [(), (1.0, 2.0, 0.5)])
def test_multi_label_loss_is_torch_bce_with_logits(weights):
  rng = np.random.RandomState(1)
  logits, targets = 3 * rng.randn(4, 3).astype(np.float32), rng.randint(0, 2, (4, 3)).astype(np.float32)
  sums = cls_lib.ClassificationLoss("multi_label", weights).sums(
      jnp.asarray(logits), jnp.asarray(targets), jnp.ones(4))
  want = torch.nn.functional.binary_cross_entropy_with_logits(
      torch.tensor(logits), torch.tensor(targets),
      weight=torch.tensor(weights) if weights else None).item()
  assert abs(float(sums["loss_sum"] / sums["count"]) - want) < 1e-6


def test_report_matches_sklearn():
  from sklearn.metrics import f1_score, precision_recall_fscore_support
  rng = np.random.RandomState(0)
  names = ["a", "b", "c", "d"]
  y, p = rng.randint(0, 4, 50), rng.randint(0, 4, 50)
  p[:10] = 2  # a frequent confusion
  out = cls_lib.report(y, p, names)
  assert out["accuracy"] == np.mean(y == p)
  assert abs(out["macro_f1"] - f1_score(y, p, average="macro")) < 1e-12
  prec, rec, f1, support = precision_recall_fscore_support(y, p, labels=range(4), zero_division=0)
  for i, n in enumerate(names):
    got = out["per_class"][n]
    assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
        (prec[i], rec[i], f1[i], support[i]))
  pairs = [(names[a], names[b]) for a, b in zip(y, p) if a != b]
  top = max(set(pairs), key=pairs.count)
  assert (out["confusions"][0]["true"], out["confusions"][0]["predicted"]) == top
  assert out["confusions"][0]["count"] == pairs.count(top)


# --- data -----------------------------------------------------------------------------------------

def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_labels_from_train_a_list_or_a_file(tmp_path):
  train = [cls_lib.LabeledText("f:1", "x", ("b",)), cls_lib.LabeledText("f:2", "y", ("a",))]
  assert cls_lib.resolve_labels("", train) == ["a", "b"]
  assert cls_lib.resolve_labels(" z, a ,b") == ["z", "a", "b"]
  (tmp_path / "labels.txt").write_text("one\n\ntwo\n")
  assert cls_lib.resolve_labels(str(tmp_path / "labels.txt")) == ["one", "two"]
  with pytest.raises(FtjaxError, match="listed twice"):
    cls_lib.resolve_labels("a,b,a")


def test_bad_labels_get_codes_at_file_and_line(tmp_path):
  path = _write(tmp_path / "eval.jsonl", [
      {"text": "fine", "label": "a"},
      {"text": "unknown", "label": "zzz"},
      {"text": "empty", "label": "  "},
      {"text": "list", "label": ["a", "b"]},
      {"label": "a"},
      {"utterance": "renamed", "intent": "b"},
  ])
  examples, problems = cls_lib.read_split(path, "single_label")
  problems += cls_lib.check_records(examples, ["a", "b"])
  got = sorted((p.code, p.where) for p in problems)
  assert got == sorted([("empty_label", f"{path}:3"), ("label_list", f"{path}:4"),
                        ("missing_field", f"{path}:5"), ("missing_field", f"{path}:6"),
                        ("unknown_label", f"{path}:2")])
  renamed, _ = cls_lib.read_split(path, "single_label", {"utterance": "input", "intent": "label"})
  assert ("renamed", ("b",)) in [(ex.text, ex.labels) for ex in renamed]
  multi, problems = cls_lib.read_split(path, "multi_label")
  assert ("list", ("a", "b")) in [(ex.text, ex.labels) for ex in multi]
  assert "label_list" not in [p.code for p in problems]


def test_label_signals_name_rare_classes_imbalance_and_conflicts():
  examples = ([cls_lib.LabeledText(f"f:{i}", f"text {i}", ("big",)) for i in range(30)]
              + [cls_lib.LabeledText("f:31", "Text 0!", ("small",))])
  found = {p.code: p for p in cls_lib.label_signals(examples, ["big", "small"])}
  assert set(found) == {"rare_class", "imbalance", "conflicting_labels"}
  assert "'small' has 1" in found["rare_class"].message and found["rare_class"].where == "f:31"
  assert "f:0" in found["conflicting_labels"].message and "f:31" in found["conflicting_labels"].message


# --- training against peft SEQ_CLS + torch AdamW ------------------------------------------------------

def _class_batches(num_labels: int = NUM_LABELS):
  """Three batches of 4 right-padded rows (pad id 0) with class ids."""
  out = []
  for seed in range(3):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, 128, (4, 10)).astype(np.int32)
    segment_ids = np.ones((4, 10), np.int32)
    for row, n in enumerate((10, 6, 3, 8)):
      tokens[row, n:], segment_ids[row, n:] = 0, 0
    out.append({"inputs": tokens, "segment_ids": segment_ids,
                "positions": np.broadcast_to(np.arange(10, dtype=np.int32), (4, 10)).copy(),
                "labels": rng.randint(0, num_labels, 4).astype(np.int32),
                "row_mask": np.ones(4, np.float32)})
  return out


def test_three_lora_adamw_steps_equal_peft_seq_cls(llama_cls_dir, tmp_path):
  """Same init (ftjax's adapter, loaded by peft with is_trainable), same batches: LoRA and the
  score head after three AdamW steps agree within the SFT parity test's 1e-5 (tests/test_step.py
  says why the whole-adapter L2 is the measure)."""
  import functools

  import optax
  import peft as hf_peft
  from ftjax import step as step_lib
  from ftjax.optim import make_optimizer
  from test_step import _torch_adamw, _torch_step, l2_rel

  model = peft.get_peft_model(classifier.load_pretrained(llama_cls_dir)[0], peft.LoraConfig(
      r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=("score",)))
  peft.save_adapter(model, str(tmp_path / "init"))
  init = peft.adapter_state_dict(model)
  reference = hf_peft.PeftModel.from_pretrained(_hf_load(llama_cls_dir), str(tmp_path / "init"),
                                                is_trainable=True)
  graphdef, train, frozen, mutable = step_lib.split_model(model, peft.AdapterParam)
  optimizer, _ = make_optimizer(train, lr=1e-3, steps=3, schedule="constant", weight_decay=0.1,
                                max_grad_norm=1.0)
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, optimizer=optimizer,
                                   loss_fn=cls_lib.ClassificationLoss(),
                                   schedule=optax.constant_schedule(1e-3)))
  state = step_lib.init_state(train, mutable, optimizer, seed=0)
  torch_opt = _torch_adamw(reference.parameters(), 1e-3, 0.1)
  reference.train()
  for batch in _class_batches():
    state, metrics = step(state, frozen, jax.tree.map(lambda x: x[None], batch))
    loss = reference(input_ids=torch.tensor(batch["inputs"]),
                     attention_mask=torch.tensor(batch["segment_ids"]),
                     labels=torch.tensor(batch["labels"]).long()).loss
    assert abs(float(metrics["loss"]) - loss.item()) < 1e-5
    _torch_step(reference, torch_opt, loss)
  trained = step_lib.merge_model(graphdef, state["trainable"], frozen, state["mutable"])
  ours = peft.adapter_state_dict(trained)
  theirs = {k.replace(".default", "").replace("modules_to_save.", ""): v.detach().numpy()
            for k, v in reference.state_dict().items() if "lora_" in k or "modules_to_save" in k}
  assert ours.keys() == theirs.keys() and "base_model.model.score.weight" in ours
  assert l2_rel(ours, theirs) < 1e-5
  for key in ours:
    assert l2_rel({key: ours[key]}, {key: theirs[key]}) < 1e-4, key
  assert l2_rel({"s": ours["base_model.model.score.weight"]},
                {"s": init["base_model.model.score.weight"]}) > 1e-4  # the head trained


# --- prediction -------------------------------------------------------------------------------------

def test_classify_command_labels_a_file_in_batches(model_dir, tmp_path, capsys):
  """Batched and padded predictions equal each text's own unpadded forward pass."""
  from ftjax import classify
  from ftjax.tokenizer import load_tokenizer
  model, _, _ = classifier.load_pretrained(model_dir, num_labels=3)
  tokenizer = load_tokenizer(model_dir)
  out_dir = str(tmp_path / "clf")
  classifier.save_pretrained(model, out_dir, ["neg", "neu", "pos"], tokenizer)
  texts = ["what a great day", "terrible", "it is a table", "fine I guess, nothing special at all"]
  data = _write(tmp_path / "in.jsonl", [{"text": t} for t in texts])
  classify.main(["--model", out_dir, "--data", data, "--output", str(tmp_path / "p.jsonl"),
                 "--batch-size", "3"])
  rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
  assert [r["input"] for r in rows] == texts and rows[1]["where"] == f"{data}:2"
  for row, text in zip(rows, texts):
    ids = jnp.asarray([cls_lib.encode(tokenizer, text, "none")])
    want = cls_lib.probabilities(np.asarray(model(ids, pad_token_id=None)), "single_label")[0]
    got = np.array([row["probabilities"][n] for n in ("neg", "neu", "pos")])
    assert np.abs(got - want).max() < 1e-5
    assert row["label"] == ["neg", "neu", "pos"][int(np.argmax(want))]
  classify.main(["--model", out_dir, "--text", "terrible"])
  assert json.loads(capsys.readouterr().out)["probabilities"] == rows[1]["probabilities"]


# --- the objective in a run ---------------------------------------------------------------------------

INTENTS = {"balance": ["what is my balance", "how much money do i have", "show my account balance",
                       "balance please", "tell me the balance on checking", "current balance"],
           "transfer": ["send 20 dollars to sam", "move money to savings", "transfer funds now",
                        "wire cash to my mom", "pay bob back 5 dollars", "transfer 100 to checking"],
           "card_lost": ["i lost my card", "my card was stolen", "cannot find my credit card",
                         "freeze my lost card", "card missing since yesterday", "report a stolen card"]}


@pytest.fixture(scope="module")
def intent_dir(tmp_path_factory):
  """A synthetic 3-intent set: train.jsonl (4 of each) and eval.jsonl (2 of each, unseen texts)."""
  out = tmp_path_factory.mktemp("intents")
  train = [{"text": t, "label": k} for k, texts in INTENTS.items() for t in texts[:4]]
  test = [{"text": t, "label": k} for k, texts in INTENTS.items() for t in texts[4:]]
  _write(out / "train.jsonl", train)
  _write(out / "eval.jsonl", test)
  return out


def _shipped_config(model_dir, intent_dir, **overrides):
  """configs/classification.py (runlocal) on the tiny model and the synthetic intents."""
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location(
      "classification_config", os.path.join(os.path.dirname(__file__), "..", "configs", "classification.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.model.name_or_path = model_dir
  c.data.train, c.data.eval = str(intent_dir / "train.jsonl"), str(intent_dir / "eval.jsonl")
  c.train.batch_size, c.train.steps, c.mesh.data = 4, 1, 1
  return set_dotted(c, overrides)


def test_shipped_config_trains_one_step_and_exports(model_dir, intent_dir, tmp_path):
  """One LoRA step of configs/classification.py: the merged export is a classifier that
  transformers loads with the run's class names and equal logits, and the adapter is SEQ_CLS."""
  from ftjax import train as train_lib
  summary = train_lib.train(_shipped_config(model_dir, intent_dir), str(tmp_path / "run"))
  assert summary["steps"] == 1 and np.isfinite(summary["eval"]["loss"])
  assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
  details = json.loads((tmp_path / "run" / "eval_metrics.json").read_text())
  assert summary["eval"]["macro_f1"] == details["macro_f1"]
  assert summary["eval"]["accuracy"] == pytest.approx(details["accuracy"])  # loss pass = host pass
  assert set(details["per_class"]) == set(INTENTS)
  merged = str(tmp_path / "run" / "merged")
  theirs = _hf_load(merged)
  assert list(theirs.config.id2label.values()) == ["balance", "card_lost", "transfer"]
  ours, names, _ = classifier.load_pretrained(merged)
  tokens = np.asarray([[5, 6, 7, 8]])
  assert np.abs(_torch_logits(theirs, tokens) - np.asarray(ours(jnp.asarray(tokens)))).max() < TOL
  adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
  assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]
  # the class names are stored with the run: resuming on data with another class set is refused
  more = _write(tmp_path / "more.jsonl", [{"text": "hi", "label": "greeting"}] * 2
                + [{"text": t, "label": k} for k, texts in INTENTS.items() for t in texts[:4]])
  with pytest.raises(FtjaxError, match="objective.json: .*other labels"):
    train_lib.train(_shipped_config(model_dir, intent_dir, **{"data.train": more, "train.steps": 2}),
                    str(tmp_path / "run"), allow_config_change=True)


def test_bad_labels_stop_the_run_at_file_and_line(model_dir, intent_dir, tmp_path):
  from ftjax import train as train_lib
  bad = _write(tmp_path / "eval.jsonl", [{"text": "hello", "label": "greeting"}])
  with pytest.raises(FtjaxError, match=r"eval.jsonl:1: unknown_label: 'greeting'"):
    train_lib.train(_shipped_config(model_dir, intent_dir, **{"data.eval": bad}), str(tmp_path / "run"))


def test_data_check_report_lists_codes_and_label_signals(model_dir, intent_dir, tmp_path):
  """The check `python -m ftjax.data check` and training run: errors at file:line, the label
  signals as warnings, label counts in the quality section, leakage on the texts."""
  from ftjax import objectives
  from ftjax.tokenizer import load_tokenizer
  train = _write(tmp_path / "train.jsonl", [
      {"text": "what is my balance", "label": "balance"},
      {"text": "What is my balance?", "label": "transfer"},
      {"text": "move money", "label": "transfer"},
      {"text": "", "label": ""}])
  config = _shipped_config(model_dir, intent_dir, **{"data.train": train,
                                                     "classification.labels": "balance,transfer"})
  report, kept = objectives.get(config).check_data(load_tokenizer(model_dir))
  found = {(p["code"], p["where"], p["error"]) for p in report["problems"]}
  assert ("empty_label", f"{train}:4", True) in found
  assert ("conflicting_labels", f"{train}:1", False) in found
  assert any(p["code"] == "unknown_label" and p["split"] == "eval" for p in report["problems"])
  assert report["failed"] and len(kept["train"]) == 3
  assert report["quality"]["labels"]["counts"] == {"balance": 1, "transfer": 2}
  assert report["splits"]["train"]["rows"] == 3


def test_clinc150_converts_to_150_balanced_classes(shared_data, tmp_path):
  """scripts/prepare_clinc150.py on the real CLINC150: 150 intents of 100 train examples, every
  test label a train class, no record with a problem."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
  import prepare_clinc150
  train, test = prepare_clinc150.convert(os.path.join(shared_data, "clinc150", "data_full.json"),
                                         str(tmp_path))
  examples, problems = cls_lib.read_split(train, "single_label")
  names = cls_lib.resolve_labels("", examples)
  assert not problems and len(examples) == 15000 and len(names) == 150
  assert not [p for p in cls_lib.label_signals(examples, names) if p.code in ("rare_class", "imbalance")]
  held_out, problems = cls_lib.read_split(test, "single_label")
  assert len(held_out) == 4500 and not problems + cls_lib.check_records(held_out, names)


# --- the report compares with prompting (eval.generate) ------------------------------------------

def test_answers_map_onto_labels_exactly_then_normalised():
  names = ["balance", "card_lost", "Transfer"]
  assert cls_lib.map_answer("card_lost", names) == "card_lost"  # exact
  assert cls_lib.map_answer("  Balance.\n", names) == "balance"  # case, whitespace, edge punctuation
  assert cls_lib.map_answer("transfer", names) == "Transfer"  # normalised to the name as declared
  assert cls_lib.map_answer("card lost", names) is None  # inner characters are not guessed
  assert cls_lib.map_answer("The answer is balance", names) is None
  spread = cls_lib.spread_over_classes([cls_lib.LabeledText(f"f:{i}", "t", (k,))
                                        for i, k in enumerate("aaabbc")])
  assert [ex.where for ex in spread] == ["f:0", "f:3", "f:5", "f:1", "f:4", "f:2"]
  labels, unmapped = cls_lib.map_answers(["balance", "BALANCE!", "", "wire"], names)
  assert labels == ["balance", "balance", "", ""] and unmapped == 2
  # exact wins over normalised when two names normalise alike
  assert cls_lib.map_answer("Balance", ["balance", "Balance"]) == "Balance"


@pytest.fixture(scope="module")
def prompting_run(model_dir, intent_dir, tmp_path_factory):
  """A one-step classification run with eval.generate: zero-shot and 2-shot prompting of the
  base LM against the tuned classifier, report written."""
  from ftjax import train as train_lib
  workdir = tmp_path_factory.mktemp("cls_prompting") / "run"
  config = _shipped_config(model_dir, intent_dir, **{
      "eval.generate": True, "eval.forgetting": False, "eval.metrics": "accuracy,label_accuracy",
      "eval.few_shot": 2, "eval.max_new_tokens": 4, "eval.bootstrap": 200,
      "export.merged": False})
  summary = train_lib.train(config, str(workdir))
  return workdir, summary


def test_report_compares_the_classifier_with_prompting(prompting_run):
  from ftjax.evaluation import report as report_lib
  workdir, summary = prompting_run
  results = json.loads((workdir / "eval_results.json").read_text())
  assert list(results["baselines"]) == ["zero-shot", "2-shot"]
  # the shots show two classes (train.jsonl is grouped by class: lines 1 and 5)
  assert [s.rsplit(":", 1)[1] for s in results["shots"]] == ["1", "5"]
  assert results["examples"] == 6 and results["references"][0] in INTENTS
  for name, r in results["baselines"].items():
    assert len(r["answers"]) == 6 and 0 <= r["unmapped"] <= 6
    assert r["unmapped"] == sum(p == "" for p in r["predictions"])
    assert all(p in ("", *INTENTS) for p in r["predictions"])
    assert 0.0 <= r["scores"]["label_accuracy"] <= 1.0
  tuned = results["finetuned"]
  # the fine-tuned system is the classifier's argmax: class names, scored as eval accuracy is
  assert all(p in INTENTS for p in tuned["predictions"])
  assert tuned["scores"]["label_accuracy"] == pytest.approx(summary["eval"]["accuracy"])
  diff = results["finetuned_minus"]["label_accuracy"]["zero-shot"]
  assert diff["ci95"][0] <= diff["difference"] <= diff["ci95"][1]
  assert results["verdict"]["metric"] == "label_accuracy"
  assert set(results["ci95"]) == {"zero-shot", "2-shot", "fine-tuned"}
  report = (workdir / "report.md").read_text()
  assert f"**Verdict: {results['verdict']['text']}**" in report
  assert "| zero-shot | " in report and "| fine-tuned | " in report
  assert "Answers that named no class (exact, then normalised match; counted wrong): zero-shot " in report
  assert (workdir / "confusion.png").stat().st_size > 1000
  assert "![confusion matrix, fine-tuned](confusion.png)" in report
  first = results["baselines"]["zero-shot"]  # a sample shows the answer and the class it names
  assert (f"- zero-shot: `{report_lib._cell(first['answers'][0])}` -> "
          f"{first['predictions'][0] or 'no class'}") in report


def test_confusion_matrix_names_the_most_confused_classes_and_sums_the_rest():
  from ftjax.evaluation import plots
  refs = [f"c{i:02d}" for i in range(30)] + ["c00", "c01"]
  preds = list(refs[:30]) + ["c05", "c07"]  # c00 -> c05 and c01 -> c07 confused, the rest right
  classes = plots.confusion_classes(refs, preds, top=4)
  assert classes == ["c00", "c01", "c05", "c07"]
  labels, counts = plots.confusion_counts(refs, preds, classes)
  assert labels == classes + [plots.OTHER]
  assert counts[0, 2] == 1 and counts[1, 3] == 1 and counts[-1, -1] == 26
  assert counts.sum() == len(refs)


@pytest.mark.parametrize("tied", [True, False])
def test_baselines_generate_with_the_base_lm_on_the_classifiers_decoder(model_dir, hf_llama_dir, tied,
                                                                       tmp_path):
  """The causal LM the prompting baselines use shares the classifier's decoder (no copy) and
  computes the base LM's logits exactly; an untied vocab head, which the classifier drops, is
  read back from the base model (hf_llama_dir's head is untied), and without it refused."""
  import shutil
  from ftjax import models
  from tiny import tiny_tokenizer
  path = model_dir
  if not tied:  # hf_llama_dir with a tokenizer beside it, as a model folder has
    path = str(shutil.copytree(hf_llama_dir, tmp_path / "untied"))
    tiny_tokenizer().save(path)
  lm, _ = models.load(path)
  assert lm.config.tie_word_embeddings == tied
  clf = classifier.SequenceClassifier.from_causal_lm(lm, 3)
  plan = cls_lib.ClassificationPlan([], [], [], [], [], {}, None, None, model_path=path)
  shell = plan.base_lm(clf)
  assert shell.model is clf.model
  tokens = jnp.asarray([[5, 6, 7, 8]])
  want = np.asarray(lm(tokens))
  assert np.abs(want).max() > 0.01 and np.abs(np.asarray(shell(tokens)) - want).max() == 0.0
  if not tied:
    with pytest.raises(FtjaxError, match="untied vocab head"):
      cls_lib.causal_lm_on(clf)


@pytest.mark.parametrize("overrides, message", [
    ({"classification.problem_type": "multi_label"}, "single_label only"),
    ({"eval.forgetting": True}, "set eval.forgetting=False")])
def test_generate_under_classification_refuses_what_it_cannot_compare(model_dir, intent_dir,
                                                                     overrides, message):
  from ftjax import objectives
  config = _shipped_config(model_dir, intent_dir, **{"eval.generate": True, "eval.forgetting": False,
                                                     **overrides})
  with pytest.raises(FtjaxError, match=message):
    objectives.get(config).validate()
