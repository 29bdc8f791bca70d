"""The reference ladder: quadratic == recurrent == chunked, outputs, states and gradients in float64."""

from __future__ import annotations

import pytest
import torch

from hedgehog_attention.ops import (
    LinearAttentionState,
    linear_attention,
    linear_attention_weights,
    softmax_attention_reference,
    softmax_attention_weights,
)

FAST_BACKENDS = ("chunked", "recurrent")


def make_inputs(b, t, h, hk, f, dv, dtype=torch.float64, requires_grad=True):
    fq = torch.rand(b, t, h, f, dtype=dtype)
    fk = torch.rand(b, t, hk, f, dtype=dtype)
    v = torch.randn(b, t, hk, dv, dtype=dtype)
    for x in (fq, fk, v):
        x.requires_grad_(requires_grad)
    return fq, fk, v


def padding_mask(b, t, kind):
    """[B, T] with n_i = (3i + 1) or (5i + 2) padded tokens mod T + 1: every case pads some row, T = 1
    pads a whole sequence, B = 2 gives two different lengths."""
    m = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        if kind == "left":
            m[i, : (3 * i + 1) % (t + 1)] = False
        elif kind == "right":
            m[i, t - (5 * i + 2) % (t + 1) :] = False
    return m


def grads(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True)


CASES = [
    # (B, T, H, Hk, F, Dv)
    (2, 1, 2, 2, 16, 16),
    (2, 7, 3, 3, 16, 16),
    (1, 63, 4, 2, 60, 60),
    (2, 97, 4, 1, 64, 16),
]


def case_id(c):
    return "B{}-T{}-H{}-Hk{}-F{}-D{}".format(*c)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("mask_kind", ["none", "left", "right"])
