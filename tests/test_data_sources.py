"""HF `datasets` sources (save_to_disk folders, Hub names, more file formats), mixing sources
by weight, and a held-out eval split carved from train."""

import collections
import json

import pytest

from ftjax.config import base_config, validate
from ftjax.data import selection, sources
from ftjax.data import report as data_report
from ftjax.errors import FtjaxError
from ftjax.run import build_datasets
from tiny import tiny_tokenizer

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer()


def _rows(n, tag):
  return [{"question": f"{tag} question number {i} about a topic", "answer": f"{tag} answer {i}"}
          for i in range(n)]


def _config(train, eval_="", **data):
  c = base_config()
  c.data.train, c.data.eval, c.data.seq_len = train, eval_, 128
  c.data.fields = "question:input,answer:output"
  for key, value in data.items():
    c.data[key] = value
  validate(c)
  return c


def test_save_to_disk_folders(tmp_path, tok):
  single = str(tmp_path / "single")
  datasets.Dataset.from_list(_rows(6, "a")).save_to_disk(single)
  splits = str(tmp_path / "splits")
  datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(4, "b")),
                        "test": datasets.Dataset.from_list(_rows(3, "c"))}).save_to_disk(splits)
  report, kept = selection.check(_config(single, f"{splits}?split=test"), tok)
  assert [ex.where for ex in kept["train"]] == [f"{single}:{i}" for i in range(1, 7)]
  assert [ex.where for ex in kept["eval"]] == [f"{splits}?split=test:{i}" for i in range(1, 4)]
  assert kept["eval"][0].messages[0]["content"] == "c question number 0 about a topic"
  _, kept = selection.check(_config(splits), tok)  # a DatasetDict: train by default
  assert len(kept["train"]) == 4
  with pytest.raises(FtjaxError, match=r"no split 'dev'; this folder holds \['test', 'train'\]"):
    sources.read_records(f"{splits}?split=dev")
  with pytest.raises(FtjaxError, match="unknown option"):
    sources.read_records(f"{splits}?spilt=test")


def test_hub_dataset_without_hub_access_is_a_clear_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  with pytest.raises(FtjaxError, match=r"hub:openai/gsm8k\?config=main&split=test&revision=main: could not load "
                                       r"'openai/gsm8k' \(split 'test'\) from the Hugging Face Hub "
                                       r"\(offline.*save_to_disk"):
    sources.read_records("hub:openai/gsm8k?config=main&split=test&revision=main")


def test_other_file_formats(tmp_path, tok):
  tsv = tmp_path / "d.tsv"
  tsv.write_text("question\tanswer\n" + "".join(f"q{i}, with a comma\ta{i}\n" for i in range(3)))
  arrow_dir = tmp_path / "arrow"
  datasets.Dataset.from_list(_rows(2, "z")).save_to_disk(str(arrow_dir))
  arrow = next(arrow_dir.glob("*.arrow"))
  _, kept = selection.check(_config(f"{tsv},{arrow}"), tok)
  assert [ex.where for ex in kept["train"]] == [f"{tsv}:2", f"{tsv}:3", f"{tsv}:4",
                                                f"{arrow}:1", f"{arrow}:2"]
  assert kept["train"][0].messages[0]["content"] == "q0, with a comma"


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_mix_by_weight(tmp_path, tok):
  small = _write(tmp_path / "small.jsonl", _rows(10, "s"))
  large = _write(tmp_path / "large.jsonl", _rows(30, "l"))
  report, kept = selection.check(_config(f"{small}, {large}", mix="1,1"), tok)
  drawn = collections.Counter(ex.where for ex in kept["train"])
  assert sum(n for w, n in drawn.items() if w.startswith(small)) == 20
  assert {n for w, n in drawn.items() if w.startswith(small)} == {2}  # every small example twice
  assert sum(n for w, n in drawn.items() if w.startswith(large)) == 20
  assert len([w for w in drawn if w.startswith(large)]) == 20  # 20 of the 30, once each
  assert [(m["source"], m["examples"], m["drawn"]) for m in report["mix"]] == [
      (small, 10, 20), (large, 30, 20)]
  assert report["quality"]["exact_duplicates"]["examples"] == 0  # judged before the mix
  with pytest.raises(FtjaxError, match="data.mix has 3 weights for 2 train sources"):
    selection.check(_config(f"{small},{large}", mix="1,1,1"), tok)
  with pytest.raises(FtjaxError, match="data.mix='1,x'"):
    _config(small, mix="1,x")


