"""Each feature map against its paper formula on hand-checked values; registry; stability."""

from __future__ import annotations

import math

import pytest
import torch

from hedgehog_attention import available_feature_maps, build_feature_map
from hedgehog_attention.feature_maps import HedgehogFeatureMap, T2RFeatureMap


def x_1x1x1(values):
    return torch.tensor(values, dtype=torch.float64).view(1, 1, 1, -1)


def test_registry_lists_all_paper_maps_and_rejects_unknown():
    names = set(available_feature_maps())
    assert {"hedgehog", "elu", "relu", "performer", "cosformer", "exp_t", "taylor2", "t2r"} <= names
    with pytest.raises(ValueError, match="valid names: .*hedgehog"):
        build_feature_map("softplus-magic", num_heads=1, head_dim=2)
    with pytest.raises(TypeError, match="exp_t"):
        build_feature_map("exp_t", num_heads=1, head_dim=2, activation="softmax")
    # the paper-table aliases: Hedgehog with Eq. 5's element-wise exp, T2R-HH = the T2R map
    assert build_feature_map("hedgehog_exp", num_heads=1, head_dim=2).activation == "exp"
    assert isinstance(build_feature_map("t2r_hh", num_heads=1, head_dim=2), T2RFeatureMap)


def test_hedgehog_identity_init_softmax_values():
    fm = build_feature_map("hedgehog", num_heads=1, head_dim=2).double()
    out = fm(x_1x1x1([0.0, math.log(3.0)])).flatten()
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, -ln 3]) = [3/4, 1/4]
    torch.testing.assert_close(out, torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=torch.float64))
    assert fm.feature_dim == 4 and fm.weight.shape == (1, 2, 2) and fm.bias.shape == (1, 2)


def test_hedgehog_exp_variant_is_eq5():
    fm = HedgehogFeatureMap(1, 2, activation="exp").double()
    with torch.no_grad():
        fm.weight.copy_(torch.tensor([[[1.0, 2.0], [0.0, -1.0]]]))
        fm.bias.copy_(torch.tensor([[0.5, -0.5]]))
    x = x_1x1x1([1.0, 2.0])
    z = torch.tensor([1.0 * 1 + 2.0 * 0 + 0.5, 1.0 * 2 + 2.0 * -1 - 0.5], dtype=torch.float64)  # [1.5, -0.5]
    expect = torch.cat([z.exp(), (-z).exp()])
    torch.testing.assert_close(fm(x).flatten().double(), expect)


@pytest.mark.parametrize("activation", ["softmax", "exp"])
def test_hedgehog_is_activation_of_each_heads_affine_map(activation):
    """phi_h(x) = [act(x W_h + b_h), act(-x W_h - b_h)]: each head its own W [D, F], b [F]; F != D."""
    fm = HedgehogFeatureMap(2, 3, feature_dim=4, activation=activation).double()
    with torch.no_grad():
        fm.weight.normal_()
        fm.bias.normal_()
    x = torch.randn(2, 5, 2, 3, dtype=torch.float64)  # [B, T, H, D]
    act = torch.exp if activation == "exp" else (lambda z: torch.softmax(z, dim=-1))
    out = fm(x).double()  # [B, T, H, 2F]
    for h in range(2):
        z = x[:, :, h] @ fm.weight[h] + fm.bias[h]  # [B, T, F]
        torch.testing.assert_close(out[:, :, h], torch.cat([act(z), act(-z)], dim=-1), rtol=1e-5, atol=1e-6)


def test_hedgehog_per_head_parameters_and_rectangular_identity():
    fm = HedgehogFeatureMap(3, 8, feature_dim=4)
    assert fm.weight.shape == (3, 8, 4) and fm.feature_dim == 8
    torch.testing.assert_close(fm.weight[2], torch.eye(8, 4))
    fm2 = HedgehogFeatureMap(3, 8, negation=False)
    assert fm2.feature_dim == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hedgehog_softmax_finite_in_half_at_1e4(dtype):
    fm = build_feature_map("hedgehog", num_heads=2, head_dim=4)
    x = torch.tensor([1e4, -1e4, 3.0, 0.0]).repeat(1, 3, 2, 1).to(dtype)
    out = fm(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float().sum(-1), torch.full((1, 3, 2), 2.0), rtol=1e-2, atol=1e-2)


