"""Bad input raises a clear exception naming the offending argument, before any computation."""

from __future__ import annotations

import re

import pytest
import torch

import cce_inductor

pytestmark = pytest.mark.usefixtures("single_threaded")

N, V, D = 6, 11, 4


def _args(**overrides):
    gen = torch.Generator().manual_seed(0)
    args = {
        "input": torch.randn(N, D, generator=gen),
        "linear_weight": torch.randn(V, D, generator=gen),
        "target": torch.randint(0, V, (N,), generator=gen),
    }
    args.update(overrides)
    return args


def _call(**overrides):
    args = _args(**{k: overrides.pop(k) for k in ("input", "linear_weight", "target")
                    if k in overrides})
    return cce_inductor.linear_cross_entropy(
        args["input"], args["linear_weight"], args["target"], **overrides
    )


CASES = {
    "mismatched_D": (dict(linear_weight=torch.randn(V, D + 1)), ValueError, "linear_weight"),
    "linear_weight_1d": (dict(linear_weight=torch.randn(V)), ValueError, "linear_weight"),
    "target_shape": (dict(target=torch.zeros(N + 1, dtype=torch.long)), ValueError, "target"),
    "target_extra_dim": (dict(target=torch.zeros(N, 1, dtype=torch.long)), ValueError, "target"),
    "float_target": (dict(target=torch.zeros(N)), TypeError, "target"),
    "bool_target": (dict(target=torch.zeros(N, dtype=torch.bool)), TypeError, "target"),
    "negative_target": (dict(target=torch.full((N,), -5)), IndexError, "target"),
    "target_equal_V": (dict(target=torch.full((N,), V)), IndexError, "target"),
    "default_ignore_with_other_ignore_index": (
        dict(target=torch.full((N,), -100), ignore_index=-1), IndexError, "target"
    ),
    "bias_shape": (dict(linear_bias=torch.randn(V + 1)), ValueError, "linear_bias"),
    "bias_dtype": (dict(linear_bias=torch.randn(V, dtype=torch.float64)), TypeError,
                   "linear_bias"),
    "class_weight_shape": (dict(weight=torch.rand(V - 1)), ValueError, "weight"),
    "class_weight_int": (dict(weight=torch.ones(V, dtype=torch.long)), TypeError, "weight"),
    "linear_weight_on_meta": (dict(linear_weight=torch.randn(V, D, device="meta")), ValueError,
                              "linear_weight"),
    "target_on_meta": (dict(target=torch.zeros(N, dtype=torch.long, device="meta")), ValueError,
                       "target"),
    "bias_on_meta": (dict(linear_bias=torch.randn(V, device="meta")), ValueError, "linear_bias"),
    "class_weight_on_meta": (dict(weight=torch.rand(V, device="meta")), ValueError, "weight"),
    "unknown_reduction": (dict(reduction="avg"), ValueError, "reduction"),
    "label_smoothing_negative": (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    "label_smoothing_above_1": (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    "softcap_zero": (dict(softcap=0.0), ValueError, "softcap"),
    "softcap_negative": (dict(softcap=-3.0), ValueError, "softcap"),
    "int_input": (dict(input=torch.ones(N, D, dtype=torch.long),
                       linear_weight=torch.ones(V, D, dtype=torch.long)), TypeError, "input"),
    "complex_input": (dict(input=torch.randn(N, D, dtype=torch.complex64),
                           linear_weight=torch.randn(V, D, dtype=torch.complex64)), TypeError,
                      "input"),
    "float64_input_float32_weight": (dict(input=torch.randn(N, D, dtype=torch.float64)),
                                     TypeError, "linear_weight"),
    "filter_eps_string": (dict(filter_eps="always"), ValueError, "filter_eps"),
    "filter_eps_negative": (dict(filter_eps=-1e-3), ValueError, "filter_eps"),
    "filter_eps_nan": (dict(filter_eps=float("nan")), ValueError, "filter_eps"),
    "filter_grads_unknown": (dict(filter_grads="weight"), ValueError, "filter_grads"),
    "logit_scale_nan": (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    "logit_scale_inf": (dict(logit_scale=float("inf")), ValueError, "logit_scale"),
    "logit_scale_string": (dict(logit_scale="2"), TypeError, "logit_scale"),
}


def _call_log_probs(**overrides):
    return cce_inductor.linear_log_probs(*_args().values(), **overrides)


LOG_PROBS_CASES = {
    "temperature_zero": (dict(temperature=0.0), ValueError, "temperature"),
    "temperature_negative": (dict(temperature=-0.5), ValueError, "temperature"),
    "temperature_inf": (dict(temperature=float("inf")), ValueError, "temperature"),
    "temperature_nan": (dict(temperature=float("nan")), ValueError, "temperature"),
    "temperature_bool": (dict(temperature=True), TypeError, "temperature"),
    "temperature_tensor": (dict(temperature=torch.tensor(0.7)), TypeError, "temperature"),
    "softcap_negative": (dict(softcap=-1.0), ValueError, "softcap"),
    "target_out_of_range": (dict(ignore_index=-1), IndexError, "target"),
}


@pytest.mark.parametrize("overrides,error,name", CASES.values(), ids=CASES.keys())
def test_bad_input_names_argument(overrides, error, name):
    with pytest.raises(error) as info:
        _call(**dict(overrides))
    message = str(info.value)
    # As a whole word: "weight" must not be satisfied by "linear_weight".
    assert re.search(rf"(?<!\w){name}(?!\w)", message), message


@pytest.mark.parametrize("overrides,error,name", LOG_PROBS_CASES.values(),
                         ids=LOG_PROBS_CASES.keys())
def test_bad_log_probs_input_names_argument(overrides, error, name):
    overrides = dict(overrides)
    if name == "target":  # -100 is not a class, and with ignore_index=-1 not ignored either
        args = _args(target=torch.full((N,), -100))
        call = lambda: cce_inductor.linear_log_probs(*args.values(), **overrides)  # noqa: E731
    else:
        call = lambda: _call_log_probs(**overrides)  # noqa: E731
    with pytest.raises(error) as info:
        call()
    assert re.search(rf"(?<!\w){name}(?!\w)", str(info.value)), str(info.value)


def test_scalar_input():
    with pytest.raises(ValueError, match="input"):
        cce_inductor.linear_cross_entropy(torch.tensor(1.0), torch.randn(V, 1), torch.tensor(0))


def test_bad_target_value_reported():
    """The message shows an offending value, not just that one exists."""
    target = torch.randint(0, V, (N,))
    target[3] = V + 7
    with pytest.raises(IndexError, match=f"got {V + 7}"):
        _call(target=target)


def test_valid_non_default_ignore_index_accepted():
    """-1 is a valid target once it is the ignore_index (and -100 is not)."""
    target = torch.randint(0, V, (N,))
    target[::2] = -1
    args = _args(target=target)
    loss = cce_inductor.linear_cross_entropy(*args.values(), ignore_index=-1)
    expected = torch.nn.functional.cross_entropy(
        args["input"] @ args["linear_weight"].T, target, ignore_index=-1
    )
    torch.testing.assert_close(loss, expected)


def test_class_weight_requiring_grad_raises_at_backward():
    args = _args()
    args["input"].requires_grad_()
    weight = torch.rand(V, requires_grad=True)
    loss = cce_inductor.linear_cross_entropy(*args.values(), weight=weight)
    with pytest.raises(NotImplementedError, match="`weight`"):
        loss.backward()


def test_module_bad_option_raises_on_call():
    module = cce_inductor.LinearCrossEntropy(reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        module(*_args().values())
