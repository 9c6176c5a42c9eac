"""Exports: HF PEFT adapters and merged HF models.

`python -m ftjax.export --workdir DIR [--merged OUT] [--adapter OUT] [--gguf TYPE]` restores the
latest
checkpoint of a training run and writes the adapter-merged model as a HF directory (loadable by
`transformers.AutoModelForCausalLM.from_pretrained`) and/or the adapter alone in HF PEFT format
(loadable by `peft.PeftModel.from_pretrained`); `--gguf TYPE` also writes the merged model as one
GGUF file for llama.cpp / Ollama / LM Studio, with an Ollama Modelfile beside it. Each output is written to a temporary folder
and moved into place when complete, so a failed export never leaves a folder that looks finished.

An output folder must be new, empty or a previous export of the same kind (then replaced);
one holding anything else is refused unless `--overwrite`, and even then only the export's own
files are replaced there: an export never deletes a file it did not write, and never writes into
a training workdir itself (ftjax.files.atomic_dir). Writing into WORKDIR (the default outputs)
takes the workdir's lock, so it never runs beside a training of that workdir (ftjax/lock.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import ml_collections
from flax import nnx

from ftjax import config as config_lib
from ftjax import files, peft
from ftjax.peft import merged_model
from ftjax.checkpoint import Checkpointer
from ftjax.errors import FtjaxError, cli_errors
from ftjax.files import read_json
from ftjax.models import save_gguf, save_pretrained
from ftjax.models.gguf_write import TYPES as GGUF_TYPES
from ftjax.models.gguf_write import write_modelfile
from ftjax.lock import hold_workdir
from ftjax.run import init_or_restore, peft_configs, setup


def write_adapters(model: nnx.Module, out_dir: str, base_model_name: str,
                   overwrite: bool = False) -> list[str]:
  """Each attached adapter in HF PEFT's layout (adapter_config.json +
  adapter_model.safetensors): one adapter in `out_dir` itself, several each in
  `out_dir/<name>/` (as PEFT saves adapters that are not "default"). Returns the folders.
  Never deletes what an export did not write (see `check_adapters_target`)."""
  names = list(peft.configs(model))
  check_adapters_target(names, out_dir, overwrite)
  if len(names) == 1:
    peft.save_adapter(model, out_dir, base_model_name, adapter_name=names[0], overwrite=overwrite)
    return [out_dir]
  os.makedirs(out_dir, exist_ok=True)
  folders = [adapter_folder(out_dir, name) for name in names]
  for name, folder in zip(names, folders):
    peft.save_adapter(model, folder, base_model_name, adapter_name=name, overwrite=overwrite)
  return folders


def adapter_folder(out_dir: str, name: str) -> str:
  """`out_dir/<name>`, checked to stay inside `out_dir` (names are checked where adapters are
  added, ftjax.peft.core.check_adapter_name; this guards the path itself)."""
  return files.inside(out_dir, os.path.join(out_dir, name))


def check_adapters_target(names: list[str], out_dir: str, overwrite: bool = False) -> None:
  """Refuses what `write_adapters` must not write the adapters `names` into, before anything is
  computed: one adapter as `ftjax.files.check_export_target` says; for several, `out_dir` may
  hold only their folders from a previous export (unless `overwrite`), each checked as one."""
  if len(names) == 1:
    files.check_export_target(out_dir, files.ADAPTER, overwrite)
    return
  files.check_export_target(out_dir, files.ADAPTER, overwrite=True)  # a file, a workdir
  if os.path.isdir(out_dir) and not overwrite:
    other = sorted(e for e in os.listdir(out_dir)
                   if e not in names and e not in files.ADAPTER.kept and not files.partial(e))
    if other:
      raise FtjaxError(f"{out_dir}: the folder holds {', '.join(other[:5])}, which are not "
                       f"this model's adapters ({', '.join(names)}); choose an empty or new "
                       "folder, or pass --overwrite (overwrite=True) to write the adapter "
                       "folders into it, keeping the rest")
  for name in names:
    files.check_export_target(adapter_folder(out_dir, name), files.ADAPTER, overwrite)


def write_merged(model: nnx.Module, tokenizer, out_dir: str, max_shard_size: int | str = "5GB",
                 overwrite: bool = False, objective=None) -> None:
  """The model with any adapter folded in, as a HF model directory with tokenizer files: merged
  on the devices (sharded as trained) and streamed to files of at most `max_shard_size`.
  `out_dir` as `ftjax.models.save_pretrained` takes it."""
  files.check_export_target(out_dir, files.MERGED, overwrite)  # before merging
  if objective is not None:  # the objective's format (a classifier's *ForSequenceClassification)
    objective.save_merged(merged_model(model), tokenizer, out_dir, max_shard_size=max_shard_size,
                          overwrite=overwrite)
    return
  save_pretrained(merged_model(model), out_dir, tokenizer, max_shard_size=max_shard_size,
                  overwrite=overwrite)


def write_gguf(model: nnx.Module, tokenizer, path: str, type_name: str) -> None:
  """The merged model as one GGUF file plus an Ollama Modelfile beside it; prints what was
  written and how to run it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  info = save_gguf(model, path, tokenizer, type=type_name)
  modelfile = write_modelfile(path, tokenizer, info["eot_token"])
  name = os.path.splitext(os.path.basename(path))[0].lower()
  print(f"wrote GGUF {path} ({info['bytes'] / 2**20:.1f} MiB, {type_name})\n"
        f"  Ollama:    ollama create {name} -f {modelfile} && ollama run {name}\n"
        f"  llama.cpp: llama-cli -m {path} -cnv", file=sys.stderr)


