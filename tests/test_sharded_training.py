"""Sharded training compiled with torch.compile(backend="cce"): DDP, FSDP2, a tensor-parallel
classifier head, and FSDP2 with a tensor-parallel head, on CPU with two gloo processes.

Two processes are spawned ONCE for the module; they train a small language model for a few
optimizer steps in every setup and save the losses, the final parameters (whole), the rewrite's
counters and a profile of the collectives of one step; then they record the graph pass's
decision on a few other tensor-parallel heads (DECISIONS). The tests replay each setup in this
process without any parallelism, eagerly, in float32 and float64, and hold the sharded compiled
run to the rule of tests/reference.py: its error against float64 at most a small multiple of
torch's own float32 error (see `torch_float32_runs`; parameters measured by `update_error`).

What a rank computes, and so the single-process replay:
- data parallel (DDP, FSDP2): rank r trains on its rows of the batch, and the gradient is the
  average over ranks, i.e. that of the mean over ranks of the per-rank losses;
- tensor parallel: every rank holds the whole batch and one block of the classifier's classes;
  the loss is the whole batch's loss on every rank.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import traceback
import zlib
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ranks
import reference
import support
from cce_inductor import compat, filter_stats
from cce_inductor.rewrite import rewrite_linear_cross_entropy

WORLD = 2
VOCAB, HIDDEN = 96, 32
# The MLP block's width. At 4096, fc1 and fc2 hold 2 * HIDDEN * 4096 * 4 bytes = 1 MiB, DDP's
# first bucket: DDPOptimizer with bucket_cap_mb=1 then splits the graph in two.
WIDTH, SPLITTING_WIDTH = 64, 4096
BATCH, SEQ = 4, 9  # labels are shifted: (SEQ - 1) positions per row
ROWS = BATCH * (SEQ - 1)  # rows of the loss on a tensor-parallel rank
STEPS = 3
IGNORE_INDEX = -100
FAR = 40.0  # how far below the others the "far_block" setup puts rank 1's classes


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    parallel: str  # "ddp", "fsdp2", "tp" (lm_head ColwiseParallel) or "fsdp2_tp" (both)
    optimizer: str = "adam"
    vocab: int = VOCAB
    bias: bool = False
    softcap: Optional[float] = None
    label_smoothing: float = 0.0
    class_weight: bool = False
    reduction: str = "mean"
    dtensor_target: bool = False  # tp: targets (and class weights) as replicated DTensors
    #                               instead of plain tensors under loss_parallel()
    head: str = "colwise"  # tp: "colwise" (by classes), "rowwise" (by hidden units), or
    #                        "unembedding": `hidden @ M` with M [D, V] sharded by classes
    far_block: bool = False  # rank 1's classes get logits FAR below, and no targets
    filter_eps: Optional[float] = None  # the backend's cce.filter_eps
    width: int = WIDTH

    @property
    def data_parallel(self) -> bool:
        return self.parallel in ("ddp", "fsdp2")


SETUPS = [
    Setup("ddp_split_graph", "ddp", optimizer="sgd", bias=True, softcap=20.0, label_smoothing=0.1,
          class_weight=True, width=SPLITTING_WIDTH),
    Setup("fsdp2", "fsdp2", optimizer="sgd", reduction="sum", bias=True, class_weight=True),
    # V = 97: blocks of 49 and 48 classes. Filtering: see test_filter_judges_the_global_softmax.
    Setup("tp_loss_parallel", "tp", vocab=VOCAB + 1, bias=True, far_block=True,
          filter_eps=1e-6),
    Setup("tp_dtensor_target", "tp", optimizer="sgd", dtensor_target=True, reduction="none",
          label_smoothing=0.1, class_weight=True, bias=True, softcap=20.0),
    Setup("fsdp2_tp", "fsdp2_tp", reduction="sum"),
]
SETUP_BY_NAME = {setup.name: setup for setup in SETUPS}
# Not trained: the graph pass's decision, and one step of the graph it leaves, run eagerly.
DECISIONS = [
    Setup("tp_rowwise_head", "tp", dtensor_target=True, head="rowwise"),
    Setup("tp_unembedding_matmul", "tp", vocab=VOCAB + 1, head="unembedding"),
    Setup("tp_one_class", "tp", vocab=1, dtensor_target=True),
]


class TinyLM(nn.Module):
    """Embedding, one pre-norm MLP block, final norm, classifier head, and (as Hugging Face
    causal LMs do) the shifted cross-entropy inside forward."""

    def __init__(self, setup: Setup) -> None:
        super().__init__()
        self.setup = setup
        self.embed = nn.Embedding(setup.vocab, HIDDEN)
        self.block = Block(setup.width)
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, setup.vocab, bias=setup.bias)
        class_weight = torch.rand(setup.vocab) + 0.5 if setup.class_weight else None
        self.register_buffer("class_weight", class_weight)
        if setup.far_block:
            with torch.no_grad():
                self.lm_head.bias[_far_classes(setup)] -= FAR

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(self.block(self.embed(tokens))))
        if self.setup.softcap is not None:
            logits = torch.tanh(logits / self.setup.softcap) * self.setup.softcap
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), weight=self.class_weight,
            ignore_index=IGNORE_INDEX, label_smoothing=self.setup.label_smoothing,
            reduction=self.setup.reduction,
        )


class UnembeddingLM(nn.Module):
    """Embedding and `hidden @ unembedding` with a [D, V] matrix; with a mesh, the matrix is
    sharded by classes (Shard(1)) and the hidden states are a replicated DTensor."""

    def __init__(self, setup: Setup, mesh: Any = None) -> None:
        super().__init__()
        torch.manual_seed(zlib_seed(setup.name))
        self.embed = nn.Embedding(setup.vocab, HIDDEN)
        unembedding = torch.randn(HIDDEN, setup.vocab) / HIDDEN**0.5
        if mesh is not None:
            from torch.distributed.tensor import Shard, distribute_tensor

            unembedding = distribute_tensor(unembedding, mesh, [Shard(1)])
        self.unembedding = nn.Parameter(unembedding)
        self.mesh = mesh

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        if self.mesh is not None:
            from torch.distributed.tensor import DTensor, Replicate

            hidden = DTensor.from_local(hidden, self.mesh, [Replicate()], run_check=False)
        logits = hidden @ self.unembedding
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, width)
        self.fc2 = nn.Linear(width, HIDDEN)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.fc2(F.gelu(self.fc1(self.norm(hidden))))


def _far_classes(setup: Setup) -> slice:
    """Rank 1's block of a tensor-parallel head (DTensor's Shard(0) layout)."""
    start, _ = compat.shard_block(setup.vocab, WORLD, 1)
    return slice(start, setup.vocab)


def make_model(setup: Setup) -> TinyLM:
    torch.manual_seed(zlib_seed(setup.name))
    return TinyLM(setup)


def make_batch(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """The (tokens, labels) every step trains on; about a quarter of the labels ignored."""
    gen = torch.Generator().manual_seed(zlib_seed(setup.name) + 1)
    high = _far_classes(setup).start if setup.far_block else setup.vocab
    tokens = torch.randint(0, setup.vocab, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, high, (BATCH, SEQ), generator=gen)
    labels[torch.rand(BATCH, SEQ, generator=gen) < 0.25] = IGNORE_INDEX
    return tokens, labels


def zlib_seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 2**31


def make_optimizer(setup: Setup, params) -> torch.optim.Optimizer:
    if setup.optimizer == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def to_scalar_loss(loss: torch.Tensor) -> torch.Tensor:
    """reduction='none' returns per-row losses: train on their mean."""
    return loss.mean() if loss.dim() else loss


# --- the worker processes -----------------------------------------------------------------


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    results = {}
    try:
        for name, run in [*((s.name, functools.partial(_train, s)) for s in SETUPS),
                          *((s.name, functools.partial(_decide, s)) for s in DECISIONS)]:
            try:
                results[name] = run(rank)
            except Exception:  # noqa: BLE001  (reported by that setup's tests)
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _train(setup: Setup, rank: int) -> dict[str, Any]:
    counters = support.fresh_dynamo_state()
    model = make_model(setup)
    parallel, mesh = _parallelize(model, setup)
    optimizer = make_optimizer(setup, model.parameters())
    options = {"cce.filter_eps": setup.filter_eps} if setup.filter_eps is not None else {}
    compiled = torch.compile(parallel, backend="cce", options=options)
    tokens, labels = _rank_batch(setup, rank)
    losses, filtering, collectives = [], [], None
    for step in range(STEPS):
        with filter_stats.collect() as stats, _CollectiveProfile(step == 1) as profile:
            loss = _forward_backward(compiled, tokens, labels, setup, mesh)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(_whole(loss).detach())
        filtering.append((stats.skipped, stats.total))
        collectives = profile.collectives if step == 1 else collectives
    return {
        "losses": torch.stack(losses),
        "params": {name: _whole(param).detach() for name, param in model.named_parameters()},
        "cce": dict(counters["cce"]),
        "graphs": counters["aot_autograd"]["total"],
        "filtering": filtering,
        "collectives": collectives,
    }


def _decide(setup: Setup, rank: int) -> dict[str, Any]:
    """The graph pass's decision, and the loss and gradients of one step of the graph it
    leaves, run eagerly (no Inductor: what is checked is the rewrite)."""
    counters = support.fresh_dynamo_state()
    if setup.head == "unembedding":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        model = UnembeddingLM(setup, mesh)
    else:
        model = make_model(setup)
        _, mesh = _parallelize(model, setup)

    def rewrite_only(gm: torch.fx.GraphModule, example_inputs) -> Any:
        rewrite_linear_cross_entropy(gm)
        return gm.forward

    tokens, labels = _rank_batch(setup, rank)
    loss = _forward_backward(torch.compile(model, backend=rewrite_only), tokens, labels,
                             setup, mesh)
    return {
        "cce": dict(counters["cce"]),
        "loss": _whole(loss).detach(),
        "grads": {name: _whole(param.grad) for name, param in model.named_parameters()},
    }


def _rank_batch(setup: Setup, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, labels = make_batch(setup)
    if setup.data_parallel:
        return tokens.chunk(WORLD)[rank], labels.chunk(WORLD)[rank]
    return tokens, labels


def _parallelize(model: TinyLM, setup: Setup) -> tuple[nn.Module, Any]:
    """(the module to compile, the tensor-parallel mesh or None)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, parallelize_module,
    )

    if setup.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1), None
    if setup.parallel == "fsdp2":
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.block, mesh=mesh)  # a graph break on each side of the block
        fully_shard(model, mesh=mesh)
        return model, None
    # loss_parallel needs class-sharded logits: use_local_output=False keeps them a DTensor.
    plan = RowwiseParallel(input_layouts=Replicate(), use_local_output=False) \
        if setup.head == "rowwise" else ColwiseParallel(use_local_output=False)
    if setup.parallel == "tp":
        mesh = init_device_mesh("cpu", (WORLD,))
        parallelize_module(model, mesh, {"lm_head": plan})
    else:  # FSDP2 over a 2-D (data, tensor) mesh, one data-parallel replica
        mesh_2d = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
        mesh = mesh_2d["tp"]
        parallelize_module(model, mesh, {"lm_head": plan})
        fully_shard(model, mesh=mesh_2d["dp"])
    if setup.dtensor_target and model.class_weight is not None:
        model.class_weight = distribute_tensor(model.class_weight, mesh, [Replicate()])
    return model, mesh


