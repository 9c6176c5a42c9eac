"""`python -m ftjax.data check`: every problem with its code and line, policies, quality, leakage."""

import json
import os
import random
import re
import subprocess
import sys

import pytest

from ftjax.config import base_config
from ftjax.data import formats, quality, selection, similarity, sources
from ftjax.data import report as data_report
from ftjax.data_check import run_check
from ftjax.errors import FtjaxError
from tiny import tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = " ".join(f"word{i}" for i in range(300))
NEAR_A = ("the committee met on tuesday to review the annual budget for the city library and "
          "agreed to extend the opening hours during the winter months for students")
NEAR_B = NEAR_A.replace("tuesday", "thursday")  # one word of 27 changed


def _char_jaccard(a, b, n=5):
  """The near-duplicate measure written plainly, for texts with no boilerplate shingle."""
  def grams(text):
    s = " ".join(re.findall(r"\w+", text.casefold()))
    return {s[i:i + n] for i in range(len(s) - n + 1)}
  return len(grams(a) & grams(b)) / len(grams(a) | grams(b))


def _chat(user, assistant, role="assistant"):
  return json.dumps({"messages": [{"role": "user", "content": user},
                                  {"role": role, "content": assistant}]})


# line -> code ("" for a valid record); line 17 is not UTF-8
PLANTED = [
  (_chat("what is the capital of france", "paris"), ""),
  ("{not json", "bad_json"),
  ("[1, 2]", "data_type"),
  (json.dumps({"prompt": "no messages here"}), "missing_field"),
  (_chat("hi", "hello", role="bot"), "unknown_role"),
  (_chat("say nothing", "   "), "empty_output"),
  (_chat("repeat a lot", LONG), "over_length"),
  (_chat("Name a colour.", "Blue"), ""),
  (_chat("  name a   COLOUR ", "blue."), ""),  # exact duplicate of line 8 once normalised
  (_chat(NEAR_A, "noted"), ""),
  (_chat(NEAR_B, "noted"), ""),  # near duplicate of line 10
  (_chat("is water wet", "yes"), ""),
  (_chat("is water wet", "no"), ""),  # conflicting output for line 12's input
  (json.dumps({"messages": [{"role": "user", "content": 7},
                            {"role": "assistant", "content": "x"}]}), "wrong_type"),
  (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no_assistant_turn"),
  ("", ""),  # blank line: not a record
  (None, "bad_encoding"),
]
EXPECTED = [(i + 1, code) for i, (_, code) in enumerate(PLANTED) if code]


def _write_planted(path):
  with open(path, "wb") as f:
    for text, _ in PLANTED:
      f.write(b'{"messages": "\xff\xfe"}\n' if text is None else text.encode() + b"\n")
  return str(path)


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def _config(train, eval_="", **data):
  c = base_config()
  c.data.train, c.data.eval, c.data.seq_len = train, eval_, 256
  for key, value in data.items():
    if key in ("on_error", "drop_leaked", "near_dup"):
      c.data.check[key] = value
    else:
      c.data[key] = value
  return c


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer()


def test_every_problem_with_code_and_line(tmp_path, tok):
  path = _write_planted(tmp_path / "bad.jsonl")
  report, kept = selection.check(_config(path, length_policy="error"), tok)
  found = [(int(p["where"].rsplit(":", 1)[1]), p["code"]) for p in report["problems"]]
  assert sorted(found) == EXPECTED
  assert all(p["where"].startswith(path + ":") for p in report["problems"])
  assert report["counts"] == {code: 1 for _, code in EXPECTED}
  assert report["errors"] == len(EXPECTED) and report["failed"]
  q = report["quality"]
  assert q["exact_duplicates"]["listed"] == [[f"{path}:8", f"{path}:9"]]
  near = q["near_duplicates"]["listed"]
  assert [(p["a"], p["b"]) for p in near] == [(f"{path}:10", f"{path}:11")]
  # too few texts for any shingle to be boilerplate: plain Jaccard of character 5-gram sets
  expected = _char_jaccard(NEAR_A + "\nnoted", NEAR_B + "\nnoted")
  assert near[0]["similarity"] == pytest.approx(expected, abs=1e-4) and expected < 1
  assert q["conflicting_outputs"]["listed"] == [[f"{path}:12", f"{path}:13"]]
  assert {ex.where for ex in kept["train"]} == {f"{path}:{i}" for i in (1, 8, 9, 10, 11, 12, 13)}


def test_json_array_and_csv_report_every_problem(tmp_path, tok):
  array = tmp_path / "bad.json"
  array.write_bytes(b'[\n{"input": "a b", "output": "c"},\n{"input": "d" "output": "e"},\n'
                    b'{"input": "f", "output": "g"},\n{"input": "\xff", "output": "h"},\n'
                    b'{"input": "i", output: 1},\n{"input": "j ]", "output": "k"},\n'
                    b'{"input": "spans",\n "output": "\xfe two lines"}\n]\n')
  csv = tmp_path / "bad.csv"
  csv.write_text('input,output\na b,c\n"two\nlines",d\ne,f,g\nh\ni,\n"j, k",l\n')
  report, kept = selection.check(_config(f"{array},{csv}", on_error="skip"), tok)
  found = [(p["where"].rsplit("/", 1)[1], p["code"]) for p in report["problems"]]
  assert found == [("bad.json:3", "bad_json"), ("bad.json:5", "bad_encoding"),
                   ("bad.json:6", "bad_json"), ("bad.json:9", "bad_encoding"), ("bad.csv:5", "bad_csv"), ("bad.csv:6", "bad_csv"),
                   ("bad.csv:7", "wrong_type")]  # an empty cell is None, as pandas reads it
  assert [ex.where.rsplit("/", 1)[1] for ex in kept["train"]] == [
      "bad.json:2", "bad.json:4", "bad.json:7", "bad.csv:2", "bad.csv:3", "bad.csv:8"]
  assert kept["train"][4].messages[0]["content"] == "two\nlines"


def test_a_failed_check_still_prices_auto_epochs(tmp_path, tok):
  """The cost plan of a failed check resolves train.epochs="auto" from the records that passed
  (what the run would train on once the bad ones are fixed), not the default step count."""
  c = _config(_write_planted(tmp_path / "bad.jsonl"))
  c.train.epochs = "auto"
  report = run_check(c, tok, out_dir=str(tmp_path / "out"), probe=False)
  assert report["failed"] and report["auto"]
  assert report["cost"]["steps"] == c.train.steps != base_config().train.steps


def test_over_length_follows_length_policy(tmp_path, tok):
  path = _write_planted(tmp_path / "bad.jsonl")
  report, kept = selection.check(_config(path, length_policy="truncate", on_error="skip"), tok)
  over = [p for p in report["problems"] if p["code"] == "over_length"]
  assert len(over) == 1 and not over[0]["error"] and "(truncated)" in over[0]["message"]
  assert f"{path}:7" in {ex.where for ex in kept["train"]}
  assert report["splits"]["train"]["truncated"] == 1
  assert report["splits"]["train"]["skipped"] == len(EXPECTED) - 1
  assert not report["failed"]


def _cli(model_dir, out, *overrides):
  args = [sys.executable, "-m", "ftjax.data", "check", "--config", "configs/quickstart.py",
          f"--out={out}", f"--config.model.name_or_path={model_dir}", "--config.data.generate=",
          "--config.data.eval=", "--config.eval.generate=False", "--config.data.system_prompt=",
          "--config.data.seq_len=256", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_fail_policy_names_every_line(tmp_path, model_dir):
  path = _write_planted(tmp_path / "bad.jsonl")
  out = tmp_path / "out"
  r = _cli(model_dir, out, f"--config.data.train={path}", "--config.data.length_policy=error")
  assert r.returncode == 1, r.stderr
  assert f"{len(EXPECTED)} data problems" in r.stderr
  for line, code in EXPECTED:
    assert f"{path}:{line}: " in r.stderr, code
  assert "compil" not in (r.stderr + r.stdout).lower()  # nothing was built: data only
  report = json.loads((out / "data_report.json").read_text())
  assert report["failed"] and len(report["problems"]) == len(EXPECTED)
  assert f"report: {out / 'data_report.json'}" in r.stdout  # not silently in some folder


def test_cli_skip_policy_counts_skipped(tmp_path, model_dir):
  path = _write_planted(tmp_path / "bad.jsonl")
  r = _cli(model_dir, tmp_path, f"--config.data.train={path}", "--config.data.check.on_error=skip",
           "--config.data.length_policy=drop")
  assert r.returncode == 0, r.stderr
  report = json.loads((tmp_path / "data_report.json").read_text())
  train = report["splits"]["train"]
  assert train["skipped"] == len(EXPECTED) - 1  # over_length is dropped by the length policy
  assert train["dropped"] == 1 and train["kept"] == 7
  assert "records skipped" in r.stdout
  # the cost plan, from a probe of the real step (tests/test_cost.py checks its arithmetic)
  cost = report["cost"]
  assert cost["steps"] == 20 and cost["here"]["step_s"] > 0 and cost["memory"]["fits"]
  assert "cost plan: 20 steps" in r.stdout and "peak memory" in r.stdout


def test_cli_config_error_exits_2(tmp_path, model_dir):
  r = _cli(model_dir, tmp_path, "--config.data.train=x.jsonl", "--config.data.check.on_error=maybe")
  assert r.returncode == 2 and "data.check.on_error" in r.stderr


def test_leakage_found_and_dropped(tmp_path, tok):
  train = _write(tmp_path / "train.jsonl", [
    json.dumps({"input": "What is the boiling point of water at sea level?", "output": "100 C"}),
    json.dumps({"input": NEAR_A, "output": "ok"}),
    json.dumps({"input": "Who wrote the novel about a white whale?", "output": "Melville"}),
    json.dumps({"input": "Translate 'cat' to French.", "output": "chat"}),
  ])
  paraphrase = NEAR_A.replace("agreed to", "decided to").replace("winter months", "cold months")
  eval_ = _write(tmp_path / "eval.jsonl", [
    json.dumps({"input": "what is the boiling point of   WATER at sea level", "output": "100"}),
    json.dumps({"input": paraphrase, "output": "ok"}),
    json.dumps({"input": "How many legs does a spider have?", "output": "8"}),
  ])
  report, kept = selection.check(_config(train, eval_), tok)
  leaks = {(p["train"], p["eval"], p["kind"]): p["similarity"] for p in report["leakage"]["listed"]}
  assert set(leaks) == {(f"{train}:1", f"{eval_}:1", "exact"), (f"{train}:2", f"{eval_}:2", "near")}
  assert leaks[(f"{train}:1", f"{eval_}:1", "exact")] == 1.0
  assert 0.4 <= leaks[(f"{train}:2", f"{eval_}:2", "near")] < 1.0
  assert len(kept["train"]) == 4  # drop_leaked off: reported only

  kept = selection.clean_examples(_config(train, eval_, drop_leaked=True), tok)
  assert [ex.where for ex in kept["train"]] == [f"{train}:3", f"{train}:4"]
  assert len(kept["eval"]) == 3


def test_training_uses_the_checked_examples(tmp_path, tok):
  from ftjax.run import build_datasets
  path = _write_planted(tmp_path / "bad.jsonl")
  train_ds, eval_ds = build_datasets(_config(path, on_error="skip"), tok)
  assert eval_ds is None
  assert sorted(ex.where for ex in train_ds.examples) == [
      f"{path}:{i}" for i in (1, 10, 11, 12, 13, 7, 8, 9)]  # string order; 7 truncated
  assert train_ds.summary["truncated"] == 1
  with pytest.raises(FtjaxError, match=r"(?s)8 data problems.*bad\.jsonl:17: not valid UTF-8"):
    build_datasets(_config(path), tok)  # default (fail): the problems stop the run, all listed


def test_labels_and_repeated_outputs(tok):
  from ftjax.data.formats import Example

  def ex(i, q, a):
    return Example(f"x.jsonl:{i}", messages=[{"role": "user", "content": q, "weight": 0},
                                             {"role": "assistant", "content": a, "weight": 1}])
  examples = [ex(i, f"review number {i}", "positive" if i % 2 else "negative") for i in range(20)]
  examples.append(ex(20, "review number 20", "neutral"))
  q = quality.quality(examples, {id(e): 10 for e in examples}, threshold=0.4)
  assert q["labels"]["counts"] == {"positive": 10, "negative": 10, "neutral": 1}
  assert q["labels"]["rare"] == ["neutral"]
  assert {r["output"] for r in q["repeated_outputs"]} == {"positive", "negative"}
  assert "skipped" in q["length_outliers"]  # too few examples for percentiles


def test_markdown_section(tmp_path, tok):
  path = _write_planted(tmp_path / "bad.jsonl")
  report, _ = selection.check(_config(path, on_error="skip"), tok)
  md = data_report.markdown(report)
  assert md.startswith("## Data check") and "`bad_json` 1" in md and "| train | 8 |" in md


# gsm8k (test line, train line) pairs restating one problem with names / numbers / the question
# changed, read one by one; the first three are the ones the word 5-gram measure found.
GSM8K_REWRITES = {(633, 21): 0.649, (603, 5163): 0.622, (603, 1315): 0.606, (825, 3727): 0.449,
                  (598, 6656): 0.439, (975, 2601): 0.405, (449, 1782): 0.388, (580, 2579): 0.366,
                  (919, 7286): 0.354, (497, 3428): 0.319, (303, 3053): 0.312, (980, 4241): 0.308,
                  (356, 6291): 0.302}


def test_gsm8k_train_test_leakage(shared_data):
  """The calibration on long texts: every train/test pair at or above 0.3 (9.9 M pairs) is one
  of the rewrites read by hand (no unrelated pair), and at the default 0.4 the leaks are the
  six closest of them, the word 5-gram measure's three included."""
  fields = {"question": "input", "answer": "output"}
  splits = {}
  for name in ("train", "test"):
    records, problems = sources.read_all(os.path.join(shared_data, "gsm8k", f"{name}.jsonl"))
    splits[name], invalid = formats.validate_records(records, fields=fields)
    assert not problems and not invalid
  leaks = quality.leakage(splits["train"], splits["test"], threshold=0.3)
  found = {(int(p["eval"].rsplit(":", 1)[1]), int(p["train"].rsplit(":", 1)[1])): p["similarity"]
           for p in leaks}
  assert {p["kind"] for p in leaks} == {"near"}
  assert found == pytest.approx(GSM8K_REWRITES, abs=1e-3)
  assert sum(s >= 0.4 for s in found.values()) == 6  # at the default threshold


LISTING = "Used city bike, blue, for sale in very good condition with new tyres, asking 469 euros"
RELISTED = "Used city bike, blue, on sale in very good condition with new tyres, Asking 469 EUR"
OTHER_LISTINGS = [
  "Wooden dining table with four chairs, some scratches, pick up only, 120 euros",
  "Selling a used washing machine, 7 kg, works fine, collection from Lyon",
  "Two concert tickets for Saturday night, row 12, face value",
  "Baby stroller in great shape, folds flat, rain cover included, 80 euros or best offer",
]


def test_short_text_near_duplicate_reported_with_both_locations(tmp_path, tok):
  """A one-line listing and its copy with 2 of 16 words changed and one case changed: a leak
  and, in one split, a near duplicate, each with both locations (word 5-grams scored it 0.33)."""
  records = [json.dumps({"input": t, "output": "listing"}) for t in OTHER_LISTINGS]
  train = _write(tmp_path / "train.jsonl", records + [json.dumps({"input": LISTING, "output": "ok"})])
  eval_ = _write(tmp_path / "eval.jsonl", [json.dumps({"input": RELISTED, "output": "ok"})])
  report, _ = selection.check(_config(train, eval_), tok)
  assert [(p["train"], p["eval"], p["kind"]) for p in report["leakage"]["listed"]] == [
      (f"{train}:5", f"{eval_}:1", "near")]
  assert report["leakage"]["listed"][0]["similarity"] == pytest.approx(
      _char_jaccard(LISTING, RELISTED), abs=1e-4)

  both = _write(tmp_path / "both.jsonl", records + [json.dumps({"input": LISTING, "output": "a"}),
                                                    json.dumps({"input": RELISTED, "output": "a"})])
  report, _ = selection.check(_config(both), tok)
  near = report["quality"]["near_duplicates"]["listed"]
  assert [(p["a"], p["b"]) for p in near] == [(f"{both}:5", f"{both}:6")]
  text = data_report.summary_text(report)
  assert f"near duplicate {near[0]['similarity']:.2f}: {both}:5 ~ {both}:6" in text


def _messages(n, seed):
  """n short messages of 5-9 words, none sharing a word with another (they all differ)."""
  rng = random.Random(seed)
  letters = "abcdefghijklmnopqrstuvwxyz"
  words = list({"".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(20 * n)})
  out, at = [], 0
  for _ in range(n):
    k = rng.randint(5, 9)
    out.append(" ".join(words[at:at + k]))
    at += k
  return out


INSTRUCTION = ("You are a customer support assistant for a bank. Classify the customer's message "
               "into exactly one of the intents you were given and reply with the intent name only.")


def test_a_shared_instruction_line_makes_no_near_duplicates(tmp_path, tok):
  """1 instruction line + "Message: " + a short message that differs from every other: no near
  duplicate, no leak, drop_leaked drops nothing; a relisted message under the same instruction
  is still found (the instruction is ignored, not the check)."""
  messages = _messages(260, seed=0)
  def record(message, i):
    return json.dumps({"input": f"{INSTRUCTION}\nMessage: {message}", "output": f"intent{i % 7}"})
  train = _write(tmp_path / "train.jsonl", [record(m, i) for i, m in enumerate(messages[:200])]
                 + [record(LISTING, 0)])
  eval_ = _write(tmp_path / "eval.jsonl", [record(m, i) for i, m in enumerate(messages[200:])]
                 + [record(RELISTED, 0)])
  report, kept = selection.check(_config(train, eval_, drop_leaked=True), tok)
  assert report["quality"]["near_duplicates"]["pairs"] == 0
  assert [(p["train"], p["eval"]) for p in report["leakage"]["listed"]] == [
      (f"{train}:201", f"{eval_}:61")]
  assert report["leakage"]["dropped_from_train"] == 1 and len(kept["train"]) == 200


def test_boilerplate_shingles_do_not_count():
  """The rule in isolation: a shingle in more than COMMON_SHARE of a split's texts counts in
  neither the intersection nor the union, so a shared prefix leaves the messages' own score."""
  messages = _messages(40, seed=1)
  prefixed = [f"{INSTRUCTION}\nMessage: {m}" for m in messages]
  assert similarity.similar_pairs(prefixed, None, 0.05) == []
  assert similarity.similar_pairs(prefixed[:30], prefixed[30:], 0.05) == []
  pair = [f"{INSTRUCTION}\nMessage: {LISTING}", f"{INSTRUCTION}\nMessage: {RELISTED}"]
  (i, j, score), = similarity.similar_pairs(prefixed + pair, None, 0.4)
  assert (i, j) == (40, 41) and score == pytest.approx(_char_jaccard(LISTING, RELISTED), abs=0.05)


def _templated(n, seed):
  """n distinct short texts from 3 templates whose every slot value is in > 5% of them."""
  rng = random.Random(seed)
  templates = ["send {a} to {n}", "I want to transfer {a} to {n} {w}",
               "move {a} from my {c} account to {n}"]
  slots = {"a": ["50 euros", "$120", "300 pounds", "1,000 CHF", "75 dollars"],
           "c": ["savings", "checking", "joint", "business"],
           "n": ["Anna", "my landlord", "Mr. Okafor", "the garage", "Li Wei", "my sister"],
           "w": ["today", "yesterday", "on Saturday", "right now"]}
  out = []
  while len(out) < n:
    text = rng.choice(templates).format(**{k: rng.choice(v) for k, v in slots.items()})
    if text not in out:
      out.append(text)
  return out


def test_texts_left_with_a_few_shingles_are_not_near_identical(monkeypatch):
  """When boilerplate takes all of two short texts but a shingle or two, those must not make
  them near duplicates: without MIN_SHARED 63 of these 200 x 40 pairs scored 1.0 ("send 50
  euros to Li Wei" / "send 50 euros to the garage")."""
  texts = _templated(240, seed=0)
  assert similarity.similar_pairs(texts[:200], texts[200:], 0.4) == []
  monkeypatch.setattr(similarity, "MIN_SHARED", 1)  # the guard is what keeps them apart
  assert len(similarity.similar_pairs(texts[:200], texts[200:], 0.4)) > 10


def test_summary_lists_locations_and_report_path(tmp_path, tok):
  path = _write_planted(tmp_path / "bad.jsonl")
  report = run_check(_config(path, on_error="skip"), tok, out_dir=str(tmp_path / "out"),
                           probe=False)
  text = data_report.summary_text(report)
  assert f"duplicate: {path}:8 = {path}:9" in text
  assert f"near duplicate " in text and f"{path}:10 ~ {path}:11" in text
  assert f"conflicting outputs: {path}:12 / {path}:13" in text
  written = tmp_path / "out" / "data_report.json"
  assert f"report: {written}" in text and json.loads(written.read_text())["quality"]


def test_input_output_codes_with_field_renaming():
  from ftjax.data.sources import Record
  records = [Record("q.jsonl:1", {"question": "2+2?", "answer": "4"}),
             Record("q.jsonl:2", {"question": "3+3?"}),
             Record("q.jsonl:3", {"question": "4+4?", "answer": 8}),
             Record("q.jsonl:4", {"question": "5+5?", "answer": " "})]
  examples, problems = formats.validate_records(records, fields={"question": "input", "answer": "output"})
  assert [ex.where for ex in examples] == ["q.jsonl:1"]
  assert [(p.where, p.code) for p in problems] == [
      ("q.jsonl:2", "missing_field"), ("q.jsonl:3", "wrong_type"), ("q.jsonl:4", "empty_output")]