def check_gguf_target(path: str, default: str, overwrite: bool) -> None:
  """A GGUF file replaces only what an export wrote: the run's own default file, or any file
  with --overwrite; never a folder, never a workdir's own files."""
  modelfile = os.path.join(os.path.dirname(os.path.abspath(path)), "Modelfile")
  for target in (path, modelfile):
    if os.path.isdir(target):
      raise FtjaxError(f"--gguf-out {path}: {target} is a folder; name the .gguf file to write")
    if (os.path.exists(target) and not overwrite
        and os.path.abspath(path) != os.path.abspath(default)):
      raise FtjaxError(f"--gguf-out {path}: {target} exists; pass --overwrite to replace it")
  files.refuse_workdir(os.path.dirname(os.path.abspath(path)))


@cli_errors
def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ftjax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's workdir")
  parser.add_argument("--merged", default=None, help="merged HF model output (default WORKDIR/merged)")
  parser.add_argument("--adapter", default=None, help="PEFT adapter output (default WORKDIR/adapter)")
  parser.add_argument("--no-merged", action="store_true")
  parser.add_argument("--no-adapter", action="store_true")
  parser.add_argument("--gguf", default=None, metavar="TYPE", choices=sorted(GGUF_TYPES),
                      help="also write a GGUF file of this type (f32, f16, bf16, q8_0, q4_0)")
  parser.add_argument("--gguf-out", default=None,
                      help="GGUF output file (default WORKDIR/gguf/model-TYPE.gguf)")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into a folder that holds other files: only the export's own "
                           "files are replaced there, the rest is kept")
  args = parser.parse_args(argv)
  saved = read_json(os.path.join(args.workdir, "config.json"),
                    f" (is {args.workdir} a training workdir?)")
  config = config_lib.base_config()
  config.unlock()
  config.update(ml_collections.ConfigDict(saved))
  adapter_out = args.adapter or os.path.join(args.workdir, "adapter")
  merged_out = args.merged or os.path.join(args.workdir, "merged")
  outputs = []  # checked before anything loads: a refused folder costs no restore
  names = list(peft_configs(config))
  if names and not args.no_adapter:
    check_adapters_target(names, adapter_out, args.overwrite)
    outputs.append(adapter_out)
  if not args.no_merged:
    files.check_export_target(merged_out, files.MERGED, args.overwrite)
    outputs.append(merged_out)
  if args.gguf:
    default = os.path.join(args.workdir, "gguf", f"model-{args.gguf}.gguf")
    args.gguf_out = args.gguf_out or default
    check_gguf_target(args.gguf_out, default, args.overwrite)
    outputs.append(args.gguf_out)
  # Into the workdir (the default outputs): one writer at a time, as training (ftjax/lock.py).
  writes_workdir = any(files.within(args.workdir, out) for out in outputs)
  with hold_workdir(args.workdir, "export") if writes_workdir else contextlib.nullcontext():
    _export(args, config, adapter_out, merged_out)


def _export(args, config, adapter_out: str, merged_out: str) -> None:
  checkpointer = Checkpointer(args.workdir)
  if checkpointer.latest_step() is None:
    raise FtjaxError(f"{args.workdir}: no checkpoint to export")
  run = setup(config, with_data=False)
  state, _ = init_or_restore(run, checkpointer)
  checkpointer.close()
  model = run.model(state["trainable"])
  print(f"restored step {int(state['step'])} from {args.workdir}", file=sys.stderr)
  if run.peft_configs and not args.no_adapter:
    for folder in write_adapters(model, adapter_out, config.model.name_or_path, args.overwrite):
      print(f"wrote PEFT adapter to {folder}", file=sys.stderr)
  if args.gguf:
    if not peft.can_merge(model):
      raise FtjaxError(f"--gguf: a {config.method} adapter has no merged form (it is not a weight "
                       "update), so no GGUF file can hold it; export the adapter alone")
    write_gguf(model, run.tokenizer, args.gguf_out, args.gguf)
  if not args.no_merged:
    if not peft.can_merge(model):
      if args.merged:
        raise FtjaxError(f"--merged: a {config.method} adapter has no merged form (it is not a "
                         "weight update); export the adapter alone")
      print(f"no merged model: a {config.method} adapter has no merged form", file=sys.stderr)
      return
    write_merged(model, run.tokenizer, merged_out, overwrite=args.overwrite, objective=run.objective)
    print(f"wrote merged HF model to {merged_out}", file=sys.stderr)


if __name__ == "__main__":
  main()
