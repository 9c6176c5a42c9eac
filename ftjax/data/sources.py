"""Read data sources into raw records, each tagged with the file and line it came from.

A source is one of:
  a file      JSONL (`.jsonl`, also `.json` holding JSONL), JSON arrays (`.json`), plain text
              (`.txt`: one document per file), CSV and TSV with a header line (`.csv`, `.tsv`,
              cells read as strings), and through HF `datasets` parquet and Arrow files
              (`.parquet`, `.arrow`);
  a directory written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict: one split,
              `DIR?split=test`, default train), read with `load_from_disk`;
  a Hub dataset `hub:NAME?config=C&split=S&revision=R` (split default train), read with
              `datasets.load_dataset` when the Hugging Face Hub is reachable; otherwise an error
              saying how to use a local copy.
Every record is a `Record(where="SOURCE:LINE", data=...)` so later validation errors can point at
the exact line (the row, counted from 1, for `datasets` sources; CSV rows are the line they
start on). `read_all` reports every record that does not read (`Problem`: bad_encoding,
bad_json, bad_csv at its line) and keeps the rest; `read_records` stops at the first.
"""

import contextlib
import dataclasses
import json
import os
import sys
import threading

from ftjax.errors import FtjaxError


@dataclasses.dataclass(frozen=True)
class Record:
  where: str  # "path:LINE" (1-based line; row number for parquet/CSV)
  data: object  # usually a dict; a str for .txt files


DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
CSV_SEPARATORS = {".csv": ",", ".tsv": "\t"}  # read with the csv module: every bad row, at its line
HUB_PREFIX = "hub:"


def split_spec(source):
  """"path?split=test&..." -> ("path", {"split": "test", ...})."""
  import urllib.parse
  base, _, query = source.partition("?")
  options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
  unknown = sorted(set(options) - {"split", "config", "revision"})
  if unknown:
    raise FtjaxError(f"{source}: unknown option(s) {unknown}; expected split, config, revision")
  return base, options


def is_saved_dataset(path):
  """A folder `datasets`' save_to_disk wrote (a Dataset or a DatasetDict)."""
  return os.path.isdir(path) and (
      os.path.isfile(os.path.join(path, "dataset_dict.json")) or
      os.path.isfile(os.path.join(path, "state.json")))


@dataclasses.dataclass(frozen=True)
class Problem:
  """A record that could not be read, with a stable code (bad_json, bad_encoding, bad_csv, ...)."""
  code: str
  where: str  # "path:LINE"
  message: str


def read_records(path):
  """All records of one source, in order. Raises FtjaxError on the first unreadable record, or on
  empty input (`read_all` returns every problem instead)."""
  records, problems = read_all(path)
  if problems:
    raise FtjaxError(problems[0].message, code=problems[0].code)
  return _nonempty(path, records)


def read_all(path):
  """(records, problems) of one source: every record that reads, and every one that does not, at
  its line, so one look at a file shows all that is wrong with it. Raises FtjaxError for a source
  that cannot be read at all (missing, a damaged `datasets` folder)."""
  base, options = split_spec(path)
  if base.startswith(HUB_PREFIX):
    return _read_hub(path, base[len(HUB_PREFIX):], options), []
  if is_saved_dataset(base):
    return _read_saved(path, base, options), []
  if options:
    raise FtjaxError(f"{path}: ?{'&'.join(options)} applies to a save_to_disk folder or a hub: "
                     "dataset, not to a file")
  if not os.path.isfile(path):
    raise FtjaxError(f"{path}: data file not found")
  ext = os.path.splitext(path)[1].lower()
  if ext in DATASETS_BUILDERS and ext not in CSV_SEPARATORS:
    return _read_with_datasets(path, ext), []
  with open(path, "rb") as f:
    raw = f.read()
  text, problems = _decode(path, raw)
  bad_lines = [int(p.where.rsplit(":", 1)[1]) for p in problems]
  if ext == ".txt":
    return ([Record(f"{path}:1", text)] if text.strip() and not problems else []), problems
  is_array = ext == ".json" and text.lstrip().startswith("[")
  if not (is_array or ext in CSV_SEPARATORS):
    records, more = _read_jsonl(path, text)
    return [r for r in records if _line(r) not in bad_lines], problems + more
  reader = _read_csv if ext in CSV_SEPARATORS else _read_json_array
  records, more = reader(path, text, CSV_SEPARATORS[ext]) if ext in CSV_SEPARATORS else reader(path, text)
  # A record of these formats may span lines: drop it when an undecodable line is among them.
  ends = [_line(r) for r in records[1:]] + [text.count("\n") + 2]
  return [r for r, end in zip(records, ends)
          if not any(_line(r) <= b < end for b in bad_lines)], problems + more


