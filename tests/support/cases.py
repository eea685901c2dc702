"""The capability matrix of tests/test_matrix.py: one table of cases, model kind x feature x mode.

A row names a check (``"check_<feature>:<function>"``, a function of that support module marked
``@check``), the model kind it runs on, the `lora.wrap` mode (``"-"`` when the check is not of a
wrap mode) and the check's other arguments. `grid` spells a block of rows as the product of
its axes. The model kinds (the catalogue is in each check module's docstring):

- ``scan-linen``, ``scan-linen_remat``, ``scan-nnx``: attention + MLP blocks under ``nn.scan``
  / ``nnx.scan`` and a head (`support.scan_models`);
- ``dg-linen``, ``dg-nnx``: residual tanh blocks with a two-output-axis DenseGeneral under a
  scan (`support.scan_models.dg_stack`); ``nested``: a scan of scans (`support.models`);
- ``mlp-linen``, ``mlp-linen_remat``, ``mlp-nnx``, ``mlp-nnx_remat``: the residual MLP stack of
  the quantization tests (`support.mlp_stack`); ``lax-scan``: a bare ``jax.lax.scan``;
- ``tiny-linen``, ``tiny-nnx``: Embed, attention, Conv, Dense (`support.routing_models`);
  ``dense``, ``tied``, ``mlp``: one Dense, tied embeddings, two Dense layers;
- ``moe-<block|stack>[-transposed]``: the Linen einsum MoE block or scan stack
  (`support.moe_models`), ``moe-<framework>-<dispatch>-...`` for the other frameworks and
  dispatches;
- ``peft-twin``: the PyTorch ``ModuleList`` stack and its ``nn.scan`` twin
  (`support.peft_stack`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def check(fn: F) -> F:
    """Marks a function of a check module as a check (tests/test_matrix.py finds them)."""
    return fn


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: ``check`` run on ``model`` in ``mode`` with ``args``."""

    feature: str
    model: str
    mode: str
    check: str
    args: tuple[tuple[str, Any], ...] = ()
    needs_torch: bool = False

    @property
    def id(self) -> str:
        name = self.check.split(":")[1]
        extra = "".join(f"-{k}={_short(v)}" for k, v in self.args)
        return f"{self.feature}/{self.model}/{self.mode}/{name}{extra}"


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}:{x}" for k, x in v.items())
    if isinstance(v, tuple | list):
        return "(" + ",".join(map(str, v)) + ")"
    return str(v)


def grid(
    feature: str,
    check_name: str,
    models: Iterable[str] = ("-",),
    modes: Iterable[str] = ("-",),
    needs_torch: bool = False,
    **axes: Iterable[Any],
) -> list[Case]:
    """The rows of ``check_name`` for every model x mode x value of each axis in ``axes``."""
    keys = list(axes)
    rows = []
    for model, mode, *values in itertools.product(models, modes, *axes.values()):
        rows.append(
            Case(
                feature, model, mode, check_name, tuple(zip(keys, values, strict=True)), needs_torch
            )
        )
    return rows


def moe(
    feature: str,
    check_name: str,
    mode: str = "-",
    frameworks: tuple[str, ...] = ("linen",),
    dispatches: tuple[str, ...] = ("einsum",),
    stacked: tuple[bool, ...] = (False, True),
    transposed: tuple[bool, ...] | None = (False, True),
    **axes: Iterable[Any],
) -> list[Case]:
    """The rows of an expert-kernel check: one model kind per framework x dispatch x block /
    scan stack (x ``w_out`` transposed, unless ``transposed`` is None: the check does not take
    it), named ``moe-[framework-dispatch-]block|stack[-transposed]``."""
    rows = []
    for fw, d, s, t in itertools.product(frameworks, dispatches, stacked, transposed or (None,)):
        prefix = "" if (frameworks, dispatches) == (("linen",), ("einsum",)) else f"{fw}-{d}-"
        model = f"moe-{prefix}{'stack' if s else 'block'}{'-transposed' if t else ''}"
        given: dict[str, Any] = {"stacked": s}
        if prefix:
            given = {"framework": fw, "dispatch": d, **given}
        if t is not None:
            given["transposed"] = t
        for row in grid(feature, check_name, [model], [mode], **axes):
            rows.append(dataclasses.replace(row, args=(*given.items(), *row.args)))
    return rows


