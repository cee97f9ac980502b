"""How many backward tiles a trained model keeps: the filter's workload on real hidden states.

    python -m cce_inductor.tools.kept_tiles                 # 600 bf16 steps, about 15 min on CPU
    python -m cce_inductor.tools.kept_tiles --steps 50 --vocab 8192

Trains the demo LM (`toy_lm`, vocabulary 32768, hidden 128) in bf16 with AdamW on English text
(the docstrings of Python's standard library, split into words, ids numbered by first
appearance as `toy_lm.WordTokenizer` does), until its held-out loss is well below ln V. Then,
on held-out hidden states (after the final norm) and the lm_head, per tile of the backward
(tile rows x 128 classes, the shipped tiles' heights): the fraction of tiles the filter keeps
(some softmax value >= filter_eps, or a target inside; rows whose loss is ignored never keep
one), the fraction skippable before recomputing the logits (the dz kernel's rule, from the
maximum logit of every 16 rows x 128 classes and each row's lse), for

  * the tokenizer's ids as they are (frequent words tend to come early: first appearance),
  * the classes sorted by their mean logit over the rows (the vocabulary sorting the paper's
    kernel does per batch),
  * the ids randomly permuted (a tokenizer whose ids say nothing about frequency), and that
    permutation sorted again.
"""

from __future__ import annotations

import argparse
import ast
import math
import re
import sysconfig
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tabulate import tabulate

from cce_inductor import ops
from cce_inductor.lowering import backward, configs
from cce_inductor.tools.toy_lm import ToyLMConfig, build_model

SEQ_LEN = 128
HELD_OUT_TOKENS = 20000
FILTER_EPS = 2.0**-12  # the bf16 default, finfo(bfloat16).eps / 32


