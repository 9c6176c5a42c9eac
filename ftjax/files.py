"""Small files: outputs that appear complete or not at all (written under a temporary name,
then renamed), exports that never delete what they did not write, and JSON inputs whose errors
name the file and line."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import shutil
import tempfile

from ftjax.errors import FtjaxError


@dataclasses.dataclass(frozen=True)
class ExportKind:
  """The files one kind of export writes (`patterns`, fnmatch-style) and the one whose presence
  says the export is complete (`marker`: written last, removed first when replacing one)."""
  name: str
  marker: str
  patterns: tuple[str, ...]
  # Kept beside an export and not counted as foreign: PEFT and the Hub add a model card.
  kept: tuple[str, ...] = ("README.md",)

  def owns(self, entry: str) -> bool:
    return any(fnmatch.fnmatchcase(entry, p) for p in self.patterns)


ADAPTER = ExportKind("PEFT adapter", "adapter_config.json",
                     ("adapter_config.json", "adapter_model.safetensors"))
MERGED = ExportKind("HF model", "config.json",
                    ("config.json", "generation_config.json", "model.safetensors",
                     "model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors",
                     "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"))

# What marks a training workdir: its lock file (ftjax/lock.py), or a config beside checkpoints (a
# workdir from before the lock). An export never writes into one, nor into a folder holding one.
LOCK_FILE = ".ftjax.lock"
_WORKDIR_FOLDERS = ("checkpoints", "best")


def is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, LOCK_FILE)) or (
      os.path.isfile(os.path.join(path, "config.json"))
      and os.path.isdir(os.path.join(path, "checkpoints")))


def refuse_workdir(out_dir: str) -> None:
  """A workdir, its checkpoint folders and a folder holding workdirs are never export targets,
  with or without overwrite: they hold a run's own files."""
  path = os.path.realpath(out_dir)
  if is_workdir(path):
    raise FtjaxError(f"{out_dir}: this is a training workdir; export to a folder of its own "
                     "(e.g. WORKDIR/merged or WORKDIR/adapter, the defaults)")
  parent, child = os.path.split(path)
  while child:
    if child in _WORKDIR_FOLDERS and is_workdir(parent):
      raise FtjaxError(f"{out_dir}: this is inside the {child}/ folder of the training workdir "
                       f"{parent}; export to a folder of its own")
    parent, child = os.path.split(parent)
  if os.path.isdir(path):
    held = sorted(e for e in os.listdir(path) if is_workdir(os.path.join(path, e)))
    if held:
      raise FtjaxError(f"{out_dir}: this folder holds the training workdir "
                       f"{os.path.join(out_dir, held[0])}; export to a folder of its own")


def partial(entry: str) -> bool:
  """A temporary folder of an export (`atomic_dir`), maybe one under way now: never foreign,
  never removed but by its own export."""
  return fnmatch.fnmatchcase(entry, "*.partial-*")


def foreign_entries(out_dir: str, kind: ExportKind) -> list[str]:
  """What in `out_dir` an export of `kind` did not write (folders, other files)."""
  out = []
  for entry in os.listdir(out_dir):
    path = os.path.join(out_dir, entry)
    if os.path.isdir(path) and partial(entry):
      continue
    if not (os.path.isfile(path) and (kind.owns(entry) or entry in kind.kept)):
      out.append(entry)
  return sorted(out)


def check_export_target(out_dir: str, kind: ExportKind, overwrite: bool = False) -> None:
  """Refuses, before anything is computed or written, a target an export of `kind` must not
  write into: a file, a workdir (or in or above one), a non-empty folder that is not a previous
  export of that kind (unless `overwrite`)."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FtjaxError(f"{out_dir}: a file is in the way; the {kind.name} export is a folder")
  refuse_workdir(out_dir)
  if overwrite or not os.path.isdir(out_dir):
    return
  foreign = foreign_entries(out_dir, kind)
  if foreign:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise FtjaxError(
        f"{out_dir}: the folder holds files that are not a {kind.name} export ({shown}); choose "
        f"an empty or new folder, or pass --overwrite (overwrite=True) to write the export's files "
        f"({', '.join(kind.patterns[:2])}{', ...' if len(kind.patterns) > 2 else ''}) into it, "
        "keeping the rest")


@contextlib.contextmanager
def atomic_dir(out_dir: str, kind: ExportKind, overwrite: bool = False):
  """Yields a temporary folder for an export of `kind`; when the block succeeds its files take
  their place in `out_dir`. A new folder appears whole by one rename. An existing one (a previous
  export, or with `overwrite` any folder) loses its marker file first and gets it back last, so
  a crash in between never leaves a folder that looks finished; only the files an export of
  `kind` writes are replaced or removed there, whatever else it holds is never touched.
  Refused as `check_export_target` says."""
  check_export_target(out_dir, kind, overwrite)
  target = os.path.abspath(out_dir)
  # Inside an existing target (same file system: every move below is a rename), beside a new
  # one; a unique name, so no other folder (or concurrent export) is ever cleared for it.
  where = target if os.path.isdir(target) else os.path.dirname(target)
  os.makedirs(where, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(target)}.partial-", dir=where)
  try:
    yield tmp
    check_export_target(out_dir, kind, overwrite)  # the folder may have changed meanwhile
    if os.path.isdir(target):
      _replace_export_files(tmp, target, kind)
    else:
      os.rename(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # ours alone (mkdtemp); gone after the rename


def _replace_export_files(tmp: str, out_dir: str, kind: ExportKind) -> None:
  new = set(os.listdir(tmp))
  marker = os.path.join(out_dir, kind.marker)
  if os.path.isfile(marker):
    os.remove(marker)
  for entry in sorted(new - {kind.marker}):
    os.replace(os.path.join(tmp, entry), os.path.join(out_dir, entry))
  for entry in os.listdir(out_dir):  # a previous export's files the new one did not write
    path = os.path.join(out_dir, entry)
    if kind.owns(entry) and entry not in new and os.path.isfile(path):
      os.remove(path)
  if kind.marker in new:
    os.replace(os.path.join(tmp, kind.marker), marker)


def within(root: str, path: str) -> bool:
  """Whether `path` lies strictly inside the folder `root` (symlinks resolved)."""
  real_root, real = os.path.realpath(root), os.path.realpath(path)
  return real != real_root and os.path.commonpath([real_root, real]) == real_root


def inside(root: str, path: str) -> str:
  """`path`, refused when it does not lie strictly inside `root` (an adapter name joined as a
  folder name must not climb out of the export folder)."""
  if not within(root, path):
    raise FtjaxError(f"{path}: not inside {root}; refusing to write there")
  return path


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def read_json(path: str, hint: str = ""):
  """The parsed file; a missing or malformed file is an FtjaxError naming it (and the line)."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FtjaxError(f"{path}: no such file{hint}") from None
  except json.JSONDecodeError as e:
    raise FtjaxError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
