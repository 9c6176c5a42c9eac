"""QLoRA quickstart: the quickstart task with SmolLM2-135M-Instruct's linear layers in 4 bits.

  python -m ftjax.train --config configs/quickstart_qlora.py

Every linear kernel but the LM head (tied here: the embedding table stays float anyway) is
quantised to NF4 with double quantisation while the model loads, layer by layer, in
bitsandbytes' format; LoRA (r=8, all linear layers) trains in f32 on top. Same data, steps and
learning rate as configs/quickstart.py, so the two runs compare (docs/benchmarks.md). Exports:
the adapter alone (HF PEFT format, for the float base) and, with export.merged, the float model
merged from the dequantised base.
"""

from configs.quickstart import get_config as quickstart


def get_config(runlocal: str = ""):
  c = quickstart(runlocal)
  c.method = "qlora"  # = lora on a quant.type="nf4" base
  c.quant.block_size = 64
  c.quant.double_quant = True
  return c