def _line(record):
  return int(record.where.rsplit(":", 1)[1])


def _decode(path, raw):
  """(text, bad_encoding problems): UTF-8 with every undecodable line reported (and replaced by
  U+FFFD so the rest of the file still reads); newlines as text mode's universal newlines."""
  problems = []
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
      try:
        line.decode("utf-8")
      except UnicodeDecodeError as e:
        where = f"{path}:{lineno}"
        problems.append(Problem("bad_encoding", where, f"{where}: not valid UTF-8 (byte {e.start + 1} of "
                                "the line)"))
    text = raw.decode("utf-8", errors="replace")
  return text.replace("\r\n", "\n").replace("\r", "\n"), problems


def _nonempty(path, records):
  if not records:
    raise FtjaxError(f"{path}: no records (empty dataset)")
  return records


def _rows(source, ds, first=1):
  return [Record(f"{source}:{i + first}", dict(row)) for i, row in enumerate(ds)]


def _read_saved(source, path, options):
  import datasets
  if "config" in options or "revision" in options:
    raise FtjaxError(f"{source}: a save_to_disk folder takes only ?split=")
  try:
    ds = datasets.load_from_disk(path)
  except Exception as e:  # noqa: BLE001 - datasets raises many types for a damaged folder
    raise FtjaxError(f"{path}: could not read this save_to_disk folder ({type(e).__name__}: {e})") from None
  if isinstance(ds, datasets.DatasetDict):
    split = options.get("split", "train")
    if split not in ds:
      raise FtjaxError(f"{source}: no split {split!r}; this folder holds {sorted(ds)} (choose with "
                       "?split=NAME)")
    ds = ds[split]
  elif options.get("split"):
    raise FtjaxError(f"{source}: this folder holds one Dataset, not splits; drop ?split=")
  return _rows(source, ds)


def _read_hub(source, name, options):
  import datasets
  split = options.get("split", "train")
  try:
    ds = datasets.load_dataset(name, options.get("config") or None, split=split,
                               revision=options.get("revision") or None)
  except Exception as e:  # noqa: BLE001 - offline, missing repo or split, auth: all mean "not read"
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    why = "offline: HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {str(e).splitlines()[0]}"
    raise FtjaxError(
        f"{source}: could not load {name!r} (split {split!r}) from the Hugging Face Hub ({why}); "
        "on a machine with access, `datasets.load_dataset(...).save_to_disk(DIR)` and pass DIR "
        "(a save_to_disk folder) or export a .jsonl") from None
  return _rows(source, ds)


def _read_jsonl(path, text):
  records, problems = [], []
  for lineno, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue  # blank lines (often a trailing newline) are not records
    where = f"{path}:{lineno}"
    try:
      records.append(Record(where, json.loads(line)))
    except _UNDECODABLE as e:
      problems.append(_bad_json(path, lineno, e))
  return records, problems


# What Python's JSON reader raises besides JSONDecodeError (a ValueError): RecursionError for
# nesting deeper than the interpreter's recursion limit (~1000 levels), ValueError for an integer
# of more than sys.get_int_max_str_digits() (4300) digits. Both are one bad record, not a crash.
_UNDECODABLE = (ValueError, RecursionError)


def _bad_json(path, lineno, e):
  """The bad_json Problem of a record that json could not decode (`lineno`: where it starts)."""
  if isinstance(e, json.JSONDecodeError):
    where = f"{path}:{e.lineno + lineno - 1}"
    return Problem("bad_json", where, f"{where}: not valid JSON ({e.msg} at column {e.colno})")
  where = f"{path}:{lineno}"
  if isinstance(e, RecursionError):
    why = "nested deeper than Python's JSON reader allows (about 1000 levels)"
  elif "digits" in str(e):
    why = f"an integer with more than {sys.get_int_max_str_digits()} digits; quote it as a string"
  else:
    why = " ".join(str(e).split())
  return Problem("bad_json", where, f"{where}: not valid JSON ({why})")


