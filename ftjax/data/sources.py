"""Read data sources into raw records, each tagged with the file and line it came from.

A source is one of:
  a file      JSONL (`.jsonl`, also `.json` holding JSONL), JSON arrays (`.json`), plain text
              (`.txt`: one document per file), and through HF `datasets` parquet, CSV, TSV and
              Arrow files (`.parquet`, `.csv`, `.tsv`, `.arrow`);
  a directory written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict: one split,
              `DIR?split=test`, default train), read with `load_from_disk`;
  a Hub dataset `hub:NAME?config=C&split=S&revision=R` (split default train), read with
              `datasets.load_dataset` when the Hugging Face Hub is reachable; otherwise an error
              saying how to use a local copy.
Every record is a `Record(where="SOURCE:LINE", data=...)` so later validation errors can point at
the exact line (the row, counted from 1, for `datasets` sources; CSV rows are their line).
"""

import dataclasses
import json
import os

from ftjax.errors import FtjaxError


@dataclasses.dataclass(frozen=True)
class Record:
  where: str  # "path:LINE" (1-based line; row number for parquet/CSV)
  data: object  # usually a dict; a str for .txt files


DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
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


def read_records(path):
  """All records of one source, in order. Raises FtjaxError on unreadable or empty input."""
  base, options = split_spec(path)
  if base.startswith(HUB_PREFIX):
    return _nonempty(path, _read_hub(path, base[len(HUB_PREFIX):], options))
  if is_saved_dataset(base):
    return _nonempty(path, _read_saved(path, base, options))
  if options:
    raise FtjaxError(f"{path}: ?{'&'.join(options)} applies to a save_to_disk folder or a hub: "
                     "dataset, not to a file")
  if not os.path.isfile(path):
    raise FtjaxError(f"{path}: data file not found")
  ext = os.path.splitext(path)[1].lower()
  if ext in DATASETS_BUILDERS:
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
  return _nonempty(path, records)


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

  builder = DATASETS_BUILDERS[ext]
  kwargs = {"sep": "\t"} if ext == ".tsv" else {}
  try:
    ds = datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
  except Exception as e:  # datasets raises many types; all mean "could not read this file"
    raise FtjaxError(f"{path}: could not read {builder} file ({type(e).__name__}: {e})") from None
  # CSV: row i is on line i + 2 (the header is line 1); parquet has no lines, use the row number.
  return _rows(path, ds, first=2 if builder == "csv" else 1)
