"""The rotary Transformer (App. B.2): every attention runs forward/backward, decoding with a cache
equals one full pass, the auxiliary Eq. 3 term trains only the feature maps."""

import pytest
import torch

from hedgehog_attention import attention_distillation_loss, available_feature_maps
from hedgehog_attention.models import RotaryTransformer, TransformerConfig, apply_rotary, lm_labels, rotary_cos_sin

ATTENTIONS = ["softmax", *available_feature_maps()]


def _model(attention: str, **kw) -> RotaryTransformer:
    cfg = TransformerConfig(vocab_size=24, d_model=32, n_layers=2, n_heads=2, max_seq_len=48, attention=attention, **kw)
    return RotaryTransformer(cfg)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_backward_every_attention(attention):
    model = _model(attention, distill_weight=0.0 if attention == "softmax" else 0.5)
    x = torch.randint(0, 24, (2, 19))
    out = model(x, lm_labels(x))
    assert out.logits.shape == (2, 19, 24)
    assert torch.isfinite(out.loss)
    if attention == "softmax":
        assert out.aux_loss is None
    else:
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    out.total_loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # Every block's projections get a gradient from the task loss.
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["softmax", "hedgehog", "elu", "cosformer", "performer", "taylor2"])
def test_decode_with_state_equals_full_forward(attention):
    model = _model(attention).double().eval()
    x = torch.randint(0, 24, (3, 29))
    with torch.no_grad():
        full = model(x).logits
        prefill = model(x[:, :17], use_cache=True)
        pieces, cache = [prefill.logits], prefill.cache
        # A chunk of several tokens, then token by token.
        mid = model(x[:, 17:21], cache=cache, use_cache=True, position_offset=17)
        pieces.append(mid.logits)
        cache = mid.cache
        for t in range(21, 29):
            step = model(x[:, t : t + 1], cache=cache, use_cache=True, position_offset=t)
            pieces.append(step.logits)
            cache = step.cache
    tol = 1e-5 if attention == "performer" else 1e-9  # Performer's features are float32 by design
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=tol, atol=tol)


def test_aux_distillation_trains_only_feature_maps():
    model = _model("hedgehog", distill_weight=1.0)
    x = torch.randint(0, 24, (2, 16))
    out = model(x)  # no labels: only the auxiliary term has a graph
    assert out.loss is None and out.aux_loss is not None
    out.aux_loss.backward()
    attn = model.blocks[1].attn
    assert attn.linear.feature_map_q.weight.grad.abs().sum() > 0
    assert attn.qkv.weight.grad is None  # q, k are detached for the auxiliary term
    model.eval()
    assert model(x).aux_loss is None  # off in eval unless asked for
    assert model(x, return_aux=True).aux_loss is not None


def _capture_attention_calls(model):
    """Record (attention module, its input x, positions, output) of every layer's forward."""
    calls = []
    for blk in model.blocks:
        blk.attn.register_forward_hook(lambda m, args, out: calls.append((m, args[0], args[1], out[0])))
    return calls


def test_aux_loss_is_weighted_layer_mean_of_eq3_on_rotated_qk():
    model = _model("hedgehog", distill_weight=0.5)
    x = torch.randint(0, 24, (2, 16))
    calls = _capture_attention_calls(model)
    aux = model(x).aux_loss  # training mode: the Eq. 3 term is on
    per_layer = []
    for attn, h, pos, _ in calls:
        q, k, _ = attn._qkv(h, pos)  # rotated q, k [B, T, H, D]
        per_layer.append(attention_distillation_loss(q, k, *attn.linear.features(q, k), causal=True))
    torch.testing.assert_close(aux, 0.5 * torch.stack(per_layer).mean())


