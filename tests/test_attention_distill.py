"""LinearAttention module, Eq. 3 distillation loss, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from hedgehog_attention import (
    LinearAttention,
    attention_distillation_loss,
    attention_fidelity,
    attention_output_mse,
    fit_attention_to_softmax,
    linear_attention_weights,
    softmax_attention_weights,
)
from hedgehog_attention.metrics import attention_entropy, monotonicity
from hedgehog_attention.ops import visibility_mask

try:  # imported here, not inside the test: the first import of these modules takes seconds
    from transformers import LlamaConfig, LlamaForCausalLM

    import hedgehog_attention.train  # noqa: F401  (distill's Trainer)
    from hedgehog_attention.convert import DistillConfig, linearize
    from hedgehog_attention.convert.distill import distill, evaluate_fidelity
except ImportError:  # pragma: no cover
    LlamaConfig = LlamaForCausalLM = None


def eq3_direct(q, k, fq, fk, causal, mask=None):
    """Independent loop-based Eq. 3: per (b, h, i), -sum_j p_ij log w_ij over visible j; mean."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    total, count = 0.0, 0
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                if mask is not None and not mask[bi, i]:
                    continue
                js = [j for j in range(t) if (not causal or j <= i) and (mask is None or mask[bi, j])]
                if not js:
                    continue
                s = torch.stack([q[bi, i, hi] @ k[bi, j, hi // g] / math.sqrt(d) for j in js])
                p = torch.softmax(s, 0)
                a = torch.stack([fq[bi, i, hi] @ fk[bi, j, hi // g] for j in js])
                w = a / a.sum()
                total = total - (p * torch.log(w)).sum()
                count += 1
    return total / count


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [3, 256])
def test_distillation_loss_equals_direct_eq3(causal, chunk):
    q = torch.randn(2, 9, 4, 5, dtype=torch.float64)
    k = torch.randn(2, 9, 2, 5, dtype=torch.float64)
    att = LinearAttention(4, 5, num_kv_heads=2, causal=causal).double()
    fq, fk = att.features(q, k)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    got = attention_distillation_loss(q, k, fq, fk, causal=causal, attention_mask=mask, query_chunk_size=chunk)
    torch.testing.assert_close(got, eq3_direct(q, k, fq, fk, causal, mask))


@pytest.mark.parametrize("causal", [True, False])
def test_unpadded_loss_and_gradients_equal_direct_eq3(causal):
    """Without a mask the loss uses a [1, T, T] mask broadcast over the batch and skips the NaN
    guard of key-less queries: value and map gradients still equal the loop formula (float64; odd
    T, GQA, several checkpointed chunks), and an all-ones mask gives the same loss."""
    torch.manual_seed(3)
    q = torch.randn(3, 11, 4, 5, dtype=torch.float64)
    k = torch.randn(3, 11, 2, 5, dtype=torch.float64)
    att = LinearAttention(4, 5, num_kv_heads=2, causal=causal).double()
    grads = []
    for fn in ("chunked", "direct"):
        att.zero_grad()
        fq, fk = att.features(q, k)
        if fn == "chunked":
            loss = attention_distillation_loss(q, k, fq, fk, causal=causal, query_chunk_size=4)
            ones = attention_distillation_loss(
                q, k, fq, fk, causal=causal, attention_mask=torch.ones(3, 11, dtype=torch.bool), query_chunk_size=4
            )
            torch.testing.assert_close(loss, ones, rtol=1e-14, atol=0)
        else:
            loss = eq3_direct(q, k, fq, fk, causal)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in att.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_loss_with_low_precision_teacher_matches_float64():
    """bf16 teacher q, k (as captured from a bf16 model) are cast once to float32 inside the loss:
    same value as casting them up front in float64, to float32 accuracy."""
    torch.manual_seed(4)
    q = torch.randn(2, 13, 2, 8).to(torch.bfloat16)
    k = torch.randn(2, 13, 2, 8).to(torch.bfloat16)
    att = LinearAttention(2, 8, causal=True)
    fq, fk = att.features(q.float(), k.float())
    got = attention_distillation_loss(q, k, fq, fk, causal=True, query_chunk_size=5)
    want = attention_distillation_loss(q.double(), k.double(), fq.double(), fk.double(), causal=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_chunked_loss_gradients_match_unchunked():
    q, k = torch.randn(2, 2, 40, 2, 8, dtype=torch.float64).unbind(0)
    att = LinearAttention(2, 8, causal=True).double()
    grads = []
    for chunk in (7, 1000):  # 7 -> checkpointed chunks, 1000 -> single chunk
        att.zero_grad()
        fq, fk = att.features(q, k)
        attention_distillation_loss(q, k, fq, fk, causal=True, query_chunk_size=chunk).backward()
        grads.append([p.grad.clone() for p in att.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_distillation_beats_elu_and_lowers_kl():
    """A few hundred Adam steps on random q,k lower Eq. 3 and the KL; Hedgehog ends closer than 1+ELU."""
    torch.manual_seed(1)
    from hedgehog_attention.demo import make_synthetic_qk

    h, d, t = 2, 16, 64
    data = make_synthetic_qk(21, 4, t, h, d, seed=1)
    train, (held_q, held_k) = data[:-1], data[-1]
    hh = LinearAttention(h, d, feature_map="hedgehog", causal=True)
    before = attention_fidelity(held_q, held_k, *hh.features(held_q, held_k), causal=True)
    hist = fit_attention_to_softmax(hh, train, steps=300, lr=1e-2, eval_qk=(held_q, held_k), eval_every=100)
    after = attention_fidelity(held_q, held_k, *hh.features(held_q, held_k), causal=True)
    elu = LinearAttention(h, d, feature_map="elu", causal=True)
    elu_fid = attention_fidelity(held_q, held_k, *elu.features(held_q, held_k), causal=True)
    assert hist.eval_loss[-1] < hist.eval_loss[0] - 0.1
    assert after["kl"].mean() < before["kl"].mean() - 0.1
    assert after["kl"].mean() < elu_fid["kl"].mean()
    assert after["entropy_linear"].mean() < before["entropy_linear"].mean()


def test_linear_attention_module_decode_equals_full_forward_gqa():
    att = LinearAttention(6, 8, num_kv_heads=2, feature_map="hedgehog", causal=True).double()
    q = torch.randn(2, 30, 6, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 30, 2, 8, dtype=torch.float64).unbind(0)
    full = att(q, k, v).o
    out = att(q[:, :20], k[:, :20], v[:, :20], use_cache=True)
    outs, state = [out.o], out.state
    for t in range(20, 30):
        step = att(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state=state, use_cache=True)
        outs.append(step.o)
        state = step.state
    torch.testing.assert_close(torch.cat(outs, 1), full)
    assert state.S.shape == (2, 2, 16, 8)  # per KV head: K/V never repeated


def test_module_weights_match_reference_and_gradients_reach_map_parameters():
    att = LinearAttention(2, 4, feature_map="hedgehog", causal=False).double()
    q, k, v = torch.randn(3, 1, 10, 2, 4, dtype=torch.float64).unbind(0)
    out = att(q, k, v, output_attentions=True)
    fq, fk = att.features(q, k)
    torch.testing.assert_close(out.weights, linear_attention_weights(fq, fk, causal=False))
    out.o.square().sum().backward()
    assert att.feature_map_q.weight.grad.abs().sum() > 0 and att.feature_map_k.bias.grad.abs().sum() > 0


def test_module_chunked_and_reference_backends_agree_with_map_gradients():
    torch.manual_seed(3)
    grads = {}
    for backend in ("reference", "chunked", "recurrent"):
        torch.manual_seed(3)
        att = LinearAttention(4, 8, num_kv_heads=2, feature_map="hedgehog", causal=True, backend=backend).double()
        with torch.no_grad():
            for p in att.parameters():
                p.add_(0.1 * torch.randn_like(p))
        torch.manual_seed(4)
        q = torch.randn(2, 37, 4, 8, dtype=torch.float64)
        k, v = torch.randn(2, 2, 37, 2, 8, dtype=torch.float64).unbind(0)
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[0, :5] = False
        att(q, k, v, attention_mask=mask).o.sin().sum().backward()
        grads[backend] = [p.grad for p in att.parameters()]
    for backend in ("chunked", "recurrent"):
        for a, b in zip(grads[backend], grads["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_performer_gqa_query_heads_share_their_kv_heads_projection():
    att = LinearAttention(4, 8, num_kv_heads=2, feature_map="performer")
    x = torch.randn(1, 3, 1, 8)  # the same vector as a query of every head and a key of every KV head
    fq, fk = att.features(x.expand(1, 3, 4, 8), x.expand(1, 3, 2, 8))  # [1, 3, 4, m], [1, 3, 2, m]
    for h in range(4):
        assert torch.equal(fq[:, :, h], fk[:, :, h // 2]), f"query head {h}"
    assert not torch.equal(fq[:, :, 0], fq[:, :, 2])  # the two KV heads draw their own features


@pytest.mark.parametrize("num_kv_heads", [2, 1])
@pytest.mark.parametrize("redraw_every", [1, 2, 3])
def test_performer_redraws_keep_queries_and_keys_on_the_same_features(redraw_every, num_kv_heads):
    """A redraw between the query and the key call of one forward would pair different random
    features (phi(q).phi(k) no longer estimates exp(q.k)): redraws are counted once per q/k pair."""
    att = LinearAttention(2, 4, num_kv_heads=num_kv_heads, feature_map="performer",
                          feature_map_kwargs={"redraw_every": redraw_every}).train()  # fmt: skip
    x = torch.randn(1, 2, 1, 4)
    draws = []
    for _ in range(7):
        fq, fk = att.features(x.expand(1, 2, 2, 4), x.expand(1, 2, num_kv_heads, 4))
        torch.testing.assert_close(fq[:, :, 0], fk[:, :, 0], rtol=0, atol=0)
        draws.append(fq[:, :, 0])
    changed = [not torch.equal(a, b) for a, b in zip(draws, draws[1:])]
    assert changed == [(i + 1) % redraw_every == 0 for i in range(6)]  # one redraw every redraw_every pairs


def test_performer_loads_state_dicts_that_stored_the_key_projection():
    """Before the key map read the query map's projection, state dicts held a copy under
    ``feature_map_k.projection``: they still load (strict), and the query map's copy is used."""
    att = LinearAttention(4, 8, num_kv_heads=2, feature_map="performer", feature_map_kwargs={"seed": 0})
    sd = att.state_dict()
    assert "feature_map_k.projection" not in sd
    old = {**sd, "feature_map_k.projection": torch.zeros(2, 8, 8)}
    fresh = LinearAttention(4, 8, num_kv_heads=2, feature_map="performer", feature_map_kwargs={"seed": 1})
    fresh.load_state_dict(old)
    x = torch.randn(1, 3, 4, 8)
    torch.testing.assert_close(fresh.features(x, x[:, :, :2]), att.features(x, x[:, :, :2]), rtol=0, atol=0)


def test_tie_qk_shares_parameters_and_rejects_gqa():
    att = LinearAttention(2, 4, tie_qk=True)
    assert att.feature_map_q is att.feature_map_k
    with pytest.raises(ValueError, match="num_kv_heads"):
        LinearAttention(4, 4, num_kv_heads=2, tie_qk=True)


def test_entropy_and_monotonicity_known_values():
    t = 6
    uniform = torch.full((1, 1, t, t), 1.0 / t)
    torch.testing.assert_close(attention_entropy(uniform), torch.tensor([math.log(t)], dtype=torch.float64))
    onehot = torch.eye(t).view(1, 1, t, t)
    assert attention_entropy(onehot).item() == pytest.approx(0.0, abs=1e-9)
    dots = torch.randn(1, 1, t, t)
    vis = visibility_mask(1, t, causal=False)
    assert monotonicity(dots, torch.softmax(dots, -1), vis).item() == pytest.approx(1.0)
    assert monotonicity(dots, torch.softmax(-dots, -1), vis).item() == pytest.approx(-1.0)


def test_softmax_weights_are_their_own_best_fit():
    """phi(q_i) = exp(s_i.) and one-hot phi(k_j) = e_j give phi(q_i).phi(k_j) = exp(q_i.k_j / sqrt(D)), i.e.
    linear weights == softmax: KL 0, CE = entropy, monotonicity 1. Random features: KL = sum p log(p / w)."""
    t, d = 12, 4
    q, k = torch.randn(2, 1, t, 2, d, dtype=torch.float64).unbind(0)  # [B, T, H, D]
    s = torch.einsum("bihd,bjhd->bihj", q, k) / math.sqrt(d)  # [B, T, H, T]
    fk = torch.eye(t, dtype=torch.float64).view(1, t, 1, t).expand(1, t, 2, t)  # [B, T, H, F = T]
    fid = attention_fidelity(q, k, s.exp(), fk, causal=True)
    torch.testing.assert_close(fid["kl"], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(fid["ce"], fid["entropy_softmax"])
    torch.testing.assert_close(fid["entropy_linear"], fid["entropy_softmax"])
    for key in ("monotonicity_softmax", "monotonicity_linear"):
        torch.testing.assert_close(fid[key], torch.ones(2, dtype=torch.float64))
    fq, fk = torch.rand(2, 1, t, 2, 6, dtype=torch.float64).unbind(0)  # [B, T, H, F]
    p = softmax_attention_weights(q, k, causal=True)  # [B, H, T, T]
    w = linear_attention_weights(fq, fk, causal=True, eps=0.0)
    kl = torch.where(p > 0, p * (p / w).log(), 0.0).sum(-1).mean((0, 2))  # [H], every query row valid
    assert (kl > 0.01).all()
    torch.testing.assert_close(attention_fidelity(q, k, fq, fk, causal=True)["kl"], kl)


def test_output_mse_masks_padding():
    a, b = torch.zeros(1, 4, 1, 2), torch.ones(1, 4, 1, 2)
    mask = torch.tensor([[1, 1, 0, 0]])
    b2 = b.clone()
    b2[:, 2:] = 100
    assert attention_output_mse(a, b2, mask).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        attention_output_mse(a, b[:, :3])


def test_distillation_loss_rejects_mismatched_shapes():
    q = torch.randn(1, 5, 2, 4)
    att = LinearAttention(2, 4)
    fq, fk = att.features(q, q)
    with pytest.raises(ValueError, match="matching B,T,H"):
        attention_distillation_loss(q, q[:, :4], fq, fk, causal=True)


def test_monotonicity_averages_the_ranks_of_tied_weights():
    """Spearman's rho ranks tied values by their mean rank: weights [0, 0, 1, 1] over increasing q.k
    give 2/sqrt(5) whatever the key order, and uniform weights (all tied) carry no rank information."""
    vis = visibility_mask(1, 4, causal=False)
    dots = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 4, 4)
    steps = torch.tensor([0.0, 0.0, 0.5, 0.5]).expand(1, 1, 4, 4)
    rho = 2 / math.sqrt(5)  # ranks [0, 1, 2, 3] vs [0.5, 0.5, 2.5, 2.5]
    assert monotonicity(dots, steps, vis).item() == pytest.approx(rho)
    assert monotonicity(dots.flip(-1), steps.flip(-1), vis).item() == pytest.approx(rho)
    torch.manual_seed(0)
    dots = torch.randn(2, 3, 9, 9)
    vis = visibility_mask(2, 9, causal=True)
    uniform = vis[:, None].double().expand(2, 3, 9, 9)
    uniform = uniform / uniform.sum(-1, keepdim=True)
    torch.testing.assert_close(monotonicity(dots, uniform, vis), torch.zeros(3, dtype=torch.float64))


@pytest.mark.skipif(LlamaForCausalLM is None, reason="needs transformers")
@pytest.mark.parametrize("capture", ["cached", "online"])
def test_converted_distill_best_eval_loss_is_the_trainers_held_out_loss(capture):
    """The held-out loss is a mean over held-out sequences: eval batches of 4 and 1 sequences give
    the final (kept-maps) ``best_eval_loss`` and ``evaluate_fidelity``'s ce the value the Trainer
    reported at ``best_step`` (the one-row batch is not weighted like the four-row one)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=32, tie_word_embeddings=True,
    )  # fmt: skip
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)  # peaky teacher attention
    linearize(m)
    gen = torch.Generator().manual_seed(1)

    def batch(b):
        return {"input_ids": torch.randint(1, 61, (b, 10), generator=gen), "attention_mask": torch.ones(b, 10)}

    train, held = [batch(4), batch(4)], [batch(4), batch(1)]
    res = distill(m, train, held, DistillConfig(steps=2, eval_every=1, patience=0, capture=capture), progress=False)
    best = res.eval_loss[res.eval_steps.index(res.best_step)]
    assert res.best_eval_loss == pytest.approx(best, rel=1e-5)
    fid = evaluate_fidelity(m, held)
    assert sum(v["ce"] for v in fid.values()) == pytest.approx(best, rel=1e-5)


def test_fidelity_uniform_entropy_counts_the_keys_each_query_sees():
    """Uniform weights over the visible keys: log T bidirectional, mean log(i) causal, fewer keys and
    no padded rows with padding."""
    q, k = torch.randn(2, 4, 2, 8, dtype=torch.float64), torch.randn(2, 4, 2, 8, dtype=torch.float64)
    fid = lambda **kw: attention_fidelity(q, k, q.exp(), k.exp(), **kw)["uniform_entropy"]  # noqa: E731
    torch.testing.assert_close(fid(causal=False), torch.full((2,), math.log(4), dtype=torch.float64))
    causal = sum(math.log(i) for i in range(1, 5)) / 4
    torch.testing.assert_close(fid(causal=True), torch.full((2,), causal, dtype=torch.float64))
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)  # row 1: 2 queries see 2 keys
    padded = (4 * math.log(4) + 2 * math.log(2)) / 6
    torch.testing.assert_close(fid(causal=False, attention_mask=mask), torch.full((2,), padded, dtype=torch.float64))


def test_global_batch_errors_name_the_cause():
    from hedgehog_attention.convert.distill import global_batch

    assert global_batch(8, 30, 2) == (8, 4) and global_batch(64, 30, 4) == (28, 7)  # clamped to the data
    with pytest.raises(ValueError, match="batch_size=2 is smaller than the 4 processes"):
        global_batch(2, 32, 4)
    with pytest.raises(ValueError, match="3 training sequence"):
        global_batch(8, 3, 4)
    with pytest.raises(ValueError, match="not divisible"):
        global_batch(6, 32, 4)


def test_decode_step_rejects_a_mask_that_is_not_the_new_tokens():
    """The one-token decode path read attention_mask[:, 0]: a [B, past + 1] mask (as HF passes) took
    the first token's bit, and a left-padded row came back all zeros. It now checks as the full path."""
    att = LinearAttention(2, 4, feature_map="hedgehog", causal=True).double()
    q, k, v = torch.randn(3, 2, 6, 2, 4, dtype=torch.float64).unbind(0)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    full = att(q, k, v, attention_mask=mask).o
    state = att(q[:, :5], k[:, :5], v[:, :5], attention_mask=mask[:, :5], use_cache=True).state
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \(2, 1\)"):
        att(q[:, 5:], k[:, 5:], v[:, 5:], attention_mask=mask, state=state)
    step = att(q[:, 5:], k[:, 5:], v[:, 5:], attention_mask=mask[:, 5:], state=state)
    torch.testing.assert_close(step.o, full[:, 5:], rtol=1e-12, atol=1e-12)


def test_cosformer_decode_after_a_state_needs_positions():
    """cosFormer's re-weighting depends on the absolute position: without positions a decode step
    after a state restarted at position 0 (silently off by ~5e-2 here); now it must be told, and
    with positions it equals the full forward."""
    att = LinearAttention(1, 4, feature_map="cosformer", feature_map_kwargs={"max_length": 8}, causal=True).double()
    q, k, v = torch.randn(3, 2, 6, 1, 4, dtype=torch.float64).unbind(0)
    full = att(q, k, v).o
    state = att(q[:, :5], k[:, :5], v[:, :5], use_cache=True).state
    with pytest.raises(ValueError, match="positions"):
        att(q[:, 5:], k[:, 5:], v[:, 5:], state=state)
    with pytest.raises(ValueError, match="positions"):  # several tokens after a state: same rule
        att(q[:, 3:], k[:, 3:], v[:, 3:], state=att(q[:, :3], k[:, :3], v[:, :3], use_cache=True).state)
    step = att(q[:, 5:], k[:, 5:], v[:, 5:], state=state, positions=torch.full((2, 1), 5))
    torch.testing.assert_close(step.o, full[:, 5:], rtol=1e-12, atol=1e-12)


def test_distillation_loss_counts_a_query_without_linear_weights_as_zero_weights():
    """Query 0 (causal) sees only key 0 and phi(q_0).phi(k_0) = 0 (ReLU-type maps): its linear
    weights are 0, CE -log(eps) as in attention_fidelity's ``ce``, not log(eps) - log(eps) = 0."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 3, 1, 2, dtype=torch.float64).unbind(0)
    fq = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0]], dtype=torch.float64).view(1, 3, 1, 2)
    fk = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(1, 3, 1, 2)
    got = attention_distillation_loss(q, k, fq, fk, causal=True, eps=1e-12)
    p = softmax_attention_weights(q, k, causal=True)[0, 0]  # [T, T]
    w = torch.tensor([[0.0, 0.0, 0.0], [0.75, 0.25, 0.0], [0.5, 1 / 3, 1 / 6]], dtype=torch.float64)
    want = (-math.log(1e-12) - (p[1, :2] * w[1, :2].log()).sum() - (p[2] * w[2].log()).sum()) / 3
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, attention_fidelity(q, k, fq, fk, causal=True)["ce"][0], rtol=1e-12, atol=0)


def test_perplexity_of_a_huge_loss_is_inf_not_an_overflow_error():
    """Reports take exp(mean NLL): a diverged model's loss past ~709.78 gives inf (math.exp raises)."""
    import math

    from hedgehog_attention.metrics import perplexity

    assert perplexity(0.0) == 1.0 and perplexity(math.log(7.5)) == pytest.approx(7.5, rel=1e-15)
    assert perplexity(709.0) == math.exp(709.0) and perplexity(710.0) == math.inf == perplexity(1e9)
    assert math.isnan(perplexity(float("nan")))
