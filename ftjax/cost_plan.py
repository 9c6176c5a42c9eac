"""The cost plan's arithmetic and text: from the train split's token statistics (the data
check's, ftjax.data.selection) and a probe (ftjax.cost.probe, or a Run, when training itself is
the probe): tokens per epoch and in total, wall time here, FLOPs, time and dollars on named
accelerators at `cost.mfu`, dollars at a hosted API's price per million tokens, and the peak
memory and whether it fits. ftjax/cost.py's docstring says why each figure is measured or
derived the way it is. Nothing here imports jax or the training stack: the data check's report
(ftjax.data.report) prices a run with it.
"""

from __future__ import annotations

import os

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity). The $/hour of
# each comes from the config (cost.usd_per_hour); defaults and their dates are in docs/data.md.
ACCELERATORS = {"A100": 312e12, "H100": 989e12, "L4": 121e12, "v5e": 197e12}


def host_memory_bytes() -> int:
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_plan(probed: dict) -> dict:
  """Peak memory of the run and whether it fits (see the module docstring)."""
  mem = probed["memory"]
  step = mem["step"]
  if probed["platform"] == "cpu":
    # Resident once compiled (arguments included) + what a step allocates on top; or the load,
    # which briefly holds the host copy of the weights and the placed copy at once.
    running = probed["compiled_rss_bytes"] + mem["temporaries"] + mem["outputs"] - mem["donated"]
    peak = max(probed["load_peak_rss_bytes"], running)
    limit = host_memory_bytes()
    where = "host RAM (the CPU backend's device memory)"
  else:
    peak = step
    limit = probed["device_bytes_limit"]
    where = f"{probed['device']} memory"
  return {"peak_bytes": int(peak), "step_bytes": int(step), "base_rss_bytes": probed["base_rss_bytes"],
          "compiled_rss_bytes": probed["compiled_rss_bytes"],
          "limit_bytes": limit, "where": where,
          "fits": None if not limit else bool(peak <= limit)}


def plan(config, train_stats: dict, probed: dict | None = None) -> dict:
  """The cost plan of a run: `train_stats` is the check's train split (examples, tokens,
  trained_tokens, rows), `probed` a `probe` result (None: tokens and API dollars only)."""
  c, t = config.cost, config.train
  rows = max(int(train_stats.get("rows", 0)), 1)
  steps = int(t.steps)
  epochs = steps * t.batch_size / rows
  tokens = int(train_stats.get("tokens", 0))
  trained = int(train_stats.get("trained_tokens", 0))
  out = {"steps": steps, "batch_size": int(t.batch_size), "seq_len": int(config.data.seq_len),
         "rows_per_epoch": rows, "epochs": round(epochs, 3),
         "tokens_per_epoch": tokens, "trained_tokens_per_epoch": trained,
         "tokens_total": int(round(tokens * epochs)), "trained_tokens_total": int(round(trained * epochs)),
         "api": {"usd_per_million_tokens": float(c.api_usd_per_million_tokens),
                 "billed_tokens": int(round(tokens * epochs)),
                 "usd": round(tokens * epochs / 1e6 * c.api_usd_per_million_tokens, 2)}}
  if probed is None:
    out["probe"] = ("the step was not probed (cost.probe_steps=0, or a training run, which "
                    "measures itself): no wall time, FLOPs or memory")
    return out
  flops_step = t.batch_size * config.data.seq_len * probed["flops_per_token"]
  out.update(
      flops_per_token=probed["flops_per_token"], flops_per_step=flops_step,
      flops_total=flops_step * steps, trainable_params=probed["trainable_params"],
      params=probed["params"],
      here={"device": f"{probed['device']} x{probed['devices']}", "step_s": probed["step_s"],
            "probe_steps": probed["steps"], "compile_s": probed["compile_s"],
            "load_s": probed["load_s"], "train_s": probed["step_s"] * steps,
            "achieved_flops_per_s": flops_step / probed["step_s"]},
      mfu=float(c.mfu), accelerators={},
      memory=memory_plan(probed))
  for name, peak in ACCELERATORS.items():
    seconds = flops_step * steps / (peak * c.mfu)
    usd_h = float(c.usd_per_hour[name])
    out["accelerators"][name] = {"peak_flops_per_s": peak, "usd_per_hour": usd_h,
                                 "train_s": seconds, "usd": seconds / 3600 * usd_h}
  return out


def summary_text(cost: dict) -> str:
  """The cost plan's lines of the terminal summary."""
  lines = [f"cost plan: {cost['steps']} steps x {cost['batch_size']} x {cost['seq_len']} = "
           f"{cost['epochs']:.2f} epochs of {cost['rows_per_epoch']} rows; "
           f"{cost['tokens_per_epoch']:,} tokens ({cost['trained_tokens_per_epoch']:,} trained) "
           f"per epoch, {cost['tokens_total']:,} ({cost['trained_tokens_total']:,}) in all"]
  if cost.get("lr_probe"):
    lines.append(f"  {cost['lr_probe']['line']}")
  api = cost["api"]
  lines.append(f"  hosted API at ${api['usd_per_million_tokens']:g}/M tokens: ${api['usd']:.2f} "
               f"for {api['billed_tokens']:,} billed tokens")
  if "here" not in cost:
    lines.append(f"  {cost['probe']}")
    return "\n".join(lines)
  here, mem = cost["here"], cost["memory"]
  lines.append(f"  here ({here['device']}): {here['train_s']:.0f} s of steps "
               f"({here['step_s']:.2f} s/step, median of {here['probe_steps']} probed) + "
               f"{here['compile_s']:.0f} s compile; {cost['flops_per_token'] / 1e9:.2f} GFLOP/token "
               f"(attention over whole {cost['seq_len']}-token rows; less for short packed "
               f"documents: ftjax/flops.py), {here['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s achieved")
  acc = ", ".join(f"{n} {a['train_s']:.3g} s ${a['usd']:.3g}" for n, a in cost["accelerators"].items())
  lines.append(f"  at {cost['mfu']:.0%} MFU: {acc}")
  fits = {True: "fits", False: "does NOT fit", None: "limit unknown"}[mem["fits"]]
  limit = f" of {mem['limit_bytes'] / 2**30:.1f} GiB" if mem["limit_bytes"] else ""
  lines.append(f"  peak memory ~{mem['peak_bytes'] / 2**30:.2f} GiB (step "
               f"{mem['step_bytes'] / 2**30:.2f} GiB): {fits} in {mem['where']}{limit}")
  return "\n".join(lines)