def test_hedgehog_exp_variant_finite_for_half_inputs():
    fm = HedgehogFeatureMap(1, 2, activation="exp")
    out = fm(torch.tensor([1e4, -1e4]).view(1, 1, 1, 2).half())
    assert torch.isfinite(out).all() and out.dtype == torch.float32


def test_elu_relu_exp_values():
    x = x_1x1x1([-1.0, 0.0, 2.0])
    torch.testing.assert_close(
        build_feature_map("elu", num_heads=1, head_dim=3)(x).flatten(),
        torch.tensor([math.exp(-1.0), 1.0, 3.0], dtype=torch.float64),
    )
    torch.testing.assert_close(
        build_feature_map("relu", num_heads=1, head_dim=3)(x).flatten(), torch.tensor([0.0, 0.0, 2.0]).double()
    )
    e2 = build_feature_map("exp_t", num_heads=1, head_dim=3, temperature=2.0)(x).flatten()
    torch.testing.assert_close(e2.double(), torch.tensor([math.exp(-2), 1.0, math.exp(4)], dtype=torch.float64))


def test_taylor2_dot_product_is_second_order_expansion():
    d = 6
    fm = build_feature_map("taylor2", num_heads=1, head_dim=d)
    assert fm.feature_dim == 1 + d + d * d
    q, k = torch.randn(2, 1, 1, 1, d, dtype=torch.float64).unbind(0)
    s = (q * k).sum() / math.sqrt(d)
    torch.testing.assert_close((fm(q) * fm(k)).sum(), 1 + s + s * s / 2)


def test_performer_estimates_softmax_kernel():
    d, m = 8, 4096
    fm = build_feature_map("performer", num_heads=1, head_dim=d, num_features=m, seed=0).double()
    q, k = (0.5 * torch.randn(2, 1, 1, 1, d, dtype=torch.float64)).unbind(0)
    est = (fm(q) * fm(k)).sum()
    exact = torch.exp((q * k).sum() / math.sqrt(d))
    assert abs(est.item() / exact.item() - 1) < 0.1
    assert (fm(torch.randn(1, 5, 1, d)) > 0).all()
    before = fm.projection.clone()
    fm.redraw()
    assert not torch.equal(before, fm.projection)


def test_performer_is_favor_plus_formula_with_orthogonal_gaussian_rows():
    """phi(x) = exp(w.x' - |x'|^2/2)/sqrt(m), x' = x/D^(1/4), one projection per head; w in blocks of D
    orthogonal rows (m = 10 cuts the last block) with chi norms, so E[w w^T] = I."""
    d, m = 4, 10
    fm = build_feature_map("performer", num_heads=2, head_dim=d, num_features=m, seed=0)
    x = torch.randn(2, 3, 2, d)  # [B, T, H, D]
    out = fm(x)  # [B, T, H, m]
    for h in range(2):
        xs, w = x[:, :, h].double() / d**0.25, fm.projection[h].double()  # [B, T, D], [D, m]
        expect = torch.exp(xs @ w - (xs * xs).sum(-1, keepdim=True) / 2) / math.sqrt(m)
        torch.testing.assert_close(out[:, :, h].double(), expect, rtol=1e-5, atol=0)
    rows = fm.projection[0].T  # [m, D]
    for blk in (rows[:d], rows[d : 2 * d]):
        gram = blk @ blk.T
        torch.testing.assert_close(gram, torch.diag(gram.diagonal()), rtol=0, atol=1e-5)
    assert not torch.equal(fm.projection[0], fm.projection[1])
    again = build_feature_map("performer", num_heads=2, head_dim=d, num_features=m, seed=0)
    assert torch.equal(again.projection, fm.projection)  # seeded draws are reproducible
    big = build_feature_map("performer", num_heads=1, head_dim=d, num_features=8192, seed=0).projection[0]
    torch.testing.assert_close(big @ big.T / 8192, torch.eye(d), rtol=0, atol=0.1)


