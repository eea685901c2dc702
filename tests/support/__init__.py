"""Helpers shared by several test modules (test modules never import one another).

``refs``, ``dora``, ``scan_models`` and ``routing_models`` need no PyTorch. ``peft_models`` and
``peft_stack`` build PyTorch twins: only modules that have already skipped without torch
(``pytest.importorskip``) import them.
"""