MODES = ("factored", "auto", "merged")
DG = ("dg-linen", "dg-nnx")
ALIGNED, STRADDLING = (16, 32), (10, 12)  # support.mlp_stack's dims (whole NF4 blocks, not)
INT8, NF4_8, NF4_16 = (
    dict(dtype="int8"),
    dict(dtype="nf4", block_size=8),
    dict(dtype="nf4", block_size=16),
)

_DORA = "check_dora:"
_QUANT = "check_quant:"
_LOFTQ = "check_loftq:"
_COMBINE = "check_combine:"
_STACK = "check_stack:"
_ROUTING = "check_routing:"
_PEFT = "check_peft:"
_MERGE = "check_merge:"

CASES: list[Case] = [
    # -- DoRA (was tests/test_dora_scan.py; experts: tests/test_moe_carry.py) --
    *grid(
        "dora", _DORA + "init_gives_per_layer_magnitudes", DG, ["factored"], layers=[None, (0, 2)]
    ),
    *grid(
        "dora",
        _DORA + "outputs_and_gradients_match_numpy",
        DG,
        ["factored", "auto"],
        layers=[None, (0, 2)],
    ),
    *grid(
        "dora",
        _DORA + "merge_is_the_per_layer_reference",
        ["dg-linen"],
        ["merged"],
        layers=[None, (1,)],
    ),
    *grid("dora", _DORA + "factored_dora_scan_forms_no_kernel", DG, ["factored"]),
    *grid("dora", _DORA + "nested_scans_two_layer_axes", ["nested"], ["all"]),
    *grid("dora", _DORA + "auto_merges_one_layer_for_an_unfactorable_use", ["lax-scan"], ["auto"]),
    *moe("dora+stack", _DORA + "dora_expert_adapters_in_a_stack"),
    # -- QLoRA (was tests/test_quant_scan.py; experts: tests/test_moe_carry.py) --
    *grid(
        "quant",
        _QUANT + "int8_scales_per_layer_are_the_unstacked_quantization",
        ["mlp-linen"],
        dims=[ALIGNED, STRADDLING],
    ),
    *grid(
        "quant",
        _QUANT + "nf4_blocks_never_straddle_layers",
        ["mlp-linen"],
        dims=[ALIGNED, STRADDLING],
        double_quant=[False, True],
    ),
    *grid("quant", _QUANT + "without_probe_a_stack_is_one_array", ["mlp-linen"]),
    *grid("quant", _QUANT + "quantize_kernel_layer_axes_and_bad_input", ["kernel"]),
    *grid(
        "quant",
        _QUANT + "outputs_and_gradients_equal_the_dequantized_base_model",
        ["mlp-linen", "mlp-linen_remat", "mlp-nnx", "mlp-nnx_remat"],
        ["factored"],
        fmt=["int8", "nf4"],
    ),
    *grid(
        "quant",
        _QUANT + "the_stacked_step_dequantizes_inside_the_scan_body_only",
        ["mlp-linen_remat", "mlp-nnx_remat"],
        ["auto"],
        fmt=["int8", "nf4"],
    ),
    *grid(
        "quant",
        _QUANT + "embed_lookup_dequantizes_the_gathered_rows",
        ["tied"],
        ["factored"],
        kw=[INT8, NF4_8],
        adapted=[False, True],
    ),
    *grid(
        "quant",
        _QUANT + "merged_mode_merges_each_layer_inside_the_scan",
        ["mlp-linen_remat", "mlp-nnx"],
        ["merged"],
        fmt=["int8", "nf4"],
    ),
    *grid(
        "quant",
        _QUANT + "merge_requantize_works_layer_by_layer",
        ["mlp-linen"],
        fmt=["int8", "nf4"],
    ),
    *grid(
        "quant",
        _QUANT + "unstacked_gradients_through_quantized_products",
        ["mlp"],
        ["factored"],
        kw=[INT8, NF4_16],
    ),
    *moe("quant", _QUANT + "merge_on_a_quantized_expert_base", dtype=["nf4", "int8"]),
    *moe("quant", _QUANT + "requantize_expert_kernels", transposed=None),
    # -- LoftQ (was tests/test_loftq_scan.py) --
    *grid(
        "loftq",
        _LOFTQ + "nf4_whole_blocks_per_layer_is_the_unstacked_loftq_of_each_layer",
        ["mlp-linen"],
        iters=[1, 3],
    ),
    *[
        Case(
            "loftq",
            "mlp-linen",
            "-",
            _LOFTQ + "stacked_base_is_lora_quantize_format_and_each_layer_beats_plain_qlora",
            (("fmt", fmt), ("iters", iters), ("dims", dims)),
        )
        for fmt, iters in [("nf4", 1), ("nf4", 3), ("int8", 1), ("int8", 3)]
        for dims in (ALIGNED, STRADDLING)
    ],
    *grid(
        "loftq",
        _LOFTQ + "base_is_the_stacked_quantization_of_the_previous_residual",
        ["mlp-linen"],
        fmt=["nf4", "int8"],
    ),
    *grid(
        "loftq",
        _LOFTQ + "wrap_matches_merge_and_beats_plain_qlora",
        ["mlp-linen"],
        ["auto"],
        fmt=["nf4", "int8"],
    ),
    *grid(
        "loftq",
        _LOFTQ + "layers_subset_keeps_the_others_plain",
        ["mlp-linen"],
        ["auto"],
        fmt=["nf4", "int8"],
    ),
    *grid(
        "loftq", _LOFTQ + "nested_scan_is_the_unstacked_loftq_of_each_layer", ["nested"], ["auto"]
    ),
    *grid("loftq", _LOFTQ + "rank_above_a_layers_side_is_refused", ["mlp-linen"]),
    # -- combine (was tests/test_combine_scan.py; experts: tests/test_moe_carry.py) --
    *grid(
        "combine",
        _COMBINE + "cat_is_the_per_layer_weighted_sum",
        ["scan-linen", "scan-linen_remat", "scan-nnx"],
        ["auto"],
    ),
    *grid("combine", _COMBINE + "layer_subsets_combine_to_their_union", ["scan-linen"]),
    *grid("combine", _COMBINE + "svd_is_the_per_layer_truncated_svd", ["scan-linen"], rank=[1, 3]),
    *grid("combine", _COMBINE + "linear_is_peft_formula_per_layer", ["scan-linen"]),
    *grid(
        "combine",
        _COMBINE + "pruning_methods_act_layer_by_layer",
        ["scan-linen"],
        method=["ties", "magnitude_prune", "ties_svd"],
    ),
    *grid("combine", _COMBINE + "dare_draws_a_mask_per_layer", ["scan-linen"]),
    *grid("combine", _COMBINE + "stacked_and_unstacked_sets_do_not_combine", ["scan-linen"]),
    *moe("combine", _COMBINE + "experts_cat_is_the_weighted_sum_per_expert"),
    *moe("combine", _COMBINE + "experts_svd_per_expert"),
    *moe("combine", _COMBINE + "experts_linear_per_expert"),
    *[
        row
        for method in ["magnitude_prune", "ties", "magnitude_prune_svd", "ties_svd"]
        for row in moe(
            "combine", _COMBINE + "experts_pruning_per_expert", transposed=(True,), method=[method]
        )
    ],
    *moe("combine", _COMBINE + "experts_dare_draws_per_expert", transposed=(False,)),
    *grid(
        "combine",
        _COMBINE + "experts_keeps_the_expert_layout",
        ["moe-stack"],
        method=["cat", "linear", "svd"],
    ),
    # -- stack / unstack / gather (was tests/test_routing_scan.py, tests/test_routing_dora.py,
    #    tests/test_moe_carry.py) --
    *grid("stack", _STACK + "stack_of_stacked_adapters_layout_padding_and_unstack", ["scan-linen"]),
    *grid("stack", _STACK + "stack_mismatched_layer_layouts_are_clear_errors", ["scan-linen"]),
    *grid(
        "stack+dora",
        _STACK + "stack_representation_and_unstack_round_trip",
        ["tiny-linen"],
        ["merged"],
    ),
    *moe("stack", _STACK + "stack_keeps_expert_axes"),
    *grid("stack", _STACK + "gather_per_example_expert_factors", ["moe-stack"]),
    *grid("stack", _STACK + "stack_some_layers_zeroes_the_others", ["moe-stack"]),
    # -- routing (was tests/test_routing_scan.py, tests/test_routing_dora.py) --
    *grid(
        "routing",
        _ROUTING + "routed_scan_equals_each_example_through_its_own_merged_model",
        ["scan-linen", "scan-nnx"],
        MODES,
    ),
    *grid(
        "routing",
        _ROUTING + "routed_factored_scan_forms_no_per_example_kernel",
        ["scan-linen"],
        ["factored"],
    ),
    *grid(
        "routing", _ROUTING + "routed_nested_scans_equal_a_float64_numpy_forward", ["nested"], MODES
    ),
    *grid(
        "routing",
        _ROUTING + "routed_scan_gradients_reach_only_the_adapters_used",
        ["scan-linen"],
        ["factored"],
    ),  # "auto" takes the same path when none falls back
    *grid(
        "routing+dora",
        _ROUTING + "routed_dora_equals_each_example_through_its_own_merged_model",
        ["tiny-linen", "tiny-nnx"],
        MODES,
    ),
    *grid(
        "routing+dora",
        _ROUTING + "routed_dora_gradients_match_merged_references",
        ["tiny-linen"],
        ["auto"],
    ),
    *grid(
        "routing+dora", _ROUTING + "all_base_ids_and_dora_only_stack", ["tiny-linen"], ["factored"]
    ),
    *grid("routing+dora", _ROUTING + "scan_stacked_dora_routes_per_layer", ["routed-scan"], MODES),
    *grid(
        "routing+dora",
        _ROUTING + "routed_dropout_follows_peft_per_example",
        ["dense"],
        ["factored"],
    ),
    # -- PEFT files, PyTorch (was tests/test_peft_scan.py, tests/test_peft_dora_scan.py) --
    *grid("peft", _PEFT + "twin_base_models_agree", ["peft-twin"], needs_torch=True),
    *grid(
        "peft",
        _PEFT + "peft_written_adapter_loads_stacked",
        ["peft-twin"],
        ["auto"],
        True,
        with_probe=[False, True],
    ),
    *grid(
        "peft",
        _PEFT + "save_peft_stacked_loads_in_peft",
        ["peft-twin"],
        ["auto"],
        True,
        layers=[None, (0, 2)],
    ),
    *grid(
        "peft",
        _PEFT + "stacked_round_trip_is_exact",
        ["peft-twin"],
        needs_torch=True,
        layers=[None, (0, 2)],
    ),
    *grid("peft", _PEFT + "peft_file_missing_a_layer", ["peft-twin"], ["auto"], True),
    *grid(
        "peft", _PEFT + "default_key_map_refuses_stacked_adapters", ["peft-twin"], needs_torch=True
    ),
    *grid(
        "peft",
        _PEFT + "stacked_name_without_placeholder_is_refused",
        ["peft-twin"],
        needs_torch=True,
    ),
    *grid("peft", _PEFT + "two_layer_axes_are_refused", ["nested"], needs_torch=True),
    *grid(
        "peft", _PEFT + "unequal_ranks_across_layers_are_refused", ["peft-twin"], needs_torch=True
    ),
    *grid(
        "peft",
        _PEFT + "probe_disagreeing_with_placeholder_is_refused",
        ["peft-twin"],
        needs_torch=True,
    ),
    *grid(
        "peft+dora",
        _PEFT + "save_peft_stacked_dora_loads_in_peft",
        ["peft-twin"],
        ["all"],
        True,
        layers=[None, (0, 2)],
    ),
    *grid(
        "peft+dora",
        _PEFT + "peft_written_stacked_dora_loads",
        ["peft-twin"],
        ["all"],
        True,
        layers_to_transform=[None, [0, 2]],
    ),
    *grid(
        "peft+dora",
        _PEFT + "wrong_layer_magnitude_shape_names_module_and_path",
        ["peft-twin"],
        needs_torch=True,
    ),
    *grid(
        "peft+dora", _PEFT + "layer_without_magnitude_is_refused", ["peft-twin"], needs_torch=True
    ),
    *grid(
        "peft+dora",
        _PEFT + "absent_dora_layers_need_concrete_params",
        ["peft-twin"],
        needs_torch=True,
    ),
    # -- merge, summary, checkpoints of expert kernels (was tests/test_moe_carry.py) --
    *moe(
        "merge",
        _MERGE + "merge_per_expert",
        frameworks=("linen", "nnx"),
        dispatches=("einsum", "ragged"),
    ),
    *grid("merge", _MERGE + "merge_some_layers_of_a_stacked_expert_kernel", ["moe-stack"]),
    *grid("merge", _MERGE + "merge_bfloat16_expert_kernels", ["moe-block"]),
    *moe("summary", _MERGE + "summary_counts_every_expert"),
    *grid(
        "checkpoint",
        _MERGE + "checkpoint_round_trip",
        ["moe-block-transposed"],
        stacked=[False],
        dtype=["float32"],
    ),
    *grid(
        "checkpoint",
        _MERGE + "checkpoint_round_trip",
        ["moe-stack-transposed"],
        stacked=[True],
        dtype=["bfloat16"],
    ),
]
