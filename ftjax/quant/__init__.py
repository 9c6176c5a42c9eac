"""Quantised weights: 4-bit NF4 / FP4 in bitsandbytes' exact format (with double quantisation).

  q = ftjax.quant.nf4_quantize(x, block_size=64, double_quant=True)   # a pytree
  x_hat = ftjax.quant.nf4_dequantize(q)
"""

from ftjax.quant.fourbit import (CODES, DYNAMIC_CODE, FP4_CODE, NF4_CODE, Quant4bit, absmax_values,
                                 dequantize_4bit, quantize_4bit)

__all__ = ["CODES", "DYNAMIC_CODE", "FP4_CODE", "NF4_CODE", "Quant4bit", "absmax_values",
           "dequantize_4bit", "fp4_dequantize", "fp4_quantize", "nf4_dequantize", "nf4_quantize",
           "quantize_4bit"]


def nf4_quantize(x, block_size: int = 64, double_quant: bool = True) -> Quant4bit:
  return quantize_4bit(x, block_size, "nf4", double_quant)


def fp4_quantize(x, block_size: int = 64, double_quant: bool = True) -> Quant4bit:
  return quantize_4bit(x, block_size, "fp4", double_quant)


def nf4_dequantize(q: Quant4bit, dtype=None):
  return dequantize_4bit(q, dtype)


fp4_dequantize = nf4_dequantize  # the code book travels in the pytree