def test_eval_carved_from_train(tmp_path, tok):
  path = _write(tmp_path / "all.jsonl", _rows(50, "r"))
  c = _config(path, eval_fraction=0.2, eval_seed=1)
  report, kept = selection.check(c, tok)
  train, held = {ex.where for ex in kept["train"]}, {ex.where for ex in kept["eval"]}
  assert len(held) == 10 and len(train) == 40 and not train & held
  assert report["splits"]["eval"]["carved_from_train"] == 10
  assert report["leakage"]["pairs"] == 0
  _, again = selection.check(c, tok)
  assert {ex.where for ex in again["eval"]} == held  # the seed decides
  _, other = selection.check(_config(path, eval_fraction=0.2, eval_seed=2), tok)
  assert {ex.where for ex in other["eval"]} != held
  train_ds, eval_ds = build_datasets(c, tok)
  assert train_ds.summary["examples"] == 40 and eval_ds.summary["examples"] == 10


def test_csv_cell_over_the_csv_modules_field_limit_reads_whole_and_the_rows_after_it_too(
    tmp_path, tok):
  import csv
  # 131,072 characters is the csv module's default limit; past it the old reader stopped the
  # whole file, and under on_error="skip" the rows after the long cell vanished unreported.
  long_answer = "word " * 40_000  # 200,000 characters
  lines = ["question,answer", f"a long one,{long_answer}"]
  lines += [f"question {i},answer {i}" for i in range(17)]
  path = tmp_path / "long.csv"
  path.write_text("\n".join(lines) + "\n")
  limit = csv.field_size_limit()
  records, problems = sources.read_all(str(path))
  assert problems == [] and len(records) == 18
  assert records[0].data["answer"] == long_answer and records[-1].where.endswith("long.csv:19")
  assert csv.field_size_limit() == limit  # the process-wide limit is put back
  c = _config(str(path))
  c.data.check.on_error = "skip"
  report, kept = selection.check(c, tok)
  assert report["problems"] == [] or {p["code"] for p in report["problems"]} == {"over_length"}
  assert len(kept["train"]) == 18 and not report["failed"]


def test_a_csv_row_the_csv_module_refuses_is_reported_at_its_line_and_reading_goes_on(
    tmp_path, monkeypatch):
  import contextlib
  import csv
  # Any csv.Error (here the field limit, kept low on purpose) costs its row only.
  monkeypatch.setattr(sources, "_csv_field_limit", lambda at_least: contextlib.nullcontext(),
                      raising=False)
  path = tmp_path / "d.csv"
  path.write_text("question,answer\nq1,a1\nq2," + "x" * 200 + "\nq3,a3\n\"q4\nstill q4\",a4\n")
  limit = csv.field_size_limit(100)
  try:
    records, problems = sources.read_all(str(path))
  finally:
    csv.field_size_limit(limit)
  assert [(p.code, p.where.rsplit("/", 1)[1]) for p in problems] == [("bad_csv", "d.csv:3")]
  assert "field larger than field limit" in problems[0].message
  assert [(r.where.rsplit("/", 1)[1], r.data["question"]) for r in records] == [
      ("d.csv:2", "q1"), ("d.csv:4", "q3"), ("d.csv:5", "q4\nstill q4")]


def _empty_splits(report):
  return {p["split"]: p["message"] for p in report["problems"] if p["code"] == "empty_split"}


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_an_empty_or_emptied_split_fails_the_check_naming_why(tmp_path, tok, on_error):
  # Each of these said "result: ok" and training then stopped with "no examples left after the
  # length policy" (or, for drop_leaked, trained on nothing).
  good = _write(tmp_path / "good.jsonl", _rows(4, "g"))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  bad = _write(tmp_path / "bad.jsonl", [{"question": "q", "answer": 3}] * 3)

  def run(train, eval_="", drop_leaked=False, **data):
    c = _config(train, eval_, **data)
    c.data.check.on_error, c.data.check.drop_leaked = on_error, drop_leaked
    report, _ = selection.check(c, tok)
    assert report["failed"] and data_report.summary_text(report).endswith("result: FAILED")
    assert "empty_split" in selection.failure_message(report)
    return _empty_splits(report)

  assert run(str(empty)) == {"train": f"data.train ({empty}): empty_split: no examples left: "
                                      "no records: the data is empty"}
  assert set(run(good, str(empty))) == {"eval"}
  assert "every record has a problem (3 records" in run(bad)["train"]
  one = _write(tmp_path / "one.jsonl", _rows(1, "o"))
  assert "data.eval_fraction=0.5 held out no record of the 1 valid" in run(one, eval_fraction=0.5)["eval"]
  leaked = run(good, good, drop_leaked=True)["train"]
  assert "data.check.drop_leaked removed all 4 train examples" in leaked
  long = _write(tmp_path / "long.jsonl", [{"question": "word " * 200, "answer": "a"}] * 2)
  assert "all 2 examples were cut by the length policy: 2 dropped as longer than max_len 129" in (
      run(long, length_policy="drop")["train"])
  # Training reads through the same check: the run stops there, with the reason.
  c = _config(str(empty))
  c.data.check.on_error = on_error
  with pytest.raises(FtjaxError, match="empty_split: no examples left: no records"):
    selection.clean_examples(c, tok)
