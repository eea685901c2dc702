"""flax_lora: LoRA for JAX and Flax.

Adapters are separate pytrees keyed by parameter path; `wrap` is a function transform that runs
any ``apply_fn(params, *args)`` with ``W0 + scale * a @ b`` for every adapted kernel; optax masks
freeze the base; `merge` / `unmerge` are pure functions; checkpoints go through orbax.
"""

from flax_lora._adapters._delta import delta
from flax_lora._adapters._extras import TokenDelta, TrainedCopy
from flax_lora._adapters._weights import LoraWeights, StackedLoraWeights
from flax_lora._bridges._linen_bridge import LinenBridge
from flax_lora._bridges._nnx_bridge import NnxBridge, merged, to_adapters
from flax_lora._checkpoint._orbax import load, load_config, save
from flax_lora._config import LoraConfig
from flax_lora._init._make import init
from flax_lora._init._selection import Choice, Selection, select
from flax_lora._key_maps._catalogue import key_map
from flax_lora._merge import merge, unmerge
from flax_lora._multi._combine import combine
from flax_lora._multi._stack import stack, unstack
from flax_lora._optim import freeze_base, trainable
from flax_lora._peft._load import load_peft
from flax_lora._peft._save import save_peft
from flax_lora._quant._formats import QuantizedKernel, dequantize_kernel, quantize_kernel
from flax_lora._quant._tree import dequantize, quantize, requantize
from flax_lora._summary import Summary, summary
from flax_lora._wrap import wrap

__version__ = "0.1.0"

__all__ = [
    "Choice",
    "LinenBridge",
    "LoraConfig",
    "LoraWeights",
    "NnxBridge",
    "QuantizedKernel",
    "Selection",
    "StackedLoraWeights",
    "Summary",
    "TokenDelta",
    "TrainedCopy",
    "combine",
    "delta",
    "dequantize",
    "dequantize_kernel",
    "freeze_base",
    "init",
    "key_map",
    "load",
    "load_config",
    "load_peft",
    "merge",
    "merged",
    "quantize",
    "quantize_kernel",
    "requantize",
    "save",
    "save_peft",
    "select",
    "stack",
    "summary",
    "to_adapters",
    "trainable",
    "unmerge",
    "unstack",
    "wrap",
]
