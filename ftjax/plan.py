"""A memory plan before launch: the real train step compiled ahead of time, no weights loaded.

  python -m ftjax.plan --config configs/quickstart.py [--mesh data=1,fsdp=8,tensor=1]
      [--device v5e|v5p|v6e|a100-80g|h100|h200] [--config.model.name_or_path=llama-3-8b]

The model is built abstractly (`nnx.eval_shape`: shapes, dtypes and logical axes, no memory),
adapters and a 4-bit base included; every array becomes a `jax.ShapeDtypeStruct` carrying the
sharding the run would give it, and the train step that `ftjax.train` runs is lowered and
compiled for the requested mesh. CPU host devices stand in for the chips (their count is set
before jax starts), so a v5e-8 plan compiles on a laptop. XLA's memory analysis of the compiled
step gives the per-device bytes; the inputs are split into parameters, adapters and optimizer
state from their own shardings. Temporaries are those of XLA:CPU's buffer assignment, an
estimate of a TPU's or GPU's (their fusions differ), which is why a fit is judged with headroom.

Models are named by a built-in name, a HF directory, a .gguf file (only their config / metadata
is read) or one of `KNOWN_MODELS`, published configs whose weights are never needed here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

from ftjax import config as config_lib
from ftjax import run as run_lib
from ftjax.cli import parse_flags
from ftjax.errors import FtjaxError, cli_errors
from ftjax.models.config import ModelConfig, load_hf_config
from ftjax.models.gguf import gguf_config, open_gguf
from ftjax.models.resolve import HUB_ID, local_path
from ftjax.run import jit_train_step
from ftjax.tokenizer import read_gguf_metadata

# The device count must be set before jax's backend starts; only this CLI's own process does it.
_DEVICE_FLAG = "--xla_force_host_platform_device_count"

# HBM per chip (GiB), and the fraction a run can use: XLA:TPU reserves a little; JAX on GPU
# preallocates 75% of the memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION raises it).
DEVICES = {
    "v5e": (16, 0.95),
    "v5p": (95, 0.95),
    "v6e": (32, 0.95),
    "a100-80g": (80, 0.75),
    "h100": (80, 0.75),
    "h200": (141, 0.75),
}

# Shapes from the models' published config.json files (meta-llama on the Hugging Face Hub).
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
               max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
               eos_token_id=128001, hidden_act="silu")
KNOWN_MODELS = {
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "llama-3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
}
KNOWN_MODELS["meta-llama/meta-llama-3-8b"] = KNOWN_MODELS["meta-llama/meta-llama-3-8b-instruct"] = \
    KNOWN_MODELS["llama-3-8b"]
KNOWN_MODELS["meta-llama/meta-llama-3-70b"] = KNOWN_MODELS["meta-llama/meta-llama-3-70b-instruct"] = \
    KNOWN_MODELS["llama-3-70b"]

GIB = 2**30


def model_config(name_or_path: str):
  """The ModelConfig of a model reference without reading its weights."""
  known = KNOWN_MODELS.get(name_or_path.lower())
  if known is not None:
    return ModelConfig.from_hf_dict(known, source=f"ftjax.plan.KNOWN_MODELS[{name_or_path!r}]")
  if HUB_ID.match(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
    return ModelConfig.from_hf_file(_hub_config(name_or_path))  # config.json only, no weights
  path = local_path(name_or_path)
  if os.path.isdir(path):
    return load_hf_config(path)
  reader = open_gguf(path)  # memory-mapped: only the metadata is read
  return gguf_config(reader, read_gguf_metadata(reader), path)


def _hub_config(repo_id: str) -> str:
  try:
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo_id, "config.json")
  except Exception as e:  # noqa: BLE001 - offline, auth, missing repo: all mean "not fetched"
    raise FtjaxError(f"{repo_id}: could not fetch its config.json from the Hugging Face Hub "
                     f"({type(e).__name__}); pass a local directory, a .gguf file or one of "
                     f"{', '.join(sorted(KNOWN_MODELS))}") from None


@dataclasses.dataclass
class Plan:
  """Per-device bytes of one compiled train step."""
  mesh: dict
  params: int  # the frozen base (float or 4-bit codes + statistics)
  adapters: int  # the trained params (all params for full fine-tuning)
  optimizer: int
  batch: int
  other: int  # step counter, rng, mutable state
  temporaries: int  # XLA's temp allocation: activations, gradients, the logits
  outputs: int  # outputs not written over donated inputs (metrics)
  code: int  # the compiled program
  vocab_chunk: int = 0  # train.vocab_chunk in effect (0: whole logits)
  # GRPO: the rollouts' KV cache (G x prompts rows) and their other buffers, counted on top of
  # the step (an upper bound: they live between steps, when the step's temporaries are freed)
  rollout_cache: int = 0
  rollout_buffers: int = 0
  compiled: object = dataclasses.field(default=None, repr=False, compare=False)  # the executable

  @property
  def total(self) -> int:
    return (self.params + self.adapters + self.optimizer + self.batch + self.other
            + self.temporaries + self.outputs + self.code + self.rollout_cache
            + self.rollout_buffers)

  def rows(self) -> list[tuple[str, int]]:
    return [("parameters (frozen base)", self.params), ("adapters / trained params", self.adapters),
            ("optimizer state", self.optimizer), ("batch", self.batch),
            ("temporaries (activations, gradients, logits)", self.temporaries),
            ("other inputs + outputs + code", self.other + self.outputs + self.code),
            *_rollout_rows(self), ("total per device", self.total)]


def _rollout_rows(result: Plan) -> list[tuple[str, int]]:
  if not result.rollout_cache:
    return []
  return [("GRPO rollout KV cache (G x prompts rows)", result.rollout_cache),
          ("GRPO rollout prefill copy + logits + tokens", result.rollout_buffers)]


def _shard_bytes(tree) -> int:
  """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings; the largest shard)."""
  import jax
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def abstract_run(config):
  """`ftjax.run.abstract_run` of `config`: the pieces `setup` builds, with ShapeDtypeStructs
  (sharded as the run places them) in place of arrays -> (run, abstract state, abstract batch).
  The model's config is read without its weights (`model_config`); nothing is loaded."""
  config_lib.validate(config)
  if config.model.attention != "xla":
    # A fused kernel compiles only on its own backend: its memory is planned with the XLA path,
    # which materialises the [t, s] scores a flash kernel never does (an upper bound).
    config = with_changes(config, {"model.attention": "xla"})
  return run_lib.abstract_run(config, model_config(config.model.name_or_path))