def _forward_backward(compiled, tokens, labels, setup: Setup, mesh) -> torch.Tensor:
    if setup.data_parallel:
        loss = to_scalar_loss(compiled(tokens, labels))
        loss.backward()
        return loss
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    if setup.dtensor_target:  # no loss_parallel: DTensor ops take DTensor targets
        loss = to_scalar_loss(compiled(tokens, distribute_tensor(labels, mesh, [Replicate()])))
        loss.backward()
        return loss
    with loss_parallel():  # its backward too, as loss_parallel's documentation requires
        loss = to_scalar_loss(compiled(tokens, labels))
        loss.backward()
    return loss


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class _CollectiveProfile:
    """The functional collectives (name, input shapes) run inside, in order, when enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.collectives: list[tuple[str, list]] = []

    def __enter__(self) -> "_CollectiveProfile":
        if self.enabled:
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
            )
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self.profiler.__exit__(*exc)
        for event in self.profiler.events():
            if event.name.startswith("_c10d_functional::") and "wait" not in event.name:
                self.collectives.append((event.name, event.input_shapes))


# --- the single-process replay --------------------------------------------------------------


def replay(setup: Setup, dtype: torch.dtype, order: str = "batch") -> dict[str, Any]:
    """The setup's training, eager, in one process, in `dtype` (the batch stays int64).
    order "reversed" reverses the rows within each data-parallel shard: the same math summed in
    another order."""
    model = make_model(setup).to(dtype)
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = make_optimizer(setup, model.parameters())
    tokens, labels = make_batch(setup)
    if order == "reversed":
        rows = torch.arange(BATCH).view(WORLD, -1).flip(1).flatten()
        tokens, labels = tokens[rows], labels[rows]
    losses = []
    for _ in range(STEPS):
        if setup.data_parallel:
            shards = zip(tokens.chunk(WORLD), labels.chunk(WORLD))
            loss = sum(to_scalar_loss(model(t, l)) for t, l in shards) / WORLD
        else:
            loss = to_scalar_loss(model(tokens, labels))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return {
        "losses": torch.stack(losses),
        "params": {name: param.detach() for name, param in model.named_parameters()},
        "initial": initial,
    }


def torch_float32_runs(setup: Setup) -> list[dict[str, Any]]:
    """Eager float32 replays that differ only in summation order (1 or 2 intra-op threads, rows
    in either order). After a few optimizer steps their errors against float64 differ by factors
    of up to ~5 (Adam turns the rounding noise of near-zero gradients into whole steps), so no
    single run measures "torch's own float32 error": the largest of them does."""
    previous = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.extend(replay(setup, torch.float32, order) for order in ("batch", "reversed"))
        return runs
    finally:
        torch.set_num_threads(previous)


def update_error(params: dict, exact: dict[str, Any]) -> dict[str, float]:
    """Per parameter tensor: the RMS of (params - exact params), divided by the RMS of the
    exact update (exact params - initial params).

    Why not tests/reference.py's max-abs error of each tensor: after a few optimizer steps the
    largest differences sit at the few entries whose gradients are near zero, where rounding
    noise decides the update (Adam normalizes it to a full step), and the largest magnitude of a
    small tensor such as a LayerNorm bias is itself a few updates: the measure then compares
    two samples of noise. The RMS against the size of the update averages over the tensor.
    """
    errors = {}
    for name, value in params.items():
        expected, initial = exact["params"][name], exact["initial"][name]
        difference = (value.double() - expected).square().mean().sqrt()
        update = (expected - initial).square().mean().sqrt()
        errors[name] = (difference / update).item() if update > 0 else difference.item()
    return errors


# --- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, Any]]:
    return ranks.spawn_ranks(_worker, tmp_path_factory.mktemp("sharded_training"), WORLD)


def _results(rank_results, name: str) -> list[dict[str, Any]]:
    per_rank = [results[name] for results in rank_results]
    for rank, result in enumerate(per_rank):
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
    return per_rank


@pytest.mark.parametrize("setup", SETUPS, ids=lambda setup: setup.name)
def test_training_matches_single_process_eager(rank_results, setup):
    per_rank = _results(rank_results, setup.name)
    ours = per_rank[0]
    for other in per_rank[1:]:  # every rank ends with the same (whole) model
        for name, value in other["params"].items():
            torch.testing.assert_close(value, ours["params"][name], rtol=0, atol=0)
        if not setup.data_parallel:  # tensor parallel: the same loss everywhere
            torch.testing.assert_close(other["losses"], ours["losses"], rtol=0, atol=0)
    losses = ours["losses"]
    if setup.data_parallel:  # rank r's loss is that of its rows; the replay's is their mean
        losses = sum(result["losses"] for result in per_rank) / WORLD
    exact, runs = replay(setup, torch.float64), torch_float32_runs(setup)
    tolerance = reference.TOLERANCES[torch.float32]

    def check(label: str, ours_error: float, torch_errors: list[float]) -> None:
        bound = tolerance.factor * max(torch_errors) + tolerance.margin
        assert ours_error <= bound, (
            f"{label}: error {ours_error:.3g} vs float64 exceeds {tolerance.factor} x torch "
            f"float32's largest {max(torch_errors):.3g} + {tolerance.margin:.3g}"
        )

    check("losses", reference.relative_error(losses, exact["losses"]),
          [reference.relative_error(run["losses"], exact["losses"]) for run in runs])
    ours_errors = update_error(ours["params"], exact)
    torch_errors = [update_error(run["params"], exact) for run in runs]
    for name, error in ours_errors.items():
        check(f"param {name}", error, [errors[name] for errors in torch_errors])
    assert losses[-1] < losses[0]  # it trained


@pytest.mark.parametrize("setup", SETUPS, ids=lambda setup: setup.name)
def test_the_loss_was_rewritten(rank_results, setup):
    for result in _results(rank_results, setup.name):
        assert result["cce"] == {"rewritten": 1}


def test_ddp_optimizer_split_keeps_the_site_whole(rank_results):
    """DDPOptimizer splits the graph at bucket boundaries, counting parameters from the output
    backwards: the head and the loss, with no parameter between them, land in one subgraph."""
    for result in _results(rank_results, "ddp_split_graph"):
        assert result["graphs"] == 2  # two buckets: two subgraphs compiled
        assert result["cce"] == {"rewritten": 1}


@pytest.mark.parametrize("setup, sums", [("tp_loss_parallel", 2), ("tp_dtensor_target", 4)])
def test_vocab_parallel_traffic(rank_results, setup, sums):
    """One tensor-parallel step's collectives are the vocab_parallel module doc's table without
    its layout all_gather: all_reduce max [N] and sum [(2 + ls + cw) N + cw] forward, all_reduce
    sum of the hidden states' gradient [N, D] backward. No all_gather: the logits never move."""
    class_weight = int(SETUP_BY_NAME[setup].class_weight)
    expected = [[ROWS], [sums * ROWS + class_weight], [ROWS, HIDDEN]]
    for result in _results(rank_results, setup):
        names = [name for name, _ in result["collectives"]]
        assert names == ["_c10d_functional::all_reduce_"] * 3, result["collectives"]
        assert [shapes[0] for _, shapes in result["collectives"]] == expected


