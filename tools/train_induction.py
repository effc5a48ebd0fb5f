"""Train the shipped induction model and write its weights, config and prompt dataset.

A 2-layer attention-only transformer (no layer norm, no MLPs) learns *induction*
(Elhage et al. 2021, `A Mathematical Framework for Transformer Circuits
<https://transformer-circuits.pub/2021/framework/index.html>`_; Olsson et al. 2022,
`In-context Learning and Induction Heads <https://arxiv.org/abs/2209.11895>`_): in
``... A B ... A`` predict ``B``. Training sequences are BOS followed by distinct random
tokens in which a segment of random length repeats at a random offset; the loss is the
next-token loss on the repeated copy only. Random lengths and offsets leave the model no
positional shortcut: it must find the earlier copy of the current token by content, which
in two attention-only layers is the previous-token head + induction head circuit.

Left alone, every head of the model learns the task (four redundant induction heads). A
concave penalty on the heads' output weights (:func:`head_norm_penalty`), switched on
after the circuit has formed, makes the heads compete, and the heads the task does not
need end with zero output. The trained model (seed 0) keeps two previous-token heads
(0.1, 0.2) and one induction head (1.1); the script prints each head's output norm and
attention scores so that a retrained model's roles can be read off.

Everything is seeded: a run on the same software reproduces the shipped files (about a
minute on one CPU core)::

    python tools/train_induction.py            # writes auto_circuit/models/induction/
    python tools/train_induction.py --out DIR  # writes elsewhere

Axis names: ``batch`` sequences, ``pos`` token positions (BOS included), ``head`` heads.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch as t
from jaxtyping import Bool, Float, Int
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from auto_circuit.families.induction import (
    BOS_TOKEN_ID,
    CONFIG_FILE,
    DATASET_FILE,
    N_TOKENS,
    WEIGHTS_FILE,
)

N_CTX = 24
MODEL_CONFIG: dict[str, Any] = {
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "n_ctx": N_CTX,
    "d_vocab": N_TOKENS + 1,
    "attn_only": True,
    "d_mlp": None,
    "act_fn": None,
    "normalization_type": None,
    "positional_embedding_type": "standard",
}
"""``HookedTransformerConfig`` arguments of the shipped model."""

SEGMENT_LENGTHS = (3, 11)
"""Inclusive range of the repeated segment's length in training sequences."""
PENALTY_START = 0.3
"""Fraction of training after which the head penalty ramps up (full strength at 2x)."""

PROMPT_SEGMENT = 8
"""Dataset prompts: BOS, ``PROMPT_SEGMENT`` distinct tokens, then their first
``PROMPT_REPEAT`` tokens again; the answer is the segment's next token."""
PROMPT_REPEAT = 5
PROMPT_LEN = 1 + PROMPT_SEGMENT + PROMPT_REPEAT
WORD_IDXS = {
    "first_occurrence": PROMPT_REPEAT,
    "answer_source": PROMPT_REPEAT + 1,
    "end": PROMPT_LEN - 1,
}
"""Prompt indices (BOS at 0): the first copy of the last token, the token after it (the
answer, which induction copies) and the last position."""

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "auto_circuit" / "models" / "induction"


