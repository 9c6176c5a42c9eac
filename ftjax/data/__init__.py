"""Data pipeline: read -> validate -> template -> tokenize -> mask -> pack -> resumable batches.

  ds = build_dataset(path, tokenizer, *, seq_len, format="auto", pack=True,
                     length_policy="truncate", system_prompt=None, fields=None, pad_id=None)
      path: a file (.jsonl, .json array, .txt, .parquet, .csv, .tsv, .arrow), a directory of
              them, a `datasets` save_to_disk folder (DIR?split=S), a Hub dataset
              (hub:NAME?config=C&split=S&revision=R), a list, or several joined by commas.
      format: "auto" (per file, from the first record's keys) | "input_output" | "instruction" |
              "chat" | "text". fields: key renaming first, e.g. {"question": "input", "answer": "output"}.
      length_policy: examples over seq_len + 1 tokens are "truncate"d (first tokens kept),
              "drop"ped, or an "error" naming file:line. Text (pretraining) data is windowed instead.
      tokenizer: duck-typed: encode(text, add_special_tokens), apply_chat_template(messages,
              add_generation_prompt) -> str, chat_template, eos_token_id, bos_token_id, pad_token_id.
  ds.examples   TokenizedExample(where="path:LINE", tokens int32 [n], loss_mask int32 [n])
  ds.rows       {"inputs", "targets", "segment_ids", "positions"} int32 [rows, seq_len],
                "loss_mask" float32 [rows, seq_len] (1 where the target is trained)
  ds.summary    dict: examples, kept, over_length, truncated, dropped, chunked, no_trained_tokens,
                tokens, trained_tokens, rows, fill, ...; ds.describe() is a one-line version.
  loader = ds.batches(batch_size, *, seed=0, shuffle=True, repeat=True, state=None)
      next(loader) / loader.next_batch(n): dict of the row fields, each [n, seq_len].
      loader.get_state() -> {"seed", "epoch", "row", "num_rows"}; Loader(..., state=s) resumes.

Only assistant content and the end-of-turn token after it are trained (assistant messages with
weight 0 are not); segment ids start at 1 per packed document (0 = padding), positions restart at
0, and the target after a document's last token is masked. Bad input raises FtjaxError with
`path:LINE: ...`. The generated tasks (data.generate) live in ftjax.data.<name>_task
(quickstart, preference, arithmetic): each writes its splits, and `write_generated` runs it.
`python -m ftjax.data check --config ...` (ftjax.data.selection, .quality, .report) lists every problem instead, with
quality, leakage and token statistics, and the cost plan (ftjax.cost_plan); training runs it first.
Tokenisation is batched (template.tokenize_many) and cached on disk (ftjax.data.cache);
ftjax.data.auto resolves train.epochs and the "auto" epochs / batch size / learning rate.
"""

import importlib
import logging
import os

from ftjax.data.dataset import Dataset, build_dataset, load_examples, read_options, tokenize_examples
from ftjax.data.loader import Loader
from ftjax.data.packing import pack
from ftjax.data.template import TokenizedExample, tokenize_example

__all__ = ["Dataset", "Loader", "TokenizedExample", "build_dataset", "load_examples", "pack", "read_options",
           "tokenize_example", "tokenize_examples", "write_generated"]


def write_generated(config) -> None:
  """Writes the generated dataset (data.generate = NAME: ftjax/data/NAME_task.py) where data.train
  points when it is not there yet: training and the data check read it."""
  if config.data.generate and not os.path.exists(config.data.train):
    task = importlib.import_module(f"ftjax.data.{config.data.generate}_task")
    out_dir = os.path.dirname(config.data.train) or "."
    task.write_splits(out_dir)
    logging.getLogger("ftjax.run").info("wrote the %s dataset to %s", config.data.generate, out_dir)
