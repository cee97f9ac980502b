"""Lowering of cce::linear_cross_entropy_fwd to the forward Triton templates.

Two launches: `cce_forward` computes partial row statistics over (row block, vocabulary range)
programs into a small fp32 buffer PARTIALS [2 or 3, slots, N] (slots: the most vocabulary
ranges any candidate config launches for this shape, see configs.vocab_splits: O(N + SMs x
BLOCK_N), never O(N x V)), and `cce_forward_combine` merges the ranges into lse, target_logit
and logit_sum. Splitting the vocabulary keeps the GPU busy when there are few row blocks
(small batches, inference).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from cce_inductor import compat
from cce_inductor.lowering import common, configs


def lower_forward(
    input: Any,
    weight: Any,
    bias: Optional[Any],
    target: Any,
    class_weight: Optional[Any],
    softcap: Optional[float],
    with_logit_sum: bool,
    filter_eps: Optional[float],
) -> tuple[Any, Any, Any]:
    op = torch.ops.cce.linear_cross_entropy_fwd.default
    device, dtype = input.get_device(), input.get_dtype()
    reason = common.template_unavailable_reason(device, dtype)
    if reason is not None:
        return common.fallback(op, reason, input, weight, bias, target, class_weight, softcap,
                               with_logit_sum, filter_eps)

    input, weight, target = (common.realize(x) for x in (input, weight, target))
    n, d = input.get_size()
    v = weight.get_size()[0]
    bias_node = common.realize(bias) if bias is not None else common.placeholder(device, dtype)
    weight_node = (common.realize(class_weight) if class_weight is not None
                   else common.placeholder(device, torch.float32))
    arch, autotune = configs.arch_of(device), compat.max_autotune_enabled()
    cfgs = configs.tile_configs(configs.FORWARD, dtype, arch, autotune)
    sm_count = configs.sm_count(device)
    cdiv, min_, max_ = compat.sympy_size_functions()
    slots = max_(*(
        configs.vocab_splits(n, v, cfg.block_n, cfg.block_v, cfg.waves * sm_count,
                             cdiv=cdiv, min=min_, max=max_)
        for cfg in cfgs
    ))
    partials = common.empty([3 if with_logit_sum else 2, slots, n], torch.float32, device)
    # See NOTE:[TritonTemplates with multiple outputs] in torch/_inductor/ir.py: the outputs are
    # buffers the kernels mutate, beside each template's own output (here a marker, then LSE).
    common.choose(
        "cce_forward", "cce_forward", cfgs,
        [input, weight, bias_node, target, weight_node, partials],
        common.fixed_layout(device, torch.float32, [1]), mutated=[partials],
        call_sizes=[n, v, d], input_gen_fns=input_gen_fns(compat.size_hints_of([v])[0]),
        HAS_BIAS=bias is not None, HAS_CLASS_WEIGHT=class_weight is not None,
        WITH_LOGIT_SUM=bool(with_logit_sum), HAS_SOFTCAP=softcap is not None,
        SOFTCAP=float(softcap) if softcap is not None else 0.0, SM_COUNT=sm_count,
        **common.dot_options(dtype),
    )
    target_logit = common.empty([n], torch.float32, device)
    logit_sum = common.empty([n] if with_logit_sum else [0], torch.float32, device)
    lse = common.choose(
        "cce_forward_combine", "cce_forward_combine",
        configs.tile_configs(configs.FORWARD_COMBINE, dtype, arch, autotune),
        [common.realize(partials), target_logit, logit_sum],
        common.fixed_layout(device, torch.float32, [n]), mutated=[target_logit, logit_sum],
        call_sizes=[n], input_gen_fns={}, WITH_LOGIT_SUM=bool(with_logit_sum),
    )
    return lse, target_logit, logit_sum


def input_gen_fns(vocab: int) -> dict[int, Callable[[Any], torch.Tensor]]:
    """Benchmark inputs shaped like a trained model's: logits of order one and every target
    inside the vocabulary (random bits would give inf logits and out-of-range targets)."""
    def hidden(node: Any) -> torch.Tensor:
        n, d = compat.size_hints(node)
        scale = 1.0 / math.sqrt(math.sqrt(d))  # so that e . c ~ N(0, 1)
        return torch.randn(n, d, device=node.get_device()).mul_(scale).to(node.get_dtype())

    def target(node: Any) -> torch.Tensor:
        (n,) = compat.size_hints(node)
        return torch.randint(0, vocab, (n,), device=node.get_device(), dtype=node.get_dtype())

    return {0: hidden, 1: hidden, 3: target}