def plan(config) -> Plan:
  """Compiles the train step of `config` for its mesh and accounts for every device byte."""
  return plan_of(*abstract_run(config))


def plan_of(run, state, batch) -> Plan:
  """The plan of an `abstract_run`'s step."""
  compiled = jit_train_step(run, state).lower(state, run.frozen, batch).compile()
  mem = compiled.memory_analysis()
  other = _shard_bytes({k: v for k, v in state.items() if k not in ("trainable", "opt_state")})
  return Plan(mesh=dict(run.mesh.shape), params=_shard_bytes(run.frozen),
              adapters=_shard_bytes(state["trainable"]), optimizer=_shard_bytes(state["opt_state"]),
              batch=_shard_bytes(batch), other=other, temporaries=mem.temp_size_in_bytes,
              outputs=max(0, mem.output_size_in_bytes - mem.alias_size_in_bytes),
              code=mem.generated_code_size_in_bytes, vocab_chunk=run.loss_fn.vocab_chunk,
              compiled=compiled, **_rollout_bytes(run))


def _rollout_bytes(run) -> dict:
  """GRPO's rollout memory (ftjax.objectives.grpo.GRPO.rollout_memory); none for the others."""
  memory = getattr(run.objective, "rollout_memory", None)
  if memory is None:
    return {}
  found = memory(run)
  return {"rollout_cache": found["kv_cache"], "rollout_buffers": found["buffers"]}


def usable_bytes(device: str) -> int:
  hbm, fraction = DEVICES[device]
  return int(hbm * fraction * GIB)


def knobs(config) -> list[tuple[str, dict]]:
  """Changes that lower the memory a step needs, cheapest in speed first: (description,
  {dotted config key: value}). Each is planned for real by `suggest`."""
  out = []
  if config.model.remat not in ("full",):
    out.append(("remat: model.remat=full (recompute the layer body in the backward pass)",
                {"model.remat": "full"}))
  micro = config.train.batch_size // config.train.grad_accum
  shards = config.mesh.data * config.mesh.fsdp if config.mesh.data > 0 else 1
  if micro > shards and config.train.batch_size % shards == 0:  # one row per batch shard
    accum = config.train.batch_size // shards
    out.append((f"micro-batch: train.grad_accum={accum} (micro-batch {shards}, one row per "
                "data-parallel device; same batch per step)", {"train.grad_accum": accum}))
  if config.mesh.data > 1:  # the same devices, all sharding the params instead of copying them
    fsdp = config.mesh.data * config.mesh.fsdp
    out.append((f"fsdp size: mesh data=1, fsdp={fsdp} (params and optimizer state sharded over "
                "every data-parallel device)", {"mesh.data": 1, "mesh.fsdp": fsdp}))
  methods = config_lib.methods(config)
  if not config_lib.quant_type(config) and "full" not in methods:
    out.append(("QLoRA: quant.type=nf4 (the frozen base in 4 bits)", {"quant.type": "nf4"}))
  return out


