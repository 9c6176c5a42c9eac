"""Exports: HF PEFT adapters and merged HF models.

`python -m ftjax.export --workdir DIR [--merged OUT] [--adapter OUT] [--gguf TYPE]` restores the latest
checkpoint of a training run and writes the adapter-merged model as a HF directory (loadable by
`transformers.AutoModelForCausalLM.from_pretrained`) and/or the adapter alone in HF PEFT format
(loadable by `peft.PeftModel.from_pretrained`); `--gguf TYPE` also writes the merged model as
one GGUF file for llama.cpp / Ollama / LM Studio, with an Ollama Modelfile beside it. Each output is written to a temporary folder
and renamed when complete, so a failed export never leaves a folder that looks finished.
"""

from __future__ import annotations

import argparse
import os
import sys

import ml_collections
from flax import nnx

from ftjax import config as config_lib
from ftjax import peft, quant
from ftjax.checkpoint import Checkpointer
from ftjax.errors import FtjaxError, cli_errors
from ftjax.files import read_json
from ftjax.models import save_gguf, save_pretrained
from ftjax.models.gguf_write import TYPES as GGUF_TYPES
from ftjax.models.gguf_write import write_modelfile
from ftjax.run import init_or_restore, setup


def write_adapters(model: nnx.Module, out_dir: str, base_model_name: str) -> list[str]:
  """Each attached adapter in HF PEFT's layout (adapter_config.json +
  adapter_model.safetensors): one adapter in `out_dir` itself, several each in
  `out_dir/<name>/` (as PEFT saves adapters that are not "default"). Returns the folders."""
  names = list(peft.configs(model))
  if len(names) == 1:
    peft.save_adapter(model, out_dir, base_model_name, adapter_name=names[0])
    return [out_dir]
  os.makedirs(out_dir, exist_ok=True)
  for name in names:
    peft.save_adapter(model, os.path.join(out_dir, name), base_model_name, adapter_name=name)
  return [os.path.join(out_dir, name) for name in names]


def _quantised(model: nnx.Module) -> bool:
  return any(isinstance(m, quant.QuantLinear) for _, m in nnx.iter_modules(model))


def merged_model(model: nnx.Module) -> nnx.Module:
  """A float copy of `model` with its adapter folded in: a 4-bit base is dequantised first and
  the adapter merged in f32 (so the merged weights are the dequantised ones plus the update,
  not a re-quantisation). The model itself when it has neither adapter nor 4-bit base, or an
  adapter without a merged form (virtual tokens, bottleneck adapters)."""
  adapters = any(True for _ in peft.adapter_layers(model))
  if adapters and not peft.can_merge(model) or not adapters and not _quantised(model):
    return model
  clone = quant.dequantize_model(nnx.clone(model))
  return peft.merge_and_unload(clone) if adapters else clone


def write_merged(model: nnx.Module, tokenizer, out_dir: str, max_shard_size: int | str = "5GB") -> None:
  """The model with any adapter folded in, as a HF model directory with tokenizer files: merged
  on the devices (sharded as trained) and streamed to files of at most `max_shard_size`."""
  save_pretrained(merged_model(model), out_dir, tokenizer, max_shard_size=max_shard_size)


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
  args = parser.parse_args(argv)
  saved = read_json(os.path.join(args.workdir, "config.json"),
                    f" (is {args.workdir} a training workdir?)")
  config = config_lib.base_config()
  config.unlock()
  config.update(ml_collections.ConfigDict(saved))
  checkpointer = Checkpointer(args.workdir)
  if checkpointer.latest_step() is None:
    raise FtjaxError(f"{args.workdir}: no checkpoint to export")
  run = setup(config, with_data=False)
  state, _ = init_or_restore(run, checkpointer)
  checkpointer.close()
  model = run.model(state["trainable"])
  print(f"restored step {int(state['step'])} from {args.workdir}", file=sys.stderr)
  if run.peft_configs and not args.no_adapter:
    out = args.adapter or os.path.join(args.workdir, "adapter")
    for folder in write_adapters(model, out, config.model.name_or_path):
      print(f"wrote PEFT adapter to {folder}", file=sys.stderr)
  if args.gguf:
    write_gguf(model, run.tokenizer, args.gguf_out or os.path.join(args.workdir, "gguf", f"model-{args.gguf}.gguf"),
               args.gguf)
  if not args.no_merged:
    if not peft.can_merge(model):
      if args.merged:
        raise FtjaxError(f"--merged: a {config.method} adapter has no merged form (it is not a "
                         "weight update); export the adapter alone")
      print(f"no merged model: a {config.method} adapter has no merged form", file=sys.stderr)
      return
    out = args.merged or os.path.join(args.workdir, "merged")
    write_merged(model, run.tokenizer, out)
    print(f"wrote merged HF model to {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
