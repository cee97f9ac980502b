"""`cce_backend`: a torch.compile backend that is Inductor plus the CCE graph pass.

    model = torch.compile(model, backend="cce")          # registered entry point, no import
    model = torch.compile(model, backend=cce_backend, mode="max-autotune")
    model = torch.compile(model, backend=make_cce_backend(drop_logits=True))
    model = torch.compile(model, backend="cce", options={"cce.drop_logits": True})

Each graph Dynamo captures is rewritten by `cce_inductor.rewrite` (every `linear ->
cross_entropy` becomes the fused CCE loss) and then compiled by Inductor's `compile_fx`.

Logging between head and loss. transformers' model code logs through its loggers, e.g.
`logger.warning_once(...)` in `PreTrainedModel.loss_function` when a class names no loss type
(unmodified GPT2LMHeadModel); Dynamo cannot trace a Logger method and breaks the graph there,
which leaves the loss in a graph without the head. The backend has Dynamo trace transformers'
logging calls as no-ops (torch._dynamo.config.ignore_logging_functions: Logger methods cannot
be reordered, only ignored), only while a function compiled with this backend runs: Dynamo
enters `backend_ctx_ctor` (an attribute it reads from the backend, torch/_dynamo/eval_frame.py)
around each call of such a function, so frames compiled with other backends keep the user's
config (torch.compile's wrapper of custom backends drops that attribute: see
`compat.forward_backend_context`, which passes it on for this backend only). It is safe: those
calls only emit messages, return None and touch no tensor (their arguments, evaluated before
the call, are still traced); the cost is that the message is not printed from compiled frames.
Called eagerly (any graph-break fallback), they log as usual.

`mode=` and `options=`: torch.compile passes them to any backend other than "inductor" as
keywords (`torch._TorchCompileWrapper`); this backend applies them exactly as backend="inductor"
does (same validation, same mode presets, as config patches of `compile_fx`). Keys of `options`
that start with "cce." set the graph pass options instead ("cce.filter_eps", "cce.filter_grads",
"cce.patterns", "cce.drop_logits"; see `RewriteOptions`), overriding the backend's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

from torch.fx import GraphModule

from cce_inductor import compat
from cce_inductor.arguments import FilterEps
from cce_inductor.rewrite import RewriteOptions, rewrite_linear_cross_entropy

OPTION_PREFIX = "cce."


class CCEBackend:
    """A torch.compile backend: the CCE graph pass with fixed options, then Inductor."""

    def __init__(self, options: RewriteOptions) -> None:
        self.options = options
        self._inductor: Optional[Any] = None  # the last Inductor compiler used, for reset()
        # An instance attribute: Dynamo wraps the backend with functools.wraps, which copies
        # the instance's __dict__ (see the module doc).
        self.backend_ctx_ctor = _transformers_logging_ignored

    def __call__(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any],
        *,
        mode: Optional[str] = None,
        options: Optional[dict[str, Any]] = None,
    ) -> Callable[..., Any]:
        rewrite_options, inductor_options = self._split_options(options)
        rewrite_linear_cross_entropy(gm, rewrite_options)
        self._inductor = compat.inductor_compiler(mode, inductor_options)
        return self._inductor(gm, example_inputs)

    def reset(self) -> None:
        """Called by torch._dynamo.reset(): lets Inductor drop its CUDA graph trees."""
        if self._inductor is not None:
            self._inductor.reset()

    def _split_options(
        self, options: Optional[dict[str, Any]]
    ) -> tuple[RewriteOptions, dict[str, Any]]:
        inductor_options, overrides = {}, {}
        for key, value in (options or {}).items():
            if key.startswith(OPTION_PREFIX):
                overrides[key[len(OPTION_PREFIX):]] = value
            else:
                inductor_options[key] = value
        known = {field.name for field in dataclasses.fields(RewriteOptions)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown cce options {[OPTION_PREFIX + k for k in unknown]}; known: "
                f"{[OPTION_PREFIX + k for k in sorted(known)]}"
            )
        return dataclasses.replace(self.options, **overrides), inductor_options

    def __repr__(self) -> str:
        return f"CCEBackend({self.options})"


# transformers' additions to logging.Logger (transformers.utils.logging), and the Logger
# methods its modules call on their own loggers.
_TRANSFORMERS_LOGGER_METHODS = ("warning_once", "info_once", "warning_advice")
_LOGGER_METHODS = ("debug", "info", "warning", "warn")


def _transformers_logging_ignored() -> ContextManager[Any]:
    """Dynamo traces transformers' logging calls as no-ops inside the block (see the module
    doc): Logger methods only transformers defines, and the usual methods of the loggers of
    transformers' modules (named "transformers..."), as loaded when the block is entered."""
    if "transformers" not in sys.modules:
        return contextlib.nullcontext()
    return compat.dynamo_ignoring_calls(_transformers_logging_calls(
        len(logging.Logger.manager.loggerDict)))


@functools.lru_cache(maxsize=1)
def _transformers_logging_calls(logger_count: int) -> frozenset:
    """The calls for `_transformers_logging_ignored`; logger_count (of all loggers) only keys
    the cache: new transformers modules bring new loggers."""
    calls = {getattr(logging.Logger, name) for name in _TRANSFORMERS_LOGGER_METHODS
             if hasattr(logging.Logger, name)}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (name == "transformers" or name.startswith("transformers.")) and \
                isinstance(logger, logging.Logger):
            calls.update(getattr(logger, method) for method in _LOGGER_METHODS)
    return frozenset(calls)


def make_cce_backend(
    *,
    filter_eps: FilterEps = "auto",
    filter_grads: str = "all",
    patterns: Optional[Iterable[str]] = None,
    drop_logits: bool = False,
) -> CCEBackend:
    """A torch.compile backend with these graph pass options (see `RewriteOptions`).

    filter_eps: gradient filter threshold of the fused backward: 'auto' (finfo(dtype).eps / 32
        for 16-bit inputs, off for float32), None (off) or a float.
    filter_grads: 'all' (every gradient filters) or 'input' (only the input's: the
        classifier's gradient sums every tile, the paper's pretraining recipe).
    patterns: names from `cce_inductor.patterns.PATTERNS` that may be rewritten (default: all).
    drop_logits: the caller promises not to read logits that the graph returns beside the loss;
        they come back as empty `[..., 0]` tensors and are never computed.
    """
    from cce_inductor.patterns import PATTERNS

    return CCEBackend(RewriteOptions(
        filter_eps=filter_eps,
        filter_grads=filter_grads,
        patterns=PATTERNS if patterns is None else frozenset(patterns),
        drop_logits=drop_logits,
    ))


compat.forward_backend_context(CCEBackend)
cce_backend: CCEBackend = make_cce_backend()
"""The default backend, also registered as torch.compile(backend="cce")."""
