"""Sites on DTensors: a tensor-parallel classifier head gets the vocabulary-parallel fused loss.

Dynamo does not trace through DTensor: the graph the backend sees holds torch-level ops whose
example values are DTensors (AOT autograd desugars them later). A column-parallel head,
`parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})` with
the cross-entropy under `loss_parallel()` (or a DTensor target), reads

    hidden = DTensor.from_local(h, mesh, (Replicate(),))   # ColwiseParallel's input hook
    logits = linear(hidden, weight)                         # weight: DTensor, Shard(0)
    logits = logits.redistribute(placements=(Shard(-1),))   # its output hook (no-op here)
    loss   = cross_entropy(logits.flatten(0, 1), target)    # a Replicate() DTensor

`cce_inductor.patterns` reads `redistribute` as a layout change that keeps the values, and
`fused_loss` tells the rewrite which function replaces the loss: for this layout
`tensor_parallel_loss` below, which runs `vocab_parallel.sharded_loss` on the local blocks with
the group, this rank's first class and the global V read from the DTensor spec at compile time
(as Dynamo itself bakes in the mesh coordinates), so it needs no layout collective, and wraps
the loss back into a Replicate() DTensor, the type the graph returned. The result equals the
DTensor computation's (loss_parallel's or the all-gathered logits') without the [N, V] logits;
the traffic is the vocab_parallel module doc's table without its layout all_gather.

Layouts handled: a 1-D mesh; classifier weight `[V, D]` Shard(0) (or a `[D, V]` matrix
Shard(1)) and bias Shard(0); hidden states replicated; target and class weights replicated or
plain tensors; the loss replicated. Anything else is left alone with a reason
("dtensor_mesh", "dtensor_layout", "dtensor_empty_block").
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from cce_inductor import api, arguments, compat, patterns, vocab_parallel


def fused_loss(site: patterns.Site) -> tuple[Callable[..., Tensor], dict[str, Any]]:
    """The function that replaces the site's loss and the keyword arguments it takes beyond
    `api.linear_head`'s: that function itself for a site on plain tensors,
    `tensor_parallel_loss` and the vocabulary layout for a tensor-parallel head.
    Raises NotASite for a DTensor layout it cannot handle."""
    values = {
        "input": site.input, "classifier": site.classifier, "bias": site.bias,
        "target": site.target,
        "class weights": site.class_weight, "result": site.consumer,
    }
    values = {name: patterns.example_value(node) for name, node in values.items()}
    if not any(_is_dtensor(value) for value in values.values()):
        return api.linear_head, {}
    return tensor_parallel_loss, _vocab_layout(values, site.classifier_is_transposed)


def _vocab_layout(values: dict[str, Any], classifier_is_transposed: bool) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard

    classifier = values["classifier"]
    if not _is_dtensor(classifier):
        raise patterns.NotASite("dtensor_layout", "the classifier is not a DTensor")
    mesh = classifier.device_mesh
    if mesh.ndim != 1:
        raise patterns.NotASite(
            "dtensor_mesh", f"the classifier lies on a {mesh.ndim}-D mesh; only 1-D "
            "meshes (one tensor-parallel group) are handled"
        )
    vocab_dim = 1 if classifier_is_transposed else 0
    _require(values, "classifier", (Shard(vocab_dim),), mesh)
    _require(values, "input", (Replicate(),), mesh)
    _require(values, "bias", (Shard(0),), mesh)
    _require(values, "result", (Replicate(),), mesh)  # a DTensor, as the replacement returns
    for name in ("target", "class weights"):
        _require(values, name, (Replicate(),), mesh, plain=True)
    vocab = classifier.shape[vocab_dim]
    real_mesh = compat.real_device_mesh(mesh)
    ranks = mesh.size(0)
    blocks = [compat.shard_block(vocab, ranks, rank) for rank in range(ranks)]
    if any(length == 0 for _, length in blocks):
        raise patterns.NotASite(
            "dtensor_empty_block", f"V = {vocab} over {ranks} ranks leaves a rank no classes"
        )
    start, _ = blocks[real_mesh.get_local_rank(0)]
    return {"group_name": real_mesh.get_group(0).group_name, "start": start, "vocab": vocab}


def _require(
    values: dict[str, Any], name: str, placements: tuple, mesh: Any, plain: bool = False
) -> None:
    """values[name] is None, a plain tensor (when `plain`), or a DTensor on `mesh` placed as
    `placements`."""
    value = values[name]
    if value is None or (plain and not _is_dtensor(value)):
        return
    if not _is_dtensor(value):
        raise patterns.NotASite("dtensor_layout", f"the {name} is not a DTensor")
    if value.device_mesh != mesh or tuple(value.placements) != placements:
        raise patterns.NotASite(
            "dtensor_layout",
            f"the {name} is placed {tuple(value.placements)}; the vocabulary-parallel loss "
            f"needs {placements} on the classifier's mesh",
        )


def _is_dtensor(value: Any) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _local(tensor: Optional[Tensor]) -> Optional[Tensor]:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def tensor_parallel_loss(
    input: Tensor,
    linear_weight: Tensor,
    target: Optional[Tensor],
    *,
    group_name: str,
    start: int,
    vocab: int,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    **options: Any,
) -> tuple[Tensor, ...]:
    """The outputs of a tensor-parallel head, each a Replicate() DTensor: input a replicated
    DTensor `[..., D]`, linear_weight and linear_bias Shard(0) DTensors holding this rank's block
    `[start, start + V_local)` of the `vocab` classes, target and class weights replicated
    (DTensors or plain tensors). The layout comes from `fused_loss`; `options` are those of
    `arguments.LossOptions` (the rewrite passes them as to `api.linear_head`)."""
    from torch.distributed.tensor import DTensor, Replicate

    local_weight = linear_weight.to_local()
    block = slice(start, start + local_weight.shape[0])
    local_bias = _local(linear_bias)
    class_weight = _local(weight)[block] if weight is not None else None
    local_input, local_target = input.to_local(), _local(target)
    loss_options = arguments.LossOptions(**options)
    arguments.check_arguments(
        local_input, local_weight, local_target, local_bias, class_weight, loss_options
    )
    results = vocab_parallel.sharded_loss(
        local_input, local_weight, local_target, local_bias, class_weight, loss_options,
        group=group_name, start=start, vocab=vocab,
    )
    mesh = compat.real_device_mesh(linear_weight.device_mesh)
    return tuple(DTensor.from_local(result, mesh, (Replicate(),), run_check=False)
                 for result in results)