def training_batch(
    gen: t.Generator, batch_size: int, n_ctx: int = N_CTX
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Random induction sequences and the positions whose next token is predictable.

    Each row is BOS + ``n_ctx - 1`` distinct random tokens in which the segment
    ``[p, p + L)`` is copied to ``[q, q + L)`` (truncated at the end), with ``L`` in
    ``SEGMENT_LENGTHS``, ``p >= 1`` and ``q >= p + L``. ``mask[b, j]`` is True where
    tokens ``j`` and ``j + 1`` are both in the copy, so induction predicts token ``j + 1``.

    Returns:
        ``(tokens, mask)``; the mask's last column is always False.
    """
    tokens = t.rand(batch_size, N_TOKENS, generator=gen).argsort(dim=-1)[:, : n_ctx - 1]
    tokens = t.cat([t.full((batch_size, 1), BOS_TOKEN_ID), tokens], dim=1)
    mask = t.zeros(batch_size, n_ctx, dtype=t.bool)
    lo, hi = SEGMENT_LENGTHS
    for row in range(batch_size):
        length = int(t.randint(lo, hi + 1, (1,), generator=gen))
        # The copy starts early enough to hold at least two tokens.
        p = int(t.randint(1, n_ctx - length - 1, (1,), generator=gen))
        q = int(t.randint(p + length, n_ctx - 1, (1,), generator=gen))
        copied = min(length, n_ctx - q)
        tokens[row, q : q + copied] = tokens[row, p : p + copied]
        mask[row, q : q + copied - 1] = True
    return tokens, mask


def induction_prompts(seed: int, n_prompts: int) -> list[dict[str, list[int]]]:
    """The dataset: prompt pairs in auto_circuit's JSON format (token ids, BOS included).

    Clean: ``BOS s1 .. s8 s1 .. s5`` with distinct tokens; the answer is ``s6``.
    Corrupt: the first ``s5`` and ``s6`` are replaced by fresh tokens ``x`` and ``y``, so
    the last token has no earlier copy to induct from; the wrong answer is ``y`` (what
    the induction head would copy from ``answer_source`` if it read the corrupt value).
    Clean and corrupt differ only at ``first_occurrence`` and ``answer_source``.
    """
    gen = t.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n_prompts):
        perm = t.randperm(N_TOKENS, generator=gen).tolist()
        segment, (x, y) = perm[:PROMPT_SEGMENT], perm[PROMPT_SEGMENT : PROMPT_SEGMENT + 2]
        clean = [BOS_TOKEN_ID, *segment, *segment[:PROMPT_REPEAT]]
        corrupt = list(clean)
        corrupt[WORD_IDXS["first_occurrence"]] = x
        corrupt[WORD_IDXS["answer_source"]] = y
        prompts.append(
            {
                "clean": clean,
                "corrupt": corrupt,
                "answers": [segment[PROMPT_REPEAT]],
                "wrong_answers": [y],
            }
        )
    return prompts


def dataset_json(seed: int, n_prompts: int) -> dict[str, Any]:
    """The dataset file's content (``word_idxs`` index the prompts, BOS at 0)."""
    labels = ["BOS", *(f"s{i}" for i in range(1, PROMPT_SEGMENT + 1))]
    labels += [f"s{i}'" for i in range(1, PROMPT_REPEAT + 1)]
    return {
        "seq_labels": labels,
        "word_idxs": dict(WORD_IDXS),
        "prompts": induction_prompts(seed, n_prompts),
    }


def head_norm_penalty(model: HookedTransformer) -> Tensor:
    """``sum over heads of sqrt(||W_O[head]||_F)``: a concave, sparsity-seeking penalty.

    A head's output scales with its ``W_O``. With the square root, one head doing a job
    costs less than several redundant heads sharing it, so the heads compete and those
    the task does not need are switched off.
    """
    norms = t.cat([block.attn.W_O.flatten(1).norm(dim=-1) for block in model.blocks])
    return (norms + 1e-6).sqrt().sum()


def train(
    seed: int, steps: int, batch_size: int, lr: float, head_penalty: float
) -> tuple[HookedTransformer, dict[str, float]]:
    """Train with AdamW on fresh random batches; returns the model and final stats."""
    t.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
        model = HookedTransformer(HookedTransformerConfig(**MODEL_CONFIG, seed=seed))
    gen = t.Generator().manual_seed(seed + 1)
    opt = t.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = t.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss = acc = t.tensor(0.0)
    for step in range(steps):
        tokens, mask = training_batch(gen, batch_size)
        logits = model(tokens)[:, :-1]
        targets, keep = tokens[:, 1:], mask[:, :-1]
        loss = t.nn.functional.cross_entropy(logits[keep], targets[keep])
        # Training first sits on a loss plateau until the circuit forms; a penalty there
        # would switch every head off for good, so it ramps up only afterwards.
        ramp = min(1.0, max(0.0, (step / steps - PENALTY_START) / PENALTY_START))
        opt.zero_grad()
        (loss + ramp * head_penalty * head_norm_penalty(model)).backward()
        opt.step()
        sched.step()
        acc = (logits[keep].argmax(-1) == targets[keep]).float().mean()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  accuracy {acc.item():.3f}", flush=True)
    model.eval()
    model.requires_grad_(False)
    return model, {"final_loss": loss.item(), "final_train_accuracy": acc.item()}


def head_scores(
    model: HookedTransformer, seed: int, n_seqs: int = 100, length: int = 10
) -> dict[str, Float[Tensor, "layer head"]]:
    """Each head's output norm, previous-token score and induction score.

    On ``BOS + r + r`` (``r``: ``length`` distinct random tokens) the previous-token
    score is the mean attention from each position to the one before it; the induction
    score is the mean attention from each token of the second ``r`` to the token after
    its first copy.
    """
    gen = t.Generator().manual_seed(seed)
    r = t.rand(n_seqs, N_TOKENS, generator=gen).argsort(dim=-1)[:, :length]
    tokens = t.cat([t.full((n_seqs, 1), BOS_TOKEN_ID), r, r], dim=1)
    _, cache = model.run_with_cache(tokens)
    q_prev = t.arange(2, tokens.shape[1])
    q_ind = t.arange(length + 1, tokens.shape[1])
    prev, ind = [], []
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # batch head query key
        prev.append(pattern[:, :, q_prev, q_prev - 1].mean(dim=(0, 2)))
        ind.append(pattern[:, :, q_ind, q_ind - length + 1].mean(dim=(0, 2)))
    norms = t.stack([block.attn.W_O.flatten(1).norm(dim=-1) for block in model.blocks])
    return {"w_o_norm": norms, "previous_token": t.stack(prev), "induction": t.stack(ind)}


def dataset_stats(model: HookedTransformer, dataset: dict[str, Any]) -> dict[str, float]:
    """Accuracy and mean logit difference (answer - wrong answer) on clean and corrupt."""
    prompts = dataset["prompts"]
    answers = t.tensor([p["answers"][0] for p in prompts])
    wrong = t.tensor([p["wrong_answers"][0] for p in prompts])
    rows = t.arange(len(prompts))
    stats = {}
    for kind in ("clean", "corrupt"):
        logits = model(t.tensor([p[kind] for p in prompts]))[:, -1]
        diff = logits[rows, answers] - logits[rows, wrong]
        stats[f"{kind}_logit_diff"] = diff.mean().item()
        stats[f"{kind}_accuracy"] = (logits.argmax(-1) == answers).float().mean().item()
    return stats


def save(model: HookedTransformer, out: Path, meta: dict[str, Any], dataset: dict) -> None:
    """Write the weights (parameters only), the config and the dataset (a prompt a line)."""
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    (out / WEIGHTS_FILE).write_bytes(safetensors_bytes(weights))
    config = {"model": MODEL_CONFIG, "bos_token_id": BOS_TOKEN_ID, "n_tokens": N_TOKENS, **meta}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    rows = ",\n".join(json.dumps(p, separators=(",", ":")) for p in dataset["prompts"])
    head = json.dumps({k: v for k, v in dataset.items() if k != "prompts"})
    (out / DATASET_FILE).write_text(head[:-1] + ',\n"prompts": [\n' + rows + "\n]}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--head-penalty", type=float, default=0.1)
    parser.add_argument("--n-prompts", type=int, default=200)
    args = parser.parse_args()
    # One thread: the model is tiny, and on a busy machine extra threads spend their time
    # waiting for each other (two threads were ~50x slower than one on a shared 2-core box).
    t.set_num_threads(1)
    start = time.perf_counter()
    model, stats = train(args.seed, args.steps, args.batch_size, args.lr, args.head_penalty)
    seconds = time.perf_counter() - start
    print(f"trained in {seconds:.0f} s")
    dataset = dataset_json(args.seed, args.n_prompts)
    with t.no_grad():
        stats |= dataset_stats(model, dataset)
        scores = head_scores(model, args.seed + 2)
    for name, values in scores.items():
        print(
            f"{name:>15}: " + " | ".join(" ".join(f"{v:5.2f}" for v in layer) for layer in values)
        )
    print(", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    meta = {
        "training": {
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "head_penalty": args.head_penalty,
            "segment_lengths": list(SEGMENT_LENGTHS),
            "torch_version": t.__version__,
        },
        "stats": {k: round(v, 4) for k, v in stats.items()},
        "head_scores": {
            k: [[round(x, 3) for x in row] for row in v.tolist()] for k, v in scores.items()
        },
    }
    save(model, args.out, meta, dataset)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