def test_attention_weights_are_causal_rows_that_the_forward_uses():
    for att in ("softmax", "hedgehog", "relu", "cosformer"):
        model = _model(att).eval()
        x = torch.randint(0, 24, (2, 12))
        ws = model.attention_weights(x)
        assert len(ws) == 2 and ws[0].shape == (2, 2, 12, 12)
        # ...and they are the weights the forward pass uses: out(w @ v) == each layer's attention output
        calls = _capture_attention_calls(model)
        with torch.no_grad():
            model(x)
            for w, (attn, h, pos, y) in zip(ws, calls):
                v = attn._qkv(h, pos)[2]  # [B, T, H, D]
                o = torch.einsum("bhij,bjhd->bihd", w, v).reshape(2, 12, -1)
                torch.testing.assert_close(attn.out(o), y, rtol=1e-4, atol=1e-5)
        for w in ws:
            rows = w.sum(-1)
            ok = (rows - 1).abs() < 1e-4
            if att == "relu":  # ReLU features can give an all-zero row (eps makes it 0, not NaN)
                ok = ok | (rows.abs() < 1e-6)
            assert ok.all()
            assert (w.triu(1) == 0).all()


def test_rotary_is_relative():
    """q.k after rotation depends only on the position difference."""
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def dot(i, j):
        ci, si = rotary_cos_sin(torch.tensor([[i]]), 8)
        cj, sj = rotary_cos_sin(torch.tensor([[j]]), 8)
        return (apply_rotary(q, ci.double(), si.double()) * apply_rotary(k, cj.double(), sj.double())).sum()

    torch.testing.assert_close(dot(7, 3), dot(14, 10))
    assert not torch.allclose(dot(7, 3), dot(7, 4))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown attention"):
        TransformerConfig(vocab_size=8, attention="nope")
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(vocab_size=8, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="linear attention"):
        TransformerConfig(vocab_size=8, attention="softmax", distill_weight=1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        _model("softmax")(torch.zeros(1, 49, dtype=torch.long))


@pytest.mark.parametrize("attention", ["softmax", "hedgehog"])
def test_float64_model_computes_in_float64(attention):
    """A float64 model stays float64: rotary (cos/sin and the rotation) and the loss did a float32 round
    trip, so gradcheck failed and rotations did not preserve norms to float64 precision."""
    cfg = TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_seq_len=16, attention=attention)
    model = RotaryTransformer(cfg).double()
    x = torch.randint(0, 11, (1, 4))
    pos = torch.arange(4).expand(1, 4) + 9
    attn = model.blocks[0].attn
    h = torch.randn(1, 4, 8, dtype=torch.float64)
    q, k, _ = attn._qkv(h, pos)
    q0, k0, _ = attn.qkv(h).view(1, 4, 3, 2, 4).unbind(2)
    torch.testing.assert_close(q.norm(dim=-1), q0.norm(dim=-1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(k.norm(dim=-1), k0.norm(dim=-1), rtol=1e-13, atol=1e-13)
    out = model(x, lm_labels(x))
    assert out.logits.dtype == torch.float64 and out.loss.dtype == torch.float64

    def logits_and_loss(e):
        hs = e
        for blk in model.blocks:
            hs, _, _ = blk(hs, pos)
        logits = model.head(model.norm(hs))
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())

    e = model.embed(x).detach().requires_grad_()
    assert torch.autograd.gradcheck(logits_and_loss, (e,))


def test_cached_decoding_positions_follow_the_cache():
    """With a softmax cache the first new token's position defaults to the cache's length and a
    wrong ``position_offset`` is refused; a cache of linear states (no recorded length) needs it."""
    torch.manual_seed(0)
    x = torch.randint(0, 64, (2, 12))
    for attention in ("softmax", "hedgehog"):
        model = RotaryTransformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                                                    max_seq_len=32, attention=attention)).eval()  # fmt: skip
        full = model(x).logits
        cache = model(x[:, :9], use_cache=True).cache
        if attention == "softmax":
            step = model(x[:, 9:10], cache=cache, use_cache=True)  # offset from the cache: 9
            torch.testing.assert_close(step.logits[:, 0], full[:, 9], rtol=1e-5, atol=1e-5)
            with pytest.raises(ValueError, match="softmax cache holds"):
                model(x[:, 9:10], cache=cache, position_offset=0)
        else:
            with pytest.raises(ValueError, match="position_offset is needed"):
                model(x[:, 9:10], cache=cache)
            step = model(x[:, 9:10], cache=cache, use_cache=True, position_offset=9)
            torch.testing.assert_close(step.logits[:, 0], full[:, 9], rtol=1e-5, atol=1e-5)