def _read_json_array(path, text):
  """Decoded element by element (not json.load) so each record keeps the line it starts on, and a
  broken element is reported and skipped: the scan resumes at the next top-level comma."""
  decoder = json.JSONDecoder()
  records, problems = [], []
  i = _skip_ws(text, text.index("[") + 1)
  if i < len(text) and text[i] == "]":
    return records, problems
  while i < len(text):
    line = text.count("\n", 0, i) + 1
    try:
      value, end = decoder.raw_decode(text, i)
    except _UNDECODABLE as e:
      # raw_decode counts lines from the start of `text`: lineno 1 here keeps its line numbers.
      problems.append(_bad_json(path, 1 if isinstance(e, json.JSONDecodeError) else line, e))
      end = _next_element(text, i)
    else:
      records.append(Record(f"{path}:{line}", value))
    i = _skip_ws(text, end)
    if i < len(text) and text[i] == ",":
      i = _skip_ws(text, i + 1)
    elif i < len(text) and text[i] == "]":
      return records, problems
    else:
      where = f"{path}:{text.count(chr(10), 0, i) + 1}"
      why = "the top-level array is not closed by ']'" if i >= len(text) else (
          "expected ',' or ']' in the top-level array")
      problems.append(Problem("bad_json", where, f"{where}: not valid JSON ({why})"))
      i = _next_element(text, i + 1)
      if i < len(text) and text[i] == ",":
        i = _skip_ws(text, i + 1)
  return records, problems


def _next_element(text, i):
  """Where the element at text[i] ends as far as brackets and strings tell: the next comma or
  closing bracket at the array's own depth (or the end of the text)."""
  depth, in_string, escaped = 0, False, False
  while i < len(text):
    ch = text[i]
    if in_string:
      if escaped:
        escaped = False
      elif ch == "\\":
        escaped = True
      elif ch == '"':
        in_string = False
    elif ch == '"':
      in_string = True
    elif ch in "[{":
      depth += 1
    elif ch in "]}":
      if depth == 0:
        return i
      depth -= 1
    elif ch == "," and depth == 0:
      return i
    i += 1
  return i


def _read_csv(path, text, separator):
  """Rows of a CSV/TSV file with a header line, keyed by the header, each at the line it starts
  on; a row with a different number of cells than the header, or one the csv module cannot
  parse, is a bad_csv problem at its line and reading goes on. Empty cells are None, as
  `datasets`' CSV reader (pandas) makes them."""
  import csv
  import io
  records, problems = [], []
  with _csv_field_limit(len(text)):
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    try:
      header = next(reader, None)
    except csv.Error as e:
      return records, [_bad_csv(path, reader.line_num, e)]
    if header is None:
      return records, problems
    start = reader.line_num + 1
    while True:
      where = f"{path}:{start}"
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error as e:  # this row only: the reader resumes at the next line
        problems.append(_bad_csv(path, start, e))
        start = reader.line_num + 1
        continue
      if row and len(row) != len(header):
        problems.append(Problem("bad_csv", where, f"{where}: bad_csv: {len(row)} cells; the header "
                                f"line has {len(header)} ({', '.join(header)})"))
      elif row:
        records.append(Record(where, {k: (v if v != "" else None) for k, v in zip(header, row)}))
      start = reader.line_num + 1
  return records, problems


def _bad_csv(path, line, error):
  where = f"{path}:{line}"
  return Problem("bad_csv", where, f"{where}: bad_csv: {error}")


_CSV_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _csv_field_limit(at_least):
  """The csv module's field size limit (131,072 characters by default, process-wide) raised to
  `at_least` while one file is read, then put back. No cell can be longer than the file's text,
  so its length is a limit no cell reaches: a long document in one cell reads whole, as pandas
  (`datasets`' CSV reader) reads it. The lock keeps two readers from restoring each other's
  value mid-file."""
  import csv
  with _CSV_LIMIT_LOCK:
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, at_least))
    try:
      yield
    finally:
      csv.field_size_limit(previous)


def _skip_ws(text, i):
  while i < len(text) and text[i] in " \t\r\n":
    i += 1
  return i


def _read_with_datasets(path, ext):
  import datasets  # slow to import; only needed for these formats

  builder = DATASETS_BUILDERS[ext]
  try:
    ds = datasets.load_dataset(builder, data_files=path, split="train")
  except Exception as e:  # datasets raises many types; all mean "could not read this file"
    raise FtjaxError(f"{path}: could not read {builder} file ({type(e).__name__}: {e})") from None
  return _rows(path, ds)  # no lines in a parquet or arrow file: the row number, from 1
