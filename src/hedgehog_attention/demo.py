"""``hedgehog demo``: train a Hedgehog map to mimic softmax on synthetic q/k; no downloads, ~10 s on 2 CPU cores.

Queries and keys come from one random token stream through two related projections (as in a real
attention layer, where q and k are correlated): ``q = x W_q``, ``k = x W_k``. The demo prints the
Eq. 3 loss falling on held-out sequences, then entropy / monotonicity / KL before and after, next to
the fixed 1+ELU map and a distilled T2R map ("T2R-HH").
"""

from __future__ import annotations

import argparse
import time

import torch

from .attention import LinearAttention
from .distill import fit_attention_to_softmax
from .metrics import attention_fidelity


def make_synthetic_qk(
    num_batches: int,
    batch_size: int,
    seq_len: int,
    num_heads: int,
    head_dim: int,
    *,
    scale: float = 0.35,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` pairs ``(q, k)`` of shape ``[B, T, H, D]`` with per-head correlated projections."""
    g = torch.Generator().manual_seed(seed)
    wq = scale * torch.randn(num_heads, head_dim, head_dim, generator=g)
    wk = wq + 0.5 * scale * torch.randn(num_heads, head_dim, head_dim, generator=g)
    out = []
    for _ in range(num_batches):
        x = torch.randn(batch_size, seq_len, head_dim, generator=g)
        out.append((torch.einsum("btd,hde->bthe", x, wq), torch.einsum("btd,hde->bthe", x, wk)))
    return out


def _summary(att: LinearAttention, q: torch.Tensor, k: torch.Tensor) -> dict[str, float]:
    fid = attention_fidelity(q, k, *att.features(q, k), causal=att.causal)
    return {key: float(val.mean()) for key, val in fid.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hedgehog demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps (App. C.2: lr 1e-2, wd 0)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    shape = dict(batch_size=4, seq_len=args.seq_len, num_heads=args.heads, head_dim=args.head_dim)
    data = make_synthetic_qk(33, **shape, seed=args.seed)
    train, (held_q, held_k) = data[:-1], data[-1]
    print(f"hedgehog demo: H={args.heads} D={args.head_dim} T={args.seq_len}, {len(train)} training batches")

    rows = {}
    hh = LinearAttention(args.heads, args.head_dim, feature_map="hedgehog", causal=True)
    rows["hedgehog (identity init, untrained)"] = _summary(hh, held_q, held_k)
    t0 = time.time()

    def log(step, hist):
        print(f"  step {step:4d}  train Eq.3 {hist.train_loss[-1]:.4f}  held-out Eq.3 {hist.eval_loss[-1]:.4f}")

    print(f"distilling Hedgehog (Eq. 3, AdamW lr={args.lr:.0e}):")
    fit_attention_to_softmax(
        hh, train, steps=args.steps, lr=args.lr, eval_qk=(held_q, held_k), eval_every=50, callback=log
    )
    rows["hedgehog (distilled)"] = _summary(hh, held_q, held_k)
    t2r = LinearAttention(args.heads, args.head_dim, feature_map="t2r", causal=True)
    fit_attention_to_softmax(t2r, train, steps=args.steps, lr=args.lr)
    rows["t2r-hh (distilled)"] = _summary(t2r, held_q, held_k)
    rows["1+elu"] = _summary(LinearAttention(args.heads, args.head_dim, feature_map="elu", causal=True), held_q, held_k)
    soft = rows["hedgehog (distilled)"]
    print(f"done in {time.time() - t0:.1f} s. Held-out attention fidelity (mean over heads):")
    header = f"{'method':38s} {'CE':>7s} {'KL':>7s} {'entropy':>8s} {'monot.':>7s}"
    print(header + "\n" + "-" * len(header))
    print(f"{'softmax (teacher)':38s} {'':>7s} {0.0:7.3f} {soft['entropy_softmax']:8.3f} {1.0:7.3f}")
    for name, r in rows.items():
        print(f"{name:38s} {r['ce']:7.3f} {r['kl']:7.3f} {r['entropy_linear']:8.3f} {r['monotonicity_linear']:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
