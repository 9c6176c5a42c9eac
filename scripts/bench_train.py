"""Train-step throughput of ftjax, optionally side by side with HF transformers + peft.

  python scripts/bench_train.py --config configs/quickstart.py --batch 8 --seq 128 [--vs-peft]

Trains on random tokens of shape [batch, seq] with the config's model and method and prints one
JSON line: tokens_per_s, step_s (median of the timed steps after --warmup), compile_s, model
FLOPs per step, MFU against a measured f32 matmul ceiling on CPU (the device's peak on GPU/TPU),
and memory: bytes of base weights per parameter (4 for f32, ~0.52 for NF4 + double quant), the
compiled step's device memory (XLA's accounting: arguments + outputs + temporaries), the
device's peak where it reports one, and the peak host RSS.

With --vs-peft the same weights, batch and sequence length are also trained by transformers +
peft (LoRA, same rank/alpha/targets, AdamW) in a persistent child process. With --vs-tree DIR
the same benchmark of another ftjax checkout (e.g. a `git worktree` of the commit before a
change) runs in a persistent child too. All of them run in alternating rounds (--rounds x
--steps each) so that a slow phase of a noisy machine hits each; the line carries each one's
tokens/s, the ratio of each round, and their median as ratio_vs_peft / ratio_vs_tree (> 1:
this checkout is faster). Run on an otherwise idle machine.

The rows are those of the config's objective (ftjax.objectives: `synthetic_batch`'s shapes, one
document per row), so every objective's real jitted step is timed:
  --config configs/preference.py --vs-trl      DPO pairs [batch, 2, seq] (tokens count both
      replies) against trl's DPO loss + peft LoRA, reference = adapter disabled on both sides
  --config configs/classification.py --num-labels 150 --vs-peft   the classification step
      against transformers AutoModelForSequenceClassification + peft SEQ_CLS
  --config configs/grpo.py --vs-trl            GRPO: each step = rollout of `batch`
      completions (G per prompt, max_new_tokens each) + update, against TRL's generation and
      GRPO loss; the line adds rollout_s, update_s, rollout_tokens_per_s per side
Mixture of experts (issue 21): --moe-model tiny|smollm2 trains a random-init Mixtral (or
--moe-family qwen3_moe) built from a config, at the tests' scale (d 64, 2 layers, 4 experts of
32, top-2) or SmolLM2-135M's (d 576, 30 layers, 9 / 3 heads, vocab 49152; 8 experts of 384,
top-2: the experts hold twice the dense model's FFN width, a token uses half of it).
--moe-experts ragged|dense picks this process's expert computation (default: jax's backend's,
ftjax.models.moe.default_implementation) and --vs-experts ragged|dense times the other one in a
child, in alternating rounds; with --vs-peft transformers + peft train the same model (all-linear
LoRA: attention, experts and router on both sides). E.g.
  nice python scripts/bench_train.py --config configs/quickstart.py --moe-model tiny \
      --moe-experts ragged --vs-experts dense --vs-peft
The children are in scripts/bench_children.py (what each runs is in its docstring). With a
side by side run, memory_ratio_vs_<other> = this process's peak host RSS / the child's (each
process's getrusage ru_maxrss over its whole life: load, compile, every step). --vs-tree runs
any older checkout's own FtjaxBench (one that predates objectives times SFT rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

# Published bf16 dense peaks (FLOP/s) for MFU on accelerators.
DEVICE_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "v5e": 197e12, "v4": 275e12,
                "v5p": 459e12, "v6e": 918e12, "L4": 121e12, "4090": 165e12}


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def matmul_ceiling(dtype=jnp.float32, n: int = 2048, reps: int = 5) -> float:
  """Measured FLOP/s of one large jnp.dot: the honest 'peak' of a CPU."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times)


def peak_flops() -> tuple[float, str]:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return matmul_ceiling(), "measured f32 matmul ceiling"
  kind = device.device_kind
  for name, flops in DEVICE_PEAKS.items():
    if name.lower() in kind.lower():
      return flops * len(jax.devices()), f"{kind} bf16 peak x{len(jax.devices())}"
  return float("nan"), f"unknown peak for {kind}"


