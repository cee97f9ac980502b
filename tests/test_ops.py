"""The `torch.ops.cce.*` operators: torch.library.opcheck (schema, fake tensors, autograd
registration, AOT dispatch) and float64 gradcheck through the explicit API."""

from __future__ import annotations

import itertools

import pytest
import torch

import cce_inductor

pytestmark = pytest.mark.usefixtures("single_threaded")

N, V, D = 7, 19, 5  # tiny: opcheck and gradcheck run the op many times


def _tensors(*, bias: bool, class_weight: bool, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (N,), generator=gen)
    target[1] = -100  # outside [0, V): no target logit
    return {
        "input": torch.randn(N, D, generator=gen, dtype=dtype),
        "weight": torch.randn(V, D, generator=gen, dtype=dtype),
        "bias": torch.randn(V, generator=gen, dtype=dtype) if bias else None,
        "target": target,
        "class_weight": (torch.rand(V, generator=gen) + 0.5).to(
            torch.float64 if dtype == torch.float64 else torch.float32
        ) if class_weight else None,
    }


OPTION_SETS = [
    # (bias, class_weight, softcap, with_logit_sum, logit_scale, with_entropy)
    (False, False, None, False, 1.0, False),
    (True, False, None, False, 1.0, False),
    (False, True, None, True, 1.0, False),
    (True, True, 5.0, True, 0.7, True),
    (True, False, 3.0, False, 1.0, False),
    (False, False, None, False, 2.5, True),
]
OPTION_IDS = ["plain", "bias", "class_weight+logit_sum", "all", "bias+softcap", "scale+entropy"]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["", "requires_grad"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
def test_opcheck_forward(options, requires_grad):
    bias, class_weight, softcap, with_logit_sum, logit_scale, with_entropy = options
    t = _tensors(bias=bias, class_weight=class_weight)
    for name in ("input", "weight", "bias"):
        if t[name] is not None:
            t[name].requires_grad_(requires_grad)
    torch.library.opcheck(
        torch.ops.cce.linear_cross_entropy_fwd.default,
        (t["input"], t["weight"], t["bias"], t["target"], t["class_weight"], softcap,
         with_logit_sum, 2.0**-12, True, logit_scale, with_entropy),
    )


# Every combination of the three needs_grad flags with all options on; each other option set
# with every gradient. filter_eps alternates so both backward paths pass through opcheck; with
# it, the forward's tile_max goes in (lse_parts always), and filter_classifier alternates with
# needs_grad[2].
BACKWARD_CASES = [
    (OPTION_SETS[3], needs_grad, 1e-3 if needs_grad[1] else None)
    for needs_grad in itertools.product([False, True], repeat=3)
] + [(options, (True, True, True), 1e-3) for options in OPTION_SETS[:3] + OPTION_SETS[4:]]
BACKWARD_IDS = [
    f"{'all' if i < 8 else OPTION_IDS[[0, 1, 2, 4, 5][i - 8]]}-"
    f"{''.join('x' if flag else '-' for flag in needs_grad)}-eps{filter_eps}"
    for i, (_, needs_grad, filter_eps) in enumerate(BACKWARD_CASES)
]


@pytest.mark.parametrize("options,needs_grad,filter_eps", BACKWARD_CASES, ids=BACKWARD_IDS)
def test_opcheck_backward(options, needs_grad, filter_eps):
    bias, class_weight, softcap, with_logit_sum, logit_scale, with_entropy = options
    t = _tensors(bias=bias, class_weight=class_weight)
    lse, _, _, entropy, tile_max, lse_parts = torch.ops.cce.linear_cross_entropy_fwd(
        t["input"], t["weight"], t["bias"], t["target"], t["class_weight"], softcap,
        with_logit_sum, filter_eps, True, logit_scale, with_entropy,
    )
    gen = torch.Generator().manual_seed(1)
    grad_lse, grad_target_logit, grad_logit_sum, grad_entropy = torch.randn(4, N, generator=gen)
    torch.library.opcheck(
        torch.ops.cce.linear_cross_entropy_bwd.default,
        (t["input"], t["weight"], t["bias"], t["target"], t["class_weight"], lse, grad_lse,
         grad_target_logit, grad_logit_sum if with_logit_sum else None, softcap, filter_eps,
         *needs_grad, tile_max, lse_parts, not needs_grad[2], logit_scale,
         entropy if with_entropy else None, grad_entropy if with_entropy else None),
    )


# The one-pass op has no logit scale and no entropy (losses with those take the two ops).
ONE_PASS_CASES = [(case, name) for case, name in zip(BACKWARD_CASES, BACKWARD_IDS)
                  if not case[0][5]]  # no entropy: the one pass serves losses only


@pytest.mark.parametrize("options,needs_grad,filter_eps", [case for case, _ in ONE_PASS_CASES],
                         ids=[name for _, name in ONE_PASS_CASES])
def test_opcheck_forward_and_backward(options, needs_grad, filter_eps):
    """The one-pass op, and that it returns fwd's statistics and bwd's gradients exactly."""
    bias, class_weight, softcap, with_logit_sum, logit_scale, _ = options
    filter_classifier = not needs_grad[2]
    t = _tensors(bias=bias, class_weight=class_weight)
    gen = torch.Generator().manual_seed(1)
    grad_lse, grad_target_logit, grad_logit_sum = torch.randn(3, N, generator=gen)
    grad_logit_sum = grad_logit_sum if with_logit_sum else None
    tensors = (t["input"], t["weight"], t["bias"], t["target"], t["class_weight"])
    args = (*tensors, grad_lse, grad_target_logit, grad_logit_sum, softcap, filter_eps,
            *needs_grad, filter_classifier, logit_scale)
    torch.library.opcheck(torch.ops.cce.linear_cross_entropy_fwd_bwd.default, args)
    ours = torch.ops.cce.linear_cross_entropy_fwd_bwd(*args)
    lse, target_logit, logit_sum, _, tile_max, lse_parts = \
        torch.ops.cce.linear_cross_entropy_fwd(*tensors, softcap, with_logit_sum, filter_eps,
                                               filter_classifier, logit_scale)
    expected_grads = torch.ops.cce.linear_cross_entropy_bwd(
        *tensors, lse, grad_lse, grad_target_logit, grad_logit_sum, softcap, filter_eps,
        *needs_grad, tile_max, lse_parts, filter_classifier, logit_scale,
    )
    for got, expected in zip(ours, (lse, target_logit, logit_sum, *expected_grads)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias": True},
        {"softcap": 2.0},
        {"label_smoothing": 0.2},
        {"class_weight": True},
        {"return_lse": True},
        {"logit_scale": 0.6},
        {"bias": True, "softcap": 2.0, "label_smoothing": 0.2, "class_weight": True,
         "return_lse": True, "logit_scale": 1.7},
    ],
    ids=["plain", "bias", "softcap", "smoothing", "class_weight", "return_lse", "logit_scale",
         "all"],
)
def test_gradcheck(reduction, options):
    options = dict(options)
    t = _tensors(bias=options.pop("bias", False), class_weight=options.pop("class_weight", False),
                 dtype=torch.float64)
    return_lse = options.pop("return_lse", False)
    leaves = [t["input"], t["weight"]] + ([t["bias"]] if t["bias"] is not None else [])
    for leaf in leaves:
        leaf.requires_grad_()

    def fn(input, linear_weight, linear_bias=None):
        # With return_lse gradcheck checks the Jacobians of both outputs, loss and lse.
        return cce_inductor.linear_cross_entropy(
            input, linear_weight, t["target"], linear_bias=linear_bias, weight=t["class_weight"],
            reduction=reduction, return_lse=return_lse, **options,
        )

    assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=False)


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 0.7}, {"softcap": 2.0, "temperature": 1.3, "bias": True}],
    ids=["plain", "temperature", "softcap+temperature+bias"],
)
def test_gradcheck_log_probs_and_entropy(options):
    """Both outputs of linear_log_probs: gradcheck checks the Jacobians of log_probs (0 and no
    gradient at the ignored row) and of the entropy (every row)."""
    options = dict(options)
    t = _tensors(bias=options.pop("bias", False), class_weight=False, dtype=torch.float64)
    leaves = [t["input"], t["weight"]] + ([t["bias"]] if t["bias"] is not None else [])
    for leaf in leaves:
        leaf.requires_grad_()

    def fn(input, linear_weight, linear_bias=None):
        return cce_inductor.linear_log_probs(
            input, linear_weight, t["target"], linear_bias=linear_bias, return_entropy=True,
            **options,
        )

    assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=False)
