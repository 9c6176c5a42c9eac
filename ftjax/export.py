"""Exports: HF PEFT adapters and merged HF models.

`python -m ftjax.export --workdir DIR [--merged OUT] [--adapter OUT]` restores the latest
checkpoint of a training run and writes the LoRA-merged model as a HF directory (loadable by
`transformers.AutoModelForCausalLM.from_pretrained`) and/or the adapter alone in HF PEFT format
(loadable by `peft.PeftModel.from_pretrained`). Each output is written to a temporary folder
and renamed when complete, so a failed export never leaves a folder that looks finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys

import jax
import numpy as np
from safetensors.numpy import save_file

from ftjax.errors import FtjaxError, cli_errors
from ftjax.models.hf import save_hf_config, save_hf_params


@contextlib.contextmanager
def _atomic_dir(out_dir: str):
  tmp = out_dir.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  yield tmp
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)


def write_adapter(plug, adapters, model_cfg, out_dir: str, base_model_name: str) -> None:
  """adapter_config.json + adapter_model.safetensors in HF PEFT's layout."""
  tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32))
             for k, v in jax.device_get(plug.peft_state_dict(adapters, model_cfg)).items()}
  with _atomic_dir(out_dir) as tmp:
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(plug.peft_config(model_cfg, base_model_name), f, indent=2)


def write_merged(plug, tree, model_cfg, tokenizer, out_dir: str) -> None:
  """The base model with the adapter folded in, as a HF model directory with tokenizer files."""
  merged = jax.device_get(plug.merge(tree["base"], tree.get("adapters") or {}))
  with _atomic_dir(out_dir) as tmp:
    save_hf_params(merged, model_cfg, tmp)
    save_hf_config(model_cfg, tmp)
    if tokenizer is not None:
      tokenizer.save(tmp)


@cli_errors
def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ftjax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's workdir")
  parser.add_argument("--merged", default=None, help="merged HF model output (default WORKDIR/merged)")
  parser.add_argument("--adapter", default=None, help="PEFT adapter output (default WORKDIR/adapter)")
  parser.add_argument("--no-merged", action="store_true")
  parser.add_argument("--no-adapter", action="store_true")
  args = parser.parse_args(argv)

  import ml_collections
  from ftjax import config as config_lib
  from ftjax import step as step_lib
  from ftjax import train as train_lib
  from ftjax.checkpoint import Checkpointer

  config_path = os.path.join(args.workdir, "config.json")
  if not os.path.exists(config_path):
    raise FtjaxError(f"{config_path}: no such file (is {args.workdir} a training workdir?)")
  with open(config_path) as f:
    config = config_lib.base_config()
    config.unlock()
    config.update(ml_collections.ConfigDict(json.load(f)))
  checkpointer = Checkpointer(args.workdir)
  if checkpointer.latest_step() is None:
    raise FtjaxError(f"{args.workdir}: no checkpoint to export")
  run = train_lib.setup(config, with_data=False)
  state, _ = train_lib.init_or_restore(run, checkpointer)
  tree = step_lib.combine(state["trainable"], run.frozen)
  print(f"restored step {int(state['step'])} from {args.workdir}", file=sys.stderr)
  if config.method == "lora" and not args.no_adapter:
    out = args.adapter or os.path.join(args.workdir, "adapter")
    write_adapter(run.plug, tree["adapters"], run.model_cfg, out, config.model.name_or_path)
    print(f"wrote PEFT adapter to {out}", file=sys.stderr)
  if not args.no_merged:
    out = args.merged or os.path.join(args.workdir, "merged")
    write_merged(run.plug, tree, run.model_cfg, run.tokenizer, out)
    print(f"wrote merged HF model to {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
