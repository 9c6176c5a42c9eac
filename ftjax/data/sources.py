"""Read data files into raw records, each tagged with the file and line it came from.

Supported: JSONL (`.jsonl`, also `.json` holding JSONL), JSON arrays (`.json`), plain text
(`.txt`: one document per file), and parquet/CSV through `datasets`. Every record is a
`Record(where="path:LINE", data=...)` so later validation errors can point at the exact line.
"""

import dataclasses
import json
import os

from ftjax.errors import FtjaxError


@dataclasses.dataclass(frozen=True)
class Record:
  where: str  # "path:LINE" (1-based line; row number for parquet/CSV)
  data: object  # usually a dict; a str for .txt files


def read_records(path):
  """All records of one file, in file order. Raises FtjaxError on unreadable or empty input."""
  if not os.path.isfile(path):
    raise FtjaxError(f"{path}: data file not found")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".parquet", ".csv"):
    records = _read_with_datasets(path, ext)
  else:
    with open(path, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # else a traceback without the line
      line = raw.count(b"\n", 0, e.start) + 1
      raise FtjaxError(f"{path}:{line}: not valid UTF-8 (byte {e.start + 1} of the file)") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode's universal newlines
    if ext == ".txt":
      records = [Record(f"{path}:1", text)] if text.strip() else []
    elif ext == ".json" and text.lstrip().startswith("["):
      records = _read_json_array(path, text)
    else:
      records = _read_jsonl(path, text)
  if not records:
    raise FtjaxError(f"{path}: no records (empty dataset)")
  return records


def _read_jsonl(path, text):
  records = []
  for lineno, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue  # blank lines (often a trailing newline) are not records
    try:
      records.append(Record(f"{path}:{lineno}", json.loads(line)))
    except json.JSONDecodeError as e:
      raise FtjaxError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
  return records


def _read_json_array(path, text):
  # Decode element by element (not json.load) so each record keeps the line it starts on.
  decoder = json.JSONDecoder()
  records = []
  i = _skip_ws(text, text.index("[") + 1)
  if i < len(text) and text[i] == "]":
    return records
  while True:
    try:
      value, end = decoder.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise FtjaxError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    records.append(Record(f"{path}:{text.count(chr(10), 0, i) + 1}", value))
    i = _skip_ws(text, end)
    if i < len(text) and text[i] == ",":
      i = _skip_ws(text, i + 1)
    elif i < len(text) and text[i] == "]":
      return records
    else:
      line = text.count("\n", 0, i) + 1
      raise FtjaxError(f"{path}:{line}: not valid JSON (expected ',' or ']' in the top-level array)")


def _skip_ws(text, i):
  while i < len(text) and text[i] in " \t\r\n":
    i += 1
  return i


def _read_with_datasets(path, ext):
  import datasets  # slow to import; only needed for these formats

  builder = {".parquet": "parquet", ".csv": "csv"}[ext]
  try:
    ds = datasets.load_dataset(builder, data_files=path, split="train")
  except Exception as e:  # datasets raises many types; all mean "could not read this file"
    raise FtjaxError(f"{path}: could not read {builder} file ({type(e).__name__}: {e})") from None
  # CSV: row i is on line i + 2 (the header is line 1); parquet has no lines, use the row number.
  first = 2 if builder == "csv" else 1
  return [Record(f"{path}:{i + first}", dict(row)) for i, row in enumerate(ds)]