@pytest.mark.parametrize("shape", CASES, ids=case_id)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_matches_reference(backend, shape, mask_kind, causal):
    b, t, h, hk, f, dv = shape
    fq, fk, v = make_inputs(b, t, h, hk, f, dv)
    mask = None if mask_kind == "none" else padding_mask(b, t, mask_kind)
    s0 = (torch.rand(b, hk, f, dv, dtype=torch.float64), torch.rand(b, hk, f, dtype=torch.float64))
    kw = dict(causal=causal, attention_mask=mask, initial_state=s0, output_final_state=True)
    o_ref, st_ref = linear_attention(fq, fk, v, backend="reference", **kw)
    o, st = linear_attention(fq, fk, v, backend=backend, **kw)
    assert o.dtype == v.dtype and o.shape == (b, t, h, dv)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st.S, st_ref.S, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st.z, st_ref.z, rtol=1e-10, atol=1e-10)
    up = torch.randn_like(o)
    g_ref = grads(o_ref, (fq, fk, v), up)
    g = grads(o, (fq, fk, v), up)
    for name, a, r in zip(("fq", "fk", "v"), g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=f"grad {name}")
    if mask is not None:
        assert torch.all(o[~mask] == 0), "outputs at padded positions must be exactly 0"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_cu_seqlens_equals_separate_sequences(backend, causal):
    lens = [5, 1, 0, 33, 13]
    t = sum(lens)
    fq, fk, v = make_inputs(1, t, 4, 2, 16, 8)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    n = len(lens)
    s0 = (torch.rand(n, 2, 16, 8, dtype=torch.float64), torch.rand(n, 2, 16, dtype=torch.float64))
    o, st = linear_attention(
        fq, fk, v, causal=causal, cu_seqlens=cu, initial_state=s0, output_final_state=True, backend=backend
    )
    for i, (a, e) in enumerate(zip(cu.tolist(), cu[1:].tolist())):
        if e == a:
            torch.testing.assert_close(st.S[i], s0[0][i])
            continue
        o_i, st_i = linear_attention(
            fq[:, a:e],
            fk[:, a:e],
            v[:, a:e],
            causal=causal,
            initial_state=(s0[0][i : i + 1], s0[1][i : i + 1]),
            output_final_state=True,
            backend="reference",
        )
        torch.testing.assert_close(o[:, a:e], o_i, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(st.S[i : i + 1], st_i.S, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(st.z[i : i + 1], st_i.z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [16, 60, 64])
def test_long_odd_length_chunked(d):
    """T = 1025 (one past a chunk multiple): chunked == reference, outputs and gradients."""
    fq, fk, v = make_inputs(1, 1025, 2, 1, d, d)
    o_ref, _ = linear_attention(fq, fk, v, causal=True, backend="reference")
    o, _ = linear_attention(fq, fk, v, causal=True, backend="chunked")
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    up = torch.randn_like(o)
    for a, r in zip(grads(o, (fq, fk, v), up), grads(o_ref, (fq, fk, v), up)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk_size", [1, 16, 64, 1000])
def test_chunk_size_does_not_change_result(chunk_size):
    fq, fk, v = make_inputs(2, 97, 2, 2, 8, 8, requires_grad=False)
    o_ref, _ = linear_attention(fq, fk, v, causal=True, backend="reference")
    o, _ = linear_attention(fq, fk, v, causal=True, backend="chunked", chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_prefix_in_pieces_then_resume_equals_one_pass(backend):
    fq, fk, v = make_inputs(2, 90, 4, 2, 16, 8, requires_grad=False)
    full, full_state = linear_attention(fq, fk, v, causal=True, output_final_state=True, backend=backend)
    state, outs = None, []
    for a, e in [(0, 1), (1, 30), (30, 31), (31, 90)]:
        o, state = linear_attention(
            fq[:, a:e],
            fk[:, a:e],
            v[:, a:e],
            causal=True,
            initial_state=state,
            output_final_state=True,
            backend=backend,
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.S, full_state.S, rtol=1e-10, atol=1e-10)


def test_prefill_then_decode_steps_with_padding_equals_full_forward():
    """Left-padded batch: prefill 40 tokens (chunked), then 20 recurrent steps == one full pass."""
    from hedgehog_attention.ops import recurrent_step

    fq, fk, v = make_inputs(3, 60, 4, 2, 16, 8, requires_grad=False)
    mask = torch.ones(3, 60, dtype=torch.bool)
    mask[1, :7] = False
    mask[2, :39] = False
    full, _ = linear_attention(fq, fk, v, causal=True, attention_mask=mask, backend="reference")
    o_pre, state = linear_attention(
        fq[:, :40],
        fk[:, :40],
        v[:, :40],
        causal=True,
        attention_mask=mask[:, :40],
        output_final_state=True,
        backend="chunked",
    )
    assert state.S.dtype == torch.float64  # float64 in, float64 state; float32 otherwise
    outs = [o_pre]
    for t in range(40, 60):
        o_t, state = recurrent_step(fq[:, t], fk[:, t], v[:, t], state, eps=1e-6, key_mask=mask[:, t])
        outs.append(o_t[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_state_is_float32_for_half_inputs():
    fq, fk, v = make_inputs(1, 20, 2, 2, 8, 8, dtype=torch.bfloat16, requires_grad=False)
    o, st = linear_attention(fq, fk, v, causal=True, output_final_state=True, backend="chunked")
    assert st.S.dtype == torch.float32 and st.z.dtype == torch.float32 and o.dtype == torch.bfloat16
    o_ref, _ = linear_attention(fq.double(), fk.double(), v.double(), causal=True, backend="reference")
    assert ((o.double() - o_ref).norm() / o_ref.norm()).item() < 1e-2


def test_padded_batch_equals_unpadded_rows():
    fq, fk, v = make_inputs(2, 30, 2, 2, 8, 8, requires_grad=False)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False  # right padding
    o, _ = linear_attention(fq, fk, v, causal=False, attention_mask=mask, backend="chunked")
    o1, _ = linear_attention(fq[1:, :20], fk[1:, :20], v[1:, :20], causal=False, backend="chunked")
    torch.testing.assert_close(o[1:, :20], o1, rtol=1e-10, atol=1e-10)
    # Garbage in padded keys must not leak into real outputs.
    fk2, v2 = fk.clone(), v.clone()
    fk2[1, 20:] = 1e6
    v2[1, 20:] = float("nan")
    o2, _ = linear_attention(fq, fk2, v2.nan_to_num(1e6), causal=False, attention_mask=mask, backend="chunked")
    torch.testing.assert_close(o2[1, :20], o[1, :20])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_nan_inf_in_padding_does_not_leak(backend, causal):
    """Padded tokens leave the sums whatever they hold: NaN / inf there (e.g. a fully masked softmax
    row upstream) changes no real output, no state and no gradient (they were multiplied by 0)."""
    fq, fk, v = make_inputs(2, 7, 4, 2, 3, 2)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    mask[1, 5:] = False  # right padding
    s0 = (torch.rand(2, 2, 3, 2, dtype=torch.float64), torch.rand(2, 2, 3, dtype=torch.float64))
    kw = dict(causal=causal, attention_mask=mask, initial_state=s0, output_final_state=True, backend=backend)
    if backend == "chunked":
        kw["chunk_size"] = 3  # the padding straddles chunk boundaries
    o, st = linear_attention(fq, fk, v, **kw)
    up = torch.randn_like(o)
    g = grads(o, (fq, fk, v), up)
    fq2, fk2, v2 = (x.detach().clone() for x in (fq, fk, v))
    fq2[~mask], fk2[~mask], v2[~mask] = float("nan"), float("inf"), float("nan")
    for x in (fq2, fk2, v2):
        x.requires_grad_()
    o2, st2 = linear_attention(fq2, fk2, v2, **kw)
    torch.testing.assert_close(o2, o, rtol=1e-12, atol=1e-12)
    assert torch.all(o2[~mask] == 0)
    torch.testing.assert_close(st2.S, st.S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st2.z, st.z, rtol=1e-12, atol=1e-12)
    for name, a, r in zip(("fq", "fk", "v"), grads(o2, (fq2, fk2, v2), up), g):
        torch.testing.assert_close(a[mask], r[mask], rtol=1e-10, atol=1e-10, msg=f"grad {name}")
        assert torch.all(a[~mask] == 0), f"grad {name} at padded positions"


def test_recurrent_step_padded_token_keeps_state_with_nan():
    """key_mask False: state unchanged and output 0 even if the padded token's q/k/v are NaN / inf."""
    from hedgehog_attention.ops import recurrent_step

    fq, fk, v = make_inputs(2, 1, 4, 2, 3, 2, requires_grad=False)
    st = LinearAttentionState(torch.rand(2, 2, 3, 2, dtype=torch.float64), torch.rand(2, 2, 3, dtype=torch.float64))
    km = torch.tensor([False, True])
    fq, fk, v = fq[:, 0].clone(), fk[:, 0].clone(), v[:, 0].clone()
    fq[0], fk[0], v[0] = float("nan"), float("inf"), float("nan")
    o, new = recurrent_step(fq, fk, v, st, eps=1e-6, key_mask=km)
    assert torch.all(o[0] == 0) and torch.isfinite(o).all()
    assert torch.equal(new.S[0], st.S[0]) and torch.equal(new.z[0], st.z[0])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_padded_outputs_are_zero_with_eps_zero(backend, causal):
    """eps >= 0 is allowed; padded queries must give exactly 0 (not 0/0 = NaN) and finite gradients."""
    fq, fk, v = make_inputs(2, 6, 2, 1, 3, 2)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False  # left padding: these queries see no mass
    mask[1, :] = False  # a fully padded row
    o, _ = linear_attention(fq, fk, v, causal=causal, attention_mask=mask, eps=0.0, backend=backend)
    assert torch.all(o[~mask] == 0) and torch.isfinite(o).all()
    for g in grads(o, (fq, fk, v), torch.randn_like(o)):
        assert torch.isfinite(g).all()
    w = linear_attention_weights(fq, fk, causal=causal, attention_mask=mask, eps=0.0)
    assert torch.all(w.transpose(1, 2)[~mask] == 0)


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_cu_seqlens_final_state_dtype_with_empty_sequence(backend):
    """State is float32 for float32 inputs, whether or not a packed sequence is empty."""
    fq, fk, v = make_inputs(1, 9, 2, 2, 4, 3, dtype=torch.float32, requires_grad=False)
    s0 = (torch.rand(3, 2, 4, 3, dtype=torch.float64), torch.rand(3, 2, 4, dtype=torch.float64))
    for cu in (torch.tensor([0, 4, 4, 9]), torch.tensor([0, 2, 4, 9])):
        _, st = linear_attention(
            fq, fk, v, causal=True, cu_seqlens=cu, initial_state=s0, output_final_state=True, backend=backend
        )
        assert st.S.dtype == torch.float32 and st.z.dtype == torch.float32, (cu.tolist(), st.S.dtype)


def test_weights_rows_sum_to_one_and_match_output():
    fq, fk, v = make_inputs(2, 25, 4, 2, 8, 8, requires_grad=False)
    w = linear_attention_weights(fq, fk, causal=True, eps=0.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 25, dtype=torch.float64))
    assert torch.all(w.triu(1) == 0)
    o, _ = linear_attention(fq, fk, v, causal=True, eps=0.0, backend="reference")
    o_w = torch.einsum("bkgij,bjkd->bikgd", w.view(2, 2, 2, 25, 25), v).reshape(2, 25, 4, 8)
    torch.testing.assert_close(o, o_w)


def test_softmax_reference_matches_torch_sdpa():
    q, k, v = (torch.randn(2, 33, 4, 16, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[0, 25:] = False
    for causal in (True, False):
        o = softmax_attention_reference(q, k, v, causal=causal, attention_mask=mask)
        attn_mask = mask[:, None, None, :]
        if causal:
            attn_mask = attn_mask & torch.ones(33, 33, dtype=torch.bool).tril()
        expect = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        ).transpose(1, 2)
        torch.testing.assert_close(o[0, :25], expect[0, :25])
        torch.testing.assert_close(o[1], expect[1])
        w = softmax_attention_weights(q, k, causal=causal, attention_mask=mask)
        assert torch.all(w[0, :, 25:] == 0)


def test_softmax_reference_propagates_nan_of_real_tokens():
    """Only rows of padded queries are set to 0; a NaN in a real query must show (it was zeroed by
    nan_to_num, so a broken teacher looked like a query attending to nothing)."""
    q, k, v = (torch.randn(2, 6, 2, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    q[1, 3, 0] = float("nan")
    for causal in (True, False):
        w = softmax_attention_weights(q, k, causal=causal, attention_mask=mask)
        assert torch.all(w[0, :, :2] == 0) and torch.isfinite(w[0]).all()
        assert torch.isnan(w[1, 0, 3]).all() and torch.isfinite(w[1, 1]).all()
        o = softmax_attention_reference(q, k, v, causal=causal, attention_mask=mask)
        assert torch.isnan(o[1, 3, 0]).all() and torch.all(o[0, :2] == 0)


def test_softmax_reference_ignores_nan_inf_in_padding():
    """Garbage (NaN / inf) in padded q, k, v reaches neither real outputs nor their gradients."""
    q, k, v = (torch.randn(2, 6, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 4:] = False
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    q2[~mask], k2[~mask], v2[~mask] = float("nan"), float("inf"), float("nan")
    for x in (q2, k2, v2):
        x.requires_grad_()
    for causal in (True, False):
        o = softmax_attention_reference(q, k, v, causal=causal, attention_mask=mask)
        o2 = softmax_attention_reference(q2, k2, v2, causal=causal, attention_mask=mask)
        torch.testing.assert_close(o2, o, rtol=1e-12, atol=1e-12)
        up = torch.randn_like(o)
        for a, r in zip(grads(o2, (q2, k2, v2), up), grads(o, (q, k, v), up)):
            torch.testing.assert_close(a[mask], r[mask], rtol=1e-10, atol=1e-10)
            assert torch.isfinite(a).all()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda a: {**a, "fq": a["fq"][..., :-1]}, ValueError, "feature dim"),
        (lambda a: {**a, "v": a["v"][:, :-1]}, ValueError, "[B, T]"),
        (lambda a: {**a, "fq": a["fq"][0]}, ValueError, "4 dims"),
        (lambda a: {**a, "fk": a["fk"].long()}, TypeError, "floating point"),
        (lambda a: {**a, "attention_mask": torch.ones(2, 5, dtype=torch.bool)}, ValueError, "attention_mask"),
        (lambda a: {**a, "attention_mask": torch.ones(2, 9)}, TypeError, "bool or integer"),
        (lambda a: {**a, "backend": "cuda-magic"}, ValueError, "valid backends"),
        (lambda a: {**a, "v": a["v"][:, :, :1]}, ValueError, "KV heads"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 9, 18])}, ValueError, "B must be 1"),
        (lambda a: {**a, "initial_state": (torch.zeros(2, 2, 4, 3), torch.zeros(2, 2, 4))}, ValueError, "S (2, 2"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, exc, words):
    args = dict(fq=torch.rand(2, 9, 4, 4), fk=torch.rand(2, 9, 2, 4), v=torch.randn(2, 9, 2, 5), causal=True)
    args = mutate(args)
    with pytest.raises(exc) as info:
        linear_attention(**args)
    assert words in str(info.value)


def test_state_reorder_for_beam_search():
    st = LinearAttentionState(torch.randn(3, 2, 4, 5), torch.rand(3, 2, 4))  # S [N, Hk, F, Dv], z [N, Hk, F]
    idx = torch.tensor([2, 2, 0])
    new = st.index_select(idx)
    assert torch.equal(new.S, st.S[idx]) and torch.equal(new.z, st.z[idx])


# --------------------------------------------------------------------------- property-based
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 80),
    hk=st.integers(1, 3),
    group=st.integers(1, 3),
    f=st.integers(1, 12),
    dv=st.integers(1, 9),
    causal=st.booleans(),
    chunk=st.sampled_from([1, 5, 16, 64]),
    pad=st.integers(0, 79),
)
def test_chunked_equals_reference_on_random_shapes(b, t, hk, group, f, dv, causal, chunk, pad):
    fq, fk, v = make_inputs(b, t, hk * group, hk, f, dv, requires_grad=False)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[-1, : min(pad, t - 1)] = False
    o_ref, s_ref = linear_attention(
        fq, fk, v, causal=causal, attention_mask=mask, output_final_state=True, backend="reference"
    )
    o, s = linear_attention(
        fq, fk, v, causal=causal, attention_mask=mask, output_final_state=True, backend="chunked", chunk_size=chunk
    )
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.S, s_ref.S, rtol=1e-10, atol=1e-10)
