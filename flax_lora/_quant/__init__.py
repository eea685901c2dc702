"""QLoRA's quantized base: the storage formats and the functions over a params tree.

- `_checks`: the checks of a quantization's arguments (format, block size, non-finite kernels);
- `_formats`: `QuantizedKernel`, the int8 and NF4 codes of one kernel both ways (`quantize_kernel`,
  `dequantize_kernel`), and the decoder the factored engine shares (`decode`);
- `_tree`: `quantize`, `dequantize`, `requantize` over a params tree, and the layer-by-layer
  requantization `lora.merge` uses.

LoftQ, which fits a quantized base and the factors together, is an init (`flax_lora._init._loftq`);
the engine's quantized ``W0``, dequantized at each use, is `flax_lora._factored._quant_base`.
"""