def test_filter_judges_the_global_softmax(rank_results):
    """Rank 1's classes lie FAR below rank 0's and hold no target: judged against the global
    lse, every backward tile of rank 1 is skipped (each would hold ~1/48 of its block's own
    softmax); rank 0 holds the softmax mass and skips less. Training is unchanged: the skipped
    gradients are ~exp(-FAR), far below float32 resolution (test_training_matches...)."""
    rank0, rank1 = _results(rank_results, "tp_loss_parallel")
    for (skipped0, total0), (skipped1, total1) in zip(rank0["filtering"], rank1["filtering"]):
        assert total1 > 0 and skipped1 == total1
        assert skipped0 < total0


@pytest.mark.parametrize("setup, decision", [
    # A head sharded by hidden units (RowwiseParallel) gives each rank partial logits of every
    # class, not a block of classes: the vocabulary-parallel loss does not apply.
    ("tp_rowwise_head", "skipped:dtensor_layout"),
    # x @ M with M [D, V] Shard(1): the classes are sharded, as with nn.Linear's [V, D] Shard(0).
    ("tp_unembedding_matmul", "rewritten"),
    # V = 1 over two ranks leaves rank 1 an empty block (DTensor shards like torch.chunk).
    ("tp_one_class", "skipped:dtensor_empty_block"),
])
def test_graph_pass_decision(rank_results, setup, decision):
    """The pass's decision on other tensor-parallel heads, and the loss and gradients of the
    graph it leaves (one step, eager) against the single-process computation, under the rule
    of tests/reference.py."""
    setup = next(s for s in DECISIONS if s.name == setup)
    exact, same_dtype = (_one_step(setup, dtype) for dtype in (torch.float64, torch.float32))
    tolerance = reference.TOLERANCES[torch.float32]
    for result in _results(rank_results, setup.name):
        assert result["cce"] == {decision: 1}
        ours = {"loss": result["loss"], **result["grads"]}
        for name, expected in exact.items():
            error = reference.relative_error(ours[name], expected)
            torch_error = reference.relative_error(same_dtype[name], expected)
            assert error <= tolerance.factor * torch_error + tolerance.margin, (
                name, error, torch_error
            )


def _one_step(setup: Setup, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Loss and parameter gradients of one step of the setup's model, single process."""
    model = UnembeddingLM(setup) if setup.head == "unembedding" else make_model(setup)
    model = model.to(dtype)
    loss = model(*make_batch(setup))
    loss.backward()
    return {"loss": loss.detach(), **{name: p.grad for name, p in model.named_parameters()}}
