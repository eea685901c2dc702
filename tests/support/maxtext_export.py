"""Builds a tiny MaxText model with LoRA adapters and writes what its PyTorch twin needs (run in
a Python that has maxtext, as ``python -m support.maxtext_export FAMILY LAYOUT DIR`` from tests/;
tests/test_key_maps_maxtext.py runs it with ``FLAX_LORA_MAXTEXT_PYTHON``).

Writes into DIR: ``base.npz`` (the base params by "/"-joined path), ``meta.json`` (the sizes and
settings the twin's config needs), ``tokens.npy``, ``base_logits.npy`` (the model without
adapters), ``lora_logits.npy`` (`lora.wrap`'s logits) and ``peft/`` (`save_peft` with the
catalogue's MaxText key map, the query adapters' ``b`` scaled by ``sqrt(head_dim)`` for HF:
MaxText folds ``1/sqrt(head_dim)`` into its query kernel). Exit status 3 with the error on
stderr when flax_lora cannot adapt or write the model (a case that awaits engine work).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

import flax_lora as lora
from support import maxtext_models as mm
from support.trees import leaves_by_path

KEY_MAPS = {"llama2": "maxtext/llama2", "mixtral": "maxtext/mixtral", "gemma3": "maxtext/gemma3"}
PARAM_ORDER = {"mixtral": ("gate_up_proj", "down_proj")}


def hf_query_scale(adapters: Any, head_dim: int) -> Any:
    """The adapters with each ``self_attention/query`` adapter's ``b`` times ``sqrt(head_dim)``:
    the HF ``q_proj`` is MaxText's query kernel times ``sqrt(head_dim)``."""
    s = math.sqrt(head_dim)

    def fix(path: Any, w: Any) -> Any:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return w.replace(b=w.b * s) if name.endswith("query/kernel") else w

    return jax.tree_util.tree_map_with_path(
        fix, adapters, is_leaf=lambda x: isinstance(x, lora.LoraWeights)
    )


def main(family: str, layout: str, out: Path) -> int:
    m = mm.build(family, layout)
    cfg = m.config
    ids, pos = mm.tokens(seed=3)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "base.npz", **{k: np.asarray(v) for k, v in leaves_by_path(m.params).items()})
    meta = dict(
        family=family,
        layout=layout,
        scan_layers=bool(cfg.scan_layers),
        layer_axis=m.layer_axis,
        num_layers=mm.LAYERS[family],
        emb=mm.EMB,
        heads=mm.HEADS,
        kv_heads=mm.KV_HEADS,
        head_dim=mm.HEAD_DIM,
        mlp=mm.MLP,
        vocab=mm.VOCAB,
        experts=mm.EXPERTS,
        top_k=mm.TOP_K,
        eps=float(cfg.normalization_layer_epsilon),
        rope_theta=float(cfg.rope_max_timescale),
    )
    (out / "meta.json").write_text(json.dumps(meta))
    np.save(out / "tokens.npy", np.asarray(ids))
    np.save(out / "base_logits.npy", np.asarray(jax.jit(m.apply)(m.params, ids, pos)))
    config = lora.LoraConfig(rank=4, alpha=8.0, targets=mm.TARGETS, init="random")
    try:
        adapters = lora.init(
            jax.random.key(5), m.params, config, probe=lambda p: m.apply(p, ids, pos)
        )
        logits = jax.jit(lora.wrap(m.apply))(m.params, adapters, ids, pos)
        np.save(out / "lora_logits.npy", np.asarray(logits))
        order = PARAM_ORDER.get(family)
        kwargs = {} if order is None else {"param_order": order}
        lora.save_peft(
            out / "peft",
            hf_query_scale(adapters, mm.HEAD_DIM),
            config,
            key_map=lora.key_map(KEY_MAPS[family]),
            **kwargs,
        )
    except (ValueError, TypeError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