def with_changes(config, changes: dict):
  config = config.copy_and_resolve_references()
  for key, value in changes.items():  # "train.grad_accum", "method"
    node = config
    *blocks, name = key.split(".")
    for block in blocks:
      node = node[block]
    node[name] = value
  return config


def suggest(config, device: str | None, report=print, usable: int | None = None
            ) -> list[tuple[str, Plan]]:
  """Plans each knob alone, then all of them together, until one fits `device` (or `usable`
  bytes per device); returns the plans made."""
  usable = usable_bytes(device) if usable is None else usable
  found = []
  candidates = knobs(config)
  if len(candidates) > 1:
    candidates.append(("all of the above", {k: v for _, c in candidates for k, v in c.items()}))
  for what, changes in candidates:
    try:
      result = plan(with_changes(config, changes))
    except Exception as e:  # noqa: BLE001 - a knob that does not apply (e.g. divisibility)
      report(f"  {what}: not applicable ({type(e).__name__}: {str(e).splitlines()[0]})")
      continue
    fits = result.total <= usable
    report(f"  {what}: {result.total / GIB:.2f} GiB per device -> {'fits' if fits else 'does not fit'}")
    found.append((what, result))
    if fits:
      break
  return found


def format_plan(config, result: Plan, device: str | None) -> str:
  mesh = ", ".join(f"{k}={v}" for k, v in result.mesh.items())
  note = ([f"model.attention={config.model.attention!r} planned with the XLA kernel (an upper "
           "bound: it keeps the attention scores a flash kernel does not)"]
          if config.model.attention != "xla" else [])
  lines = [f"model {config.model.name_or_path} ({config.method}, base {config.model.param_dtype}"
           + (f", 4-bit {config.quant.type or 'nf4'}" if config.quant.type or "qlora" in config.method
              else "") + f"), batch {config.train.batch_size} x {config.data.seq_len} tokens, "
           f"grad_accum {config.train.grad_accum}, remat {config.model.remat}, vocab_chunk "
           f"{result.vocab_chunk or 'off'}; mesh {mesh}",
           *note, "per-device bytes (XLA memory analysis of the compiled train step):"]
  for name, nbytes in result.rows():
    lines.append(f"  {name:<48} {nbytes / GIB:9.3f} GiB")
  if device:
    hbm, fraction = DEVICES[device]
    fits = result.total <= usable_bytes(device)
    lines.append(f"{device}: {hbm} GiB HBM, {hbm * fraction:.1f} GiB usable "
                 f"({fraction:.0%}) -> {'FITS' if fits else 'DOES NOT FIT'}")
  return "\n".join(lines)


def parse_mesh(text: str) -> dict:
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, _, value = part.partition("=")
    if key not in ("data", "fsdp", "tensor") or not value.lstrip("-").isdigit():
      raise FtjaxError(f"--mesh: {part!r}; expected e.g. data=1,fsdp=8,tensor=1")
    out[key] = int(value)
  return out


def _device_count(mesh: dict) -> int | None:
  sizes = [mesh.get(k, 1) for k in ("data", "fsdp", "tensor")]
  return None if any(s < 1 for s in sizes) else math.prod(sizes)


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  # Our own flags first, so the device count is known before jax (imported by the config) starts.
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--mesh", default="")
  pre.add_argument("--device", default=None)
  pre.add_argument("--no_suggest", action="store_true")
  ours, rest = pre.parse_known_args(argv[1:])
  mesh = {}
  try:
    mesh = parse_mesh(ours.mesh)
  except Exception as e:  # noqa: BLE001 - reported by cli_errors below, once jax may import
    mesh_error = e
  else:
    mesh_error = None
  count = _device_count(mesh) if mesh else None
  # Importing ftjax imports jax, but XLA reads the flag only when the backend first starts.
  if count and _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  _main([argv[0], *rest], mesh, mesh_error, ours.device, not ours.no_suggest)


@cli_errors
def _main(argv, mesh: dict, mesh_error, device: str | None, with_suggestions: bool) -> None:
  from absl import flags
  from ml_collections import config_flags
  if mesh_error is not None:
    raise mesh_error
  if device is not None and device not in DEVICES:
    raise FtjaxError(f"--device {device!r}; known: {', '.join(DEVICES)}")
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, "a configs/<name>.py file", lock_config=True)
  config = parse_flags(argv)
  config = with_changes(config, {f"mesh.{k}": v for k, v in mesh.items()})
  result = plan(config)
  print(format_plan(config, result, device))
  if device and with_suggestions and result.total > usable_bytes(device):
    print("knobs that lower it (each planned on the same mesh):")
    suggest(config, device)


if __name__ == "__main__":
  main()