def random_batch(rng, batch: int, seq: int, vocab: int, accum: int = 1) -> dict:
  tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
  rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((batch, seq), np.float32),
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}
  return {k: v.reshape(accum, batch // accum, seq) for k, v in rows.items()}


def objective_batch(objective, vocab: int) -> dict:
  """A batch of the objective's rows (its `synthetic_batch`: random tokens of `row_spec`'s
  shapes), made one document per sequence with positions 0..seq-1 as real rows are: the dense
  compute does not depend on the token values, but attention does depend on the segment ids."""
  batch = objective.synthetic_batch(vocab)
  seq_shape = batch["inputs"].shape
  if "segment_ids" in batch:
    batch["segment_ids"] = np.ones(seq_shape, np.int32)
  if "positions" in batch:
    batch["positions"] = np.broadcast_to(np.arange(seq_shape[-1], dtype=np.int32), seq_shape).copy()
  return batch


class FtjaxBench:
  """The ftjax train step of the config's objective, compiled once and timed in rounds of steps.

  The rows are the objective's (`objective_batch`): SFT rows, DPO pairs [batch, 2, seq] (chosen
  and rejected in one forward, the reference = adapters disabled in the same step),
  classification rows with a label, GRPO completions. For GRPO (`rollout`) each timed step is a
  rollout of the batch's completions with ftjax's sampler on the current params, prompts of
  seq - grpo.max_new_tokens random tokens and no stop token (every completion max_new_tokens
  long), then the update on those rows; the two parts are timed apart too (`parts`)."""

  def __init__(self, config, batch: int, seq: int):
    from ftjax import run as run_lib
    from ftjax.flops import run_flops_per_token
    config.train.batch_size = batch
    config.data.seq_len = seq
    self.config, self.batch, self.seq = config, batch, seq
    self.run = run_lib.setup(config, with_data=False)
    self.state, _ = run_lib.init_or_restore(self.run, None)
    step = run_lib.jit_train_step(self.run, self.state)
    self.objective = getattr(config, "objective", "sft")
    self.data = objective_batch(self.run.objective, self.run.model_cfg.vocab_size)
    self.rollout = self.objective == "grpo"
    self.parts = {"rollout_s": [], "update_s": []} if self.rollout else {}
    t = time.perf_counter()
    self.compiled = step.lower(self.state, self.run.frozen, self.data).compile()
    self.compile_s = time.perf_counter() - t
    self.tokens_per_step = int(self.data["inputs"].size)  # DPO: both replies of each pair
    self.flops = self.tokens_per_step * run_flops_per_token(self.run, self.state["trainable"])

  def steps(self, n: int) -> list[float]:
    times = []
    for _ in range(n):
      t = time.perf_counter()
      if self.rollout:
        self._rollout_into_data()
      u = time.perf_counter()
      self.state, self.metrics = self.compiled(self.state, self.run.frozen, self.data)
      jax.block_until_ready(self.metrics)
      times.append(time.perf_counter() - t)
      if self.rollout:
        self.parts["rollout_s"].append(u - t)
        self.parts["update_s"].append(times[-1] - (u - t))
    return times

  def _rollout_into_data(self) -> None:
    """GRPO: batch / G random prompts, G sampled completions each, into the step's rows."""
    from ftjax.objectives.grpo_rollout import rollout_rows
    b = self.config.grpo
    g, new = int(b.num_generations), int(b.max_new_tokens)
    rng = np.random.default_rng(len(self.parts["rollout_s"]))
    vocab = self.run.model_cfg.vocab_size
    prompts = rng.integers(0, vocab, (self.batch // g, self.seq - new)).tolist()
    rows, _, _ = rollout_rows(self.run.model(self.state["trainable"]), prompts, num_generations=g,
                              seq_len=self.seq, max_new_tokens=new, eos_ids=(),
                              temperature=float(b.temperature), top_k=int(b.top_k),
                              top_p=float(b.top_p), seed=len(self.parts["rollout_s"]))
    shape = self.data["inputs"].shape
    for key, value in rows.items():
      self.data[key] = np.asarray(value).astype(self.data[key].dtype).reshape(shape)
    self.data["advantages"] = rng.normal(size=self.data["advantages"].shape).astype(np.float32)

  def summary(self, times: list[float]) -> dict:
    config = self.config
    step_s = statistics.median(times)
    peak, peak_source = peak_flops()
    out = {"framework": "ftjax", "device": jax.devices()[0].device_kind, "devices": len(jax.devices()),
           "model": config.model.name_or_path, "method": config.method, "dtype": config.model.dtype,
           "remat": config.model.remat, "scan_unroll": config.model.scan_unroll, "batch": self.batch,
           "objective": self.objective, "seq": self.seq, "tokens_per_step": self.tokens_per_step,
           "tokens_per_s": self.tokens_per_step / step_s, "step_s": step_s,
           "step_s_all": times, "compile_s": self.compile_s, "flops_per_step": self.flops,
           "achieved_flops_per_s": self.flops / step_s, "peak_flops_per_s": peak,
           "peak_source": peak_source, "mfu": self.flops / step_s / peak,
           "loss": float(self.metrics["loss"])}
    out.update(part_medians(self.parts, self.rollout_tokens()))
    if self.run.model_cfg.is_moe:
      from ftjax.models import moe
      out["moe_experts"] = moe.default_implementation()
    if "update_s" in out:  # GRPO: the FLOPs counted are the update's, not the sampling's
      out["achieved_flops_per_s"] = self.flops / out["update_s"]
      out["mfu"] = out["achieved_flops_per_s"] / peak
    out.update(self.memory())
    return out

  def rollout_tokens(self) -> int:
    return self.batch * int(self.config.grpo.max_new_tokens) if self.rollout else 0

  def memory(self) -> dict:
    """Base weight storage, the step's device memory (XLA's own accounting of the compiled step:
    arguments + outputs + temporaries, less donated buffers; it works on CPU too) and peak RSS."""
    from flax import nnx
    from ftjax import peft, quant
    model = self.run.model()
    base = jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(peft.AdapterParam))),
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
    n_base = sum(0 if isinstance(v, quant.QuantStat) else  # block statistics: storage only
                 v.size * (2 if v.dtype == jnp.uint8 else 1) for v in base)  # 2 codes per byte
    base_bytes = sum(v.size * v.dtype.itemsize for v in base)
    mem = self.compiled.memory_analysis()
    step_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                  - mem.alias_size_in_bytes)
    out = {"base_gib": base_bytes / 2**30, "base_bytes_per_param": base_bytes / n_base,
           "quantised_bits_per_param": quant.base_bits_per_param(model) or None,
           "step_device_gib": step_bytes / 2**30, "step_temp_gib": mem.temp_size_in_bytes / 2**30}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    out["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def part_medians(parts: dict, rollout_tokens: int) -> dict:
  """Median of each timed part of a step (GRPO: rollout_s, update_s) and the rollout's sampled
  tokens per second."""
  out = {k: statistics.median(v) for k, v in parts.items() if v}
  if "rollout_s" in out:
    out["rollout_tokens_per_s"] = rollout_tokens / out["rollout_s"]
  return out


def peft_child(model_dir: str, batch: int, seq: int, rank: int, alpha: float, dtype: str) -> None:
  """Runs in a child process: transformers + peft LoRA training on the same weights.

  Protocol: after loading, prints {"ready": ...}; then for each stdin line N runs N steps and
  prints their times as one JSON line; exits on "quit" or end of input.
  """
  import torch
  import transformers
  import peft
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
  model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear",
                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
  tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
  print(json.dumps({"ready": True, "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": peft.__version__, "threads": torch.get_num_threads()}), flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      break
    times = []
    for _ in range(int(line)):
      t = time.perf_counter()
      loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
      times.append(time.perf_counter() - t)
    print(json.dumps({"step_s_all": times,
                      "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
          flush=True)


def tree_child(root: str, config_path: str, batch: int, seq: int, overrides: dict) -> None:
  """Runs in a child process: the benchmark of the ftjax checkout at `root`, same protocol as
  `peft_child`. Its own scripts/bench_train.py and ftjax package are imported, not ours."""
  sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location("tree_bench", os.path.join(root, "scripts", "bench_train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.load_config(config_path)
  apply_overrides(config, overrides)
  bench = module.FtjaxBench(config, batch, seq)
  import ftjax
  if not os.path.abspath(ftjax.__file__).startswith(os.path.abspath(root) + os.sep):
    raise SystemExit(f"--vs-tree: imported ftjax from {ftjax.__file__}, not from {root}")
  print(json.dumps({"ready": True, "root": root, "config": config_path, "compile_s": bench.compile_s,
                    "objective": getattr(config, "objective", "sft")}), flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      break
    n = int(line)
    times = bench.steps(n)
    # GRPO: this round's rollout_s / update_s too, so rollout_ratio_vs_tree compares the sampler
    parts = {name: values[-n:] for name, values in getattr(bench, "parts", {}).items()}
    print(json.dumps({"step_s_all": times, "parts": parts,
                      "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
          flush=True)


class ChildBench:
  """A persistent child process (`--peft-child` / `--tree-child`), so it can be timed in
  alternating rounds with this process's own steps."""

  def __init__(self, name: str, config_path: str, flag: str, child_args: dict):
    self.name = name
    self.parts = {}  # GRPO's rollout_s / update_s per step, where the child times them
    self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block it
    self.proc = subprocess.Popen([sys.executable, __file__, "--config", config_path, flag,
                                  json.dumps(child_args)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.stderr, text=True)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.stderr.seek(0)
      raise SystemExit(f"{self.name} run failed:\n{self.stderr.read()[-3000:]}")
    return json.loads(line)

  def steps(self, n: int) -> list[float]:
    self.proc.stdin.write(f"{n}\n")
    self.proc.stdin.flush()
    out = self._read()
    self.info["host_peak_rss_gib"] = out["host_peak_rss_gib"]
    for name, values in out.get("parts", {}).items():
      self.parts.setdefault(name, []).extend(values)
    return out["step_s_all"]

  def close(self) -> None:
    self.proc.communicate("quit\n")


# command-line flag -> (config node, key) it overrides; moe_experts is no config key (below)
OVERRIDES = {"method": ("", "method"), "dtype": ("model", "dtype"), "remat": ("model", "remat"),
             "scan_unroll": ("model", "scan_unroll"), "model": ("model", "name_or_path"),
             "moe_experts": (None, None)}


def apply_overrides(config, values: dict) -> None:
  for arg, value in values.items():
    if arg == "moe_experts":
      use_expert_implementation(value)
      continue
    node, key = OVERRIDES[arg]
    setattr(config[node] if node else config, key, value)


def use_expert_implementation(name: str) -> None:
  """MoE layers built from now on compute their experts with `name` ("ragged": grouped
  ragged_dot matmuls, "dense": every token through every expert), whatever the backend."""
  from ftjax.models import moe
  if name not in moe.IMPLEMENTATIONS:
    raise SystemExit(f"--moe-experts {name!r}: expected one of {sorted(moe.IMPLEMENTATIONS)}")
  moe.default_implementation = lambda: name


# --moe-model scales: the tests' tiny MoE, and SmolLM2-135M's shapes with 8 experts of 384
MOE_SCALES = {
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=32, num_experts=4),
    "smollm2": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=384, num_experts=8),
}


def build_moe_model(scale: str, family: str, out_dir: str) -> str:
  """A random-init transformers MoE model of `scale` saved in `out_dir` (f32), with the
  routers scaled up so tokens spread over the experts as in a trained model (at the 0.02 init
  every router is near-uniform)."""
  import torch
  import transformers
  dims = dict(MOE_SCALES[scale])
  experts = dims.pop("num_experts")
  common = dict(dims, num_experts_per_tok=2, router_aux_loss_coef=0.02, max_position_embeddings=2048,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if family == "mixtral":
    config = transformers.MixtralConfig(**common, num_local_experts=experts)
  else:
    config = transformers.Qwen3MoeConfig(**common, num_experts=experts,
                                         moe_intermediate_size=dims["intermediate_size"],
                                         head_dim=dims["hidden_size"] // dims["num_attention_heads"])
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("gate.weight"):
        p.mul_(50.0)
  model.save_pretrained(out_dir)
  save_placeholder_tokenizer(out_dir, dims["vocab_size"])
  return out_dir


def save_placeholder_tokenizer(out_dir: str, vocab_size: int) -> None:
  """A word-level tokenizer over the model's ids (the step trains on random ids; ftjax's setup
  reads a tokenizer from the model folder): <pad> 0, <s> 1, </s> 2, then t3, t4, ..."""
  from tokenizers import Tokenizer as Backend
  from tokenizers import models
  from ftjax.tokenizer import Tokenizer
  names = ["<pad>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab_size)]
  backend = Backend(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<pad>"))
  Tokenizer(backend, eos_token="</s>", pad_token="<pad>").save(out_dir)


def tree_config(root: str, config_path: str) -> str:
  """The other checkout's copy of a config of this one (the same path inside it, whatever the
  working directory); a config outside this checkout as it is."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  inside = os.path.relpath(os.path.abspath(config_path), here)
  return config_path if inside.startswith("..") else os.path.join(root, inside)


def torch_child(config_path: str, objective: str, config, same: dict, batch: int):
  """(name, config path, flag, arguments) of the objective's PyTorch child (bench_children)."""
  if objective == "classification":
    from ftjax import objectives
    return ("peft", config_path, "--torch-child", dict(
        same, fn="seqcls_child", batch=batch, num_labels=len(objectives.get(config).labels())))
  if objective == "dpo":
    return ("trl", config_path, "--torch-child",
            dict(same, fn="trl_dpo_child", pairs=batch, beta=float(config.dpo.beta)))
  g = config.grpo
  return ("trl", config_path, "--torch-child", dict(
      same, fn="trl_grpo_child", batch=batch, num_generations=int(g.num_generations),
      max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature), top_p=float(g.top_p),
      top_k=int(g.top_k), loss_type=g.loss_type, epsilon=float(g.epsilon),
      epsilon_high=float(g.epsilon_high or g.epsilon)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the first round")
  parser.add_argument("--rounds", type=int, default=3,
                      help="with --vs-peft / --vs-tree: alternating rounds of --steps steps of each")
  parser.add_argument("--gap", type=float, default=3.0,
                      help="idle seconds before each round: ftjax ran slower for a few seconds "
                           "right after a PEFT round on the 2-core VM, so each side starts settled")
  parser.add_argument("--method", default=None, help="any config method (lora, ia3, prompt, ...)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="any other config key, e.g. --set lora.use_dora=true (JSON values)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  parser.add_argument("--remat", default=None)
  parser.add_argument("--scan-unroll", type=int, default=None, help="-1 unrolls every layer")
  parser.add_argument("--model", default=None, help="overrides config.model.name_or_path")
  parser.add_argument("--vs-peft", action="store_true")
  parser.add_argument("--vs-tree", default=None, metavar="DIR",
                      help="another ftjax checkout to time in the same rounds (e.g. the commit "
                           "before a change, as a git worktree)")
  parser.add_argument("--vs-trl", action="store_true",
                      help="DPO / GRPO configs: TRL's step + peft LoRA in a persistent child")
  parser.add_argument("--vs-config", default=None, metavar="CONFIG",
                      help="this checkout with another config (same model, batch, seq, "
                           "overrides) in the same rounds, e.g. the SFT step beside the "
                           "classification step: --vs-config configs/quickstart.py")
  parser.add_argument("--num-labels", type=int, default=None,
                      help="classification: this many classes (c0, c1, ...) instead of the "
                           "config's classification.labels, which may need the train data")
  parser.add_argument("--moe-model", choices=sorted(MOE_SCALES), default=None,
                      help="train a random-init MoE built from a config at this scale")
  parser.add_argument("--moe-family", choices=["mixtral", "qwen3_moe"], default="mixtral")
  parser.add_argument("--moe-experts", choices=["ragged", "dense"], default=None,
                      help="this process's expert computation (default: the backend's)")
  parser.add_argument("--vs-experts", choices=["ragged", "dense"], default=None,
                      help="also time the other expert computation, in a child")
  parser.add_argument("--peft-child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--torch-child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--tree-child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.peft_child:  # we are a child: the flag's value is the JSON of its arguments
    peft_child(**json.loads(args.peft_child))
    return
  if args.tree_child:
    tree_child(**json.loads(args.tree_child))
    return
  if args.torch_child:  # {"fn": a child of scripts/bench_children.py, its arguments...}
    import bench_children
    child_args = json.loads(args.torch_child)
    getattr(bench_children, child_args.pop("fn"))(**child_args)
    return

  with tempfile.TemporaryDirectory() as moe_dir:
    if args.moe_model:
      args.model = build_moe_model(args.moe_model, args.moe_family, moe_dir)
    bench_main(args)


def bench_main(args) -> None:
  config = load_config(args.config)
  overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
  apply_overrides(config, overrides)
  for item in args.set:
    key, _, text = item.partition("=")
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      value = text
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  if args.num_labels:
    config.classification.labels = ",".join(f"c{i}" for i in range(args.num_labels))
  objective = getattr(config, "objective", "sft")
  if (args.vs_peft or args.vs_trl) and config.method != "lora":
    raise SystemExit("--vs-peft / --vs-trl compare LoRA training; use a LoRA config")
  if args.vs_peft and objective not in ("sft", "classification"):
    raise SystemExit(f"--vs-peft times SFT or classification; objective={objective!r} (--vs-trl?)")
  if args.vs_trl and objective not in ("dpo", "grpo"):
    raise SystemExit(f"--vs-trl times DPO or GRPO; objective={objective!r}")
  bench = FtjaxBench(config, args.batch, args.seq)
  bench.steps(args.warmup)
  if not (args.vs_peft or args.vs_tree or args.vs_trl or args.vs_config or args.vs_experts):
    print(json.dumps(bench.summary(bench.steps(args.steps * args.rounds))))
    return

  from ftjax import peft
  with tempfile.TemporaryDirectory() as tmp:
    others = []
    if args.vs_peft or args.vs_trl:
      model_dir = os.path.join(tmp, "base")
      # The objective's own export (classification: a *ForSequenceClassification directory).
      bench.run.objective.save_merged(peft.unload(bench.run.model()), None, model_dir)
      same = dict(model_dir=model_dir, seq=args.seq, rank=config.lora.rank,
                  alpha=config.lora.alpha, dtype=config.model.dtype)
      if objective == "sft":
        others.append(ChildBench("peft", args.config, "--peft-child", dict(same, batch=args.batch)))
      else:
        others.append(ChildBench(*torch_child(args.config, objective, config, same, args.batch)))
    if args.vs_tree:
      root = os.path.abspath(args.vs_tree)
      others.append(ChildBench("tree", args.config, "--tree-child", dict(
          root=root, config_path=tree_config(root, args.config),
          batch=args.batch, seq=args.seq, overrides=overrides)))
    if args.vs_config:
      others.append(ChildBench("config", args.config, "--tree-child", dict(
          root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
          config_path=os.path.abspath(args.vs_config), batch=args.batch, seq=args.seq,
          overrides=overrides)))
    if args.vs_experts:  # this checkout and config, the other expert computation
      others.append(ChildBench(f"experts_{args.vs_experts}", args.config, "--tree-child", dict(
          root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
          config_path=os.path.abspath(args.config), batch=args.batch, seq=args.seq,
          overrides=dict(overrides, moe_experts=args.vs_experts))))
    try:
      for other in others:
        other.steps(args.warmup)
      for parts in [bench.parts] + [o.parts for o in others]:  # time the rounds' steps only
        for values in parts.values():
          values.clear()
      ours, theirs = [], {o.name: [] for o in others}
      ratios = {o.name: [] for o in others}
      for _ in range(args.rounds):  # alternate, so slow phases of a noisy machine hit all
        time.sleep(args.gap)
        ours_round = bench.steps(args.steps)
        ours += ours_round
        for other in others:
          time.sleep(args.gap)
          theirs_round = other.steps(args.steps)
          theirs[other.name] += theirs_round
          ratios[other.name].append(statistics.median(theirs_round) / statistics.median(ours_round))
        # Each round's medians on stderr as it ends: a run cut short (a timeout on a loaded
        # machine) still leaves its finished rounds.
        print(json.dumps({"round": len(ratios[others[0].name]), "ftjax_step_s": statistics.median(
            ours_round), **{f"ratio_vs_{n}": r[-1] for n, r in ratios.items()}}),
              file=sys.stderr, flush=True)
    finally:
      for other in others:
        other.close()
  result = bench.summary(ours)
  for other in others:
    step = statistics.median(theirs[other.name])
    result[other.name] = dict(other.info, framework=other.name, step_s=step,
                              step_s_all=theirs[other.name],
                              tokens_per_s=bench.tokens_per_step / step)
    result[other.name].update(part_medians(other.parts, bench.rollout_tokens()))
    result[f"memory_ratio_vs_{other.name}"] = (result["host_peak_rss_gib"]
                                                / other.info["host_peak_rss_gib"])
    result[f"ratio_vs_{other.name}_rounds"] = ratios[other.name]
    result[f"ratio_vs_{other.name}"] = statistics.median(ratios[other.name])
    if "rollout_s" in other.parts:  # GRPO: the sampling part alone, median over all steps
      result[f"rollout_ratio_vs_{other.name}"] = (result[other.name]["rollout_s"]
                                                  / result["rollout_s"])
  print(json.dumps(result))


if __name__ == "__main__":
  main()
