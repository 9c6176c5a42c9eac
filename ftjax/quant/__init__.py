"""Quantised weights: 4-bit NF4 / FP4 in bitsandbytes' exact format (with double quantisation),
int8 per channel (qwix), and models whose frozen base lives in them (QLoRA).

  q = ftjax.quant.nf4_quantize(x, block_size=64, double_quant=True)   # a pytree
  x_hat = ftjax.quant.nf4_dequantize(q)
  q8 = ftjax.quant.int8_quantize(kernel)           # qwix QArray, a scale per output channel
  model = ftjax.quant.quantize_model(model)        # every nnx.Linear but lm_head -> QuantLinear
  model = ftjax.quant.dequantize_model(model)      # and back to float (for a merged export)
"""

from ftjax.quant.fourbit import (CODES, DYNAMIC_CODE, FP4_CODE, NF4_CODE, Quant4bit, absmax_values,
                                 dequantize_4bit, quantize_4bit)
from ftjax.quant.int8 import int8_dequantize, int8_quantize
from ftjax.quant.linear import (QuantCodes, QuantLinear, QuantSink, QuantStat, base_bits_per_param,
                                collect_sinks, dequantize_model, quant_sinks, quantize_kernel,
                                quantize_model)

__all__ = ["CODES", "DYNAMIC_CODE", "FP4_CODE", "NF4_CODE", "Quant4bit", "QuantCodes", "QuantLinear",
           "QuantSink", "QuantStat", "absmax_values", "base_bits_per_param", "collect_sinks",
           "dequantize_4bit", "dequantize_model", "fp4_dequantize", "fp4_quantize", "int8_dequantize",
           "int8_quantize", "nf4_dequantize",
           "nf4_quantize", "quant_sinks", "quantize_4bit", "quantize_kernel", "quantize_model"]


def nf4_quantize(x, block_size: int = 64, double_quant: bool = True) -> Quant4bit:
  return quantize_4bit(x, block_size, "nf4", double_quant)


def fp4_quantize(x, block_size: int = 64, double_quant: bool = True) -> Quant4bit:
  return quantize_4bit(x, block_size, "fp4", double_quant)


def nf4_dequantize(q: Quant4bit, dtype=None):
  return dequantize_4bit(q, dtype)


fp4_dequantize = nf4_dequantize  # the code book travels in the pytree