def stdlib_words() -> list[str]:
    """The words and punctuation of the docstrings of Python's standard library, in file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", "\n\n".join(docs).lower())


def token_stream(vocab: int) -> torch.Tensor:
    """Ids by first appearance (0 is padding); words beyond the vocabulary share its last id."""
    ids: dict[str, int] = {}
    stream = [min(ids.setdefault(word, len(ids) + 1), vocab - 1) for word in stdlib_words()]
    return torch.tensor(stream)


def train(stream: torch.Tensor, args: argparse.Namespace) -> torch.nn.Module:
    config = ToyLMConfig(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers,
                         max_seq_len=SEQ_LEN)
    model = build_model(config, args.seed).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    train_end = len(stream) - HELD_OUT_TOKENS
    start = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, train_end - SEQ_LEN - 1, (args.batch_size,), generator=generator)
        ids = torch.stack([stream[s:s + SEQ_LEN] for s in starts.tolist()])
        loss = model(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"  step {step + 1}/{args.steps}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return model


def held_out(model: torch.nn.Module, stream: torch.Tensor, rows: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Hidden states [N, D] (after the final norm), lm_head [V, D], targets [N] (-100 at each
    sequence's last position) and the mean loss, on held-out text."""
    base = len(stream) - HELD_OUT_TOKENS
    sequences = torch.stack([stream[base + i * (SEQ_LEN + 1):][:SEQ_LEN]
                             for i in range(rows // SEQ_LEN)])
    captured = {}
    handle = model.norm.register_forward_hook(lambda module, inputs, out: captured.update(e=out))
    with torch.no_grad():
        loss = model(sequences, sequences).item()
    handle.remove()
    target = F.pad(sequences, (0, 1), value=-100)[..., 1:].reshape(-1)
    return (captured["e"].reshape(-1, captured["e"].shape[-1]), model.lm_head.weight.detach(),
            target, loss)


def tile_fractions(logits: torch.Tensor, target: torch.Tensor, block_n: int
                   ) -> tuple[float, float]:
    """(kept, skippable before recomputing) fractions of the block_n x 128 tiles."""
    n, v = logits.shape
    cols = ops.TILE_MAX_COLS
    pad_n, pad_v = -n % block_n, -v % cols
    lse = logits.logsumexp(1)
    live = target != -100
    z = F.pad(logits, (0, pad_v, 0, pad_n), value=float("-inf"))
    lse = F.pad(lse, (0, pad_n))
    live = F.pad(live, (0, pad_n))
    rows, tiles = z.shape[0] // block_n, z.shape[1] // cols
    p_max = (z - lse[:, None]).exp().view(rows, block_n, tiles, cols).amax(3)
    p_max = torch.where(live.view(rows, block_n, 1), p_max, 0.0).amax(1)
    holds = torch.zeros(rows, tiles, dtype=torch.bool)
    index = torch.arange(n)[target != -100]
    holds[index // block_n, target[index] // cols] = True
    kept = (p_max >= FILTER_EPS) | holds
    group = ops.TILE_MAX_ROWS
    tile_max = z.view(-1, group, tiles, cols).amax((1, 3)).repeat_interleave(group, 0)
    bound = tile_max - lse[:, None] + backward.EARLY_LOG_MARGIN
    bound = torch.where(live[:, None], bound, float("-inf")).view(rows, block_n, tiles).amax(1)
    early = (bound < math.log(FILTER_EPS)) & ~holds
    return kept.float().mean().item(), early.float().mean().item()


def _permuted(logits: torch.Tensor, target: torch.Tensor, order: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits with their classes in `order` and the targets renamed accordingly."""
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    return logits[:, order], torch.where(target >= 0, position[target.clamp(min=0)], target)


def _by_mean_logit(logits: torch.Tensor) -> torch.Tensor:
    return logits.mean(0).argsort(descending=True)


def measure(logits: torch.Tensor, target: torch.Tensor, block_ns: list[int], seed: int
            ) -> list[list[str]]:
    shuffled = torch.randperm(logits.shape[1], generator=torch.Generator().manual_seed(seed))
    random_logits, random_target = _permuted(logits, target, shuffled)
    orders = {
        "tokenizer ids": (logits, target),
        "sorted by mean logit": _permuted(logits, target, _by_mean_logit(logits)),
        "random ids": (random_logits, random_target),
        "random ids, sorted": _permuted(random_logits, random_target,
                                        _by_mean_logit(random_logits)),
    }
    rows = []
    for name, (z, t) in orders.items():
        row = [name]
        for block_n in block_ns:
            kept, early = tile_fractions(z, t, block_n)
            row += [f"{kept:.1%}", f"{early:.1%}"]
        rows.append(row)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cce_inductor.tools.kept_tiles",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rows", type=int, default=4096, help="held-out positions measured")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rows < SEQ_LEN:
        parser.error(f"--rows must be at least {SEQ_LEN}")
    torch.manual_seed(args.seed)
    stream = token_stream(args.vocab)
    print(f"kept_tiles: {len(stream)} tokens, {int(stream.max()) + 1} ids used of {args.vocab}; "
          f"ln V = {math.log(args.vocab):.2f}; {args.steps} bf16 AdamW steps of "
          f"{args.batch_size} x {SEQ_LEN}", flush=True)
    model = train(stream, args)
    hidden, classifier, target, loss = held_out(model, stream, args.rows)
    logits = hidden.float() @ classifier.float().T  # bf16 inputs, fp32 products, as the kernels
    block_ns = sorted({configs.LOGIT_TILES.shipped(configs.SIXTEEN_BIT, arch)[0].block_n
                       for arch in configs.ARCHS})
    headers = ["class order"] + [f"{label} ({block_n} rows)" for block_n in block_ns
                                 for label in ("kept", "skippable early")]
    print(f"\nheld-out loss {loss:.3f} (ln V = {math.log(args.vocab):.2f}) after {args.steps} "
          f"steps; {hidden.shape[0]} positions, filter_eps 2^-12, tiles of 128 classes:")
    print(tabulate(measure(logits, target, block_ns, args.seed), headers=headers,
                   tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