def test_performer_is_unbiased_in_every_direction():
    d = 8
    fm = build_feature_map("performer", num_heads=1, head_dim=d, num_features=16384, seed=0).double()
    e = torch.eye(d, dtype=torch.float64)
    x = 0.5 * d**0.25 * torch.cat([e, -e]).view(1, 2 * d, 1, d)  # [1, 2D, 1, D]: +-axes, |x/D^(1/4)| = 0.5
    est = (fm(x) ** 2).sum(-1)  # phi(x).phi(x) [1, 2D, 1]; exact exp(x.x/sqrt(D)) = exp(1/4)
    assert (est / math.exp(0.25) - 1).abs().max() < 0.05  # sampling error <= 2.6% over seeds 0..7


def test_cosformer_reweighting_by_position():
    fm = build_feature_map("cosformer", num_heads=1, head_dim=2, max_length=10)
    x = torch.tensor([[1.0, -1.0], [2.0, 3.0]]).view(1, 2, 1, 2)
    out = fm(x, torch.tensor([[0, 5]]))
    a = math.pi * 5 / 20
    expect_pos1 = torch.tensor([2 * math.cos(a), 3 * math.cos(a), 2 * math.sin(a), 3 * math.sin(a)])
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(out[0, 1, 0], expect_pos1)
    # q_i.k_j reproduces relu(q).relu(k) cos(pi (i - j) / 2M): relu([1, -1]).relu([2, 3]) = 2, i - j = -5
    torch.testing.assert_close((out[0, 0, 0] * out[0, 1, 0]).sum(), torch.tensor(2 * math.cos(a)))
    torch.testing.assert_close(fm(x), fm(x, torch.tensor([[0, 1]])))  # default positions are 0..T-1
    with pytest.raises(ValueError, match="max_length"):
        fm(x, torch.tensor([[0, 10]]))


def test_t2r_is_relu_mlp():
    fm = build_feature_map("t2r", num_heads=2, head_dim=3, feature_dim=5)
    with torch.no_grad():
        fm.bias.normal_()  # a zero bias would hide a dropped "+ b"
    x = torch.randn(1, 4, 2, 3)  # [B, T, H, D]
    out = fm(x)  # [B, T, H, F]
    for h in range(2):
        torch.testing.assert_close(out[:, :, h], torch.relu(x[:, :, h] @ fm.weight[h] + fm.bias[h]))
    assert fm.trainable and not build_feature_map("elu", num_heads=1, head_dim=2).trainable


@pytest.mark.parametrize("name", ["hedgehog", "elu", "relu", "performer", "cosformer", "exp_t", "taylor2", "t2r"])
def test_every_map_nonnegative_and_shaped(name):
    fm = build_feature_map(name, num_heads=3, head_dim=8)
    out = fm(torch.randn(2, 11, 3, 8) * 3)
    assert out.shape == (2, 11, 3, fm.feature_dim)
    assert torch.isfinite(out).all()
    if name == "taylor2":  # features can be negative; every kernel value 1 + s + s^2/2 is >= 1/2
        assert (torch.einsum("bthf,bshf->bhts", out, out) >= 0.5 - 1e-4).all()
    else:
        assert (out >= 0).all()


def test_feature_map_rejects_wrong_shape():
    fm = build_feature_map("hedgehog", num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="H=2, D=4"):
        fm(torch.randn(1, 3, 2, 5))
    with pytest.raises(TypeError, match="floating"):
        fm(torch.ones(1, 3, 2, 4, dtype=torch.long))


@pytest.mark.parametrize(
    "name", ["hedgehog", "hedgehog_exp", "elu", "relu", "performer", "cosformer", "exp_t", "taylor2", "t2r"]
)
def test_float64_input_is_computed_in_float64(name):
    """float64 in, float64 features at float64 accuracy (they were rounded through float32: the exp
    maps even returned float32), so gradcheck of every map passes."""
    torch.manual_seed(0)
    fm = build_feature_map(name, num_heads=2, head_dim=3).double()
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert fm(x).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: fm(x), (x,))
    if name == "hedgehog":  # identity init: exactly [softmax(x), softmax(-x)]
        want = torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)
        torch.testing.assert_close(fm(x), want, rtol=0, atol=1e-15)
