"""The one module through which the tests reach flax_lora's private names.

Everything else in the tests goes through the public API (``import flax_lora as lora``) or the
tests' own helpers (e.g. `support.trees.adapter_entries`, `support.trees.leaves_by_path`). A
name is here only when no public API does its job; the names are the library's own, so a move
in the library changes one import line here:

- `gather` (per-example factors of a routing stack): tests/test_stack.py checks the contract the
  factored routing is built on, ``a[ids] @ b[ids]`` is adapter ``ids[j]``'s delta and ``-1``
  gives zeros; the public routed forward shows it only through whole model outputs. The
  capability matrix (support/check_stack.py) checks it on expert kernels.
- `select` (one, possibly traced, index of a routing stack as ordinary adapters, DoRA
  magnitudes included): what `lora.wrap` runs for a routed example that falls back; the
  capability matrix checks it on expert kernels (support/check_stack.py, check_dora.py)
  against float64 merged kernels, which the public API shows only through model outputs.
- `place_adapter` (factor shardings from a kernel's `NamedSharding`): the expert-parallel mesh
  checks (support/moe_mesh_checks.py) read the specs it gives the factors of expert kernels;
  the public API places factors only inside `lora.init`.
- `DYNAMIC_MAP`, `NF4_LEVELS` (the code tables of the quantization formats): tests/test_quant.py
  compares them with bitsandbytes' tables rebuilt in the tests; no public API returns a table.
- `_jaxpr` (the module that reads and re-binds JAX's equation parameters, per JAX version):
  tests/test_jaxpr.py tests that module itself against the installed JAX (tests/test_moe.py
  its ``ragged_dot_general`` accessor).
- `_regex` (the linear-time matcher behind every user or file pattern): tests/test_regex.py
  tests that module itself against Python's ``re``, and counts its set steps (`Pattern.set_steps`)
  to show hostile patterns cost time linear in the text; the public API shows only results.
- `_checkpoint` (the module behind `lora.save`): the multi-process checkpoint test
  (support/multihost_worker.py) replaces its ``_replace`` by a failing one, to make the move of
  a finished checkpoint into place fail on the primary process alone; tests/test_hostile_
  checkpoint.py wraps its ``_read`` to replace a checkpoint while `lora.load` reads it.
- `_atomic` (the filesystem steps of `lora.save` and `save_peft`): the safety tests wrap its
  ``rename`` (every rename of a save) to watch the publish, to take away the directory exchange
  (the two-rename fallback), to change the target mid-publish and to kill a save between two
  renames (benchmarks/kill_save.py); they lay out staging folders by its names.
- `_checkpoint_meta` (the checks of checkpoint metadata): its size bound on the metadata file.
- `_safetensors` (the safetensors writer behind `lora.save_peft`): tests/test_hostile_peft.py
  checks that it writes a transposed or sliced array C-contiguous (safetensors' numpy writer
  would store its raw buffer); the public save_peft cannot show it, its layouts hand the writer
  contiguous arrays already.
- `Method`, `COMBINE_METHODS` (combine's method names and their table): tests/test_combine.py
  checks that the two name the same methods; no public API lists the methods' steps.
- `StackedCopy`, `split_plain`, `split_stacked` (the split of an adapter tree into factors and
  extras, by kind): tests/test_extras.py checks that a stacked extra in one set (or a plain one
  in a stack) is refused naming its path.
- `layered_kernels`, `Use` (the selection of layered kernels, and the probe's record of a
  kernel's use): tests/test_init.py checks that the selection leaves its argument unchanged.
"""

from flax_lora import _jaxpr, _regex
from flax_lora._adapters._extras import StackedCopy
from flax_lora._adapters._tables import split_plain, split_stacked
from flax_lora._checkpoint import _atomic
from flax_lora._checkpoint import _meta as _checkpoint_meta
from flax_lora._checkpoint import _orbax as _checkpoint
from flax_lora._init._select import layered_kernels
from flax_lora._multi._combine import Method
from flax_lora._multi._combine_methods import COMBINE_METHODS
from flax_lora._multi._stack import gather, select
from flax_lora._peft import _safetensors
from flax_lora._probe import Use
from flax_lora._quant._formats import DYNAMIC_MAP, NF4_LEVELS
from flax_lora._sharding import place_adapter

__all__ = [
    "COMBINE_METHODS",
    "DYNAMIC_MAP",
    "NF4_LEVELS",
    "Method",
    "StackedCopy",
    "Use",
    "_atomic",
    "_checkpoint",
    "_checkpoint_meta",
    "_jaxpr",
    "_regex",
    "_safetensors",
    "gather",
    "layered_kernels",
    "place_adapter",
    "select",
    "split_plain",
    "split_stacked",
]
