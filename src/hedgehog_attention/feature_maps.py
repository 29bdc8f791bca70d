"""Feature maps phi: R^D -> R^F' for linear attention, one registry by name.

Every map takes ``x: [B, T, H, D]`` (queries or keys after any positional rotation) and returns
non-negative features ``[B, T, H, feature_dim]``. Maps that are trainable keep one set of
parameters per head (the paper's "separate MLP for each head and layer").

Names in the registry (see :func:`available_feature_maps`):

=============  ===========================================================  ==============
name           formula (per head)                                           feature_dim
=============  ===========================================================  ==============
``hedgehog``   ``[act(xW + b), act(-xW - b)]``, act = softmax (Eq. 4) or     ``2F`` (``F``
               element-wise exp (Eq. 5); W identity-initialized              w/o negation)
``elu``        ``1 + elu(x)`` (Katharopoulos et al.)                        ``D``
``relu``       ``relu(x)``                                                  ``D``
``performer``  FAVOR+ positive random features ``exp(w.x' - |x'|^2/2)/√m``  ``m``
``cosformer``  ``[relu(x) cos(πi/2M), relu(x) sin(πi/2M)]`` at position i   ``2D``
``exp_t``      ``exp(t x)`` element-wise (t=1, t=2 in the paper)             ``D``
``taylor2``    ``[1, x/d^¼, vec(x xᵀ)/(√2 d^½)]`` so φ(q).φ(k) ≈ exp(q.k/√d)  ``1 + D + D²``
``t2r``        ``relu(xW + b)``, trainable (T2R); "T2R-HH" = t2r + Eq. 3    ``F``
=============  ===========================================================  ==============
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FeatureMap",
    "HedgehogFeatureMap",
    "EluFeatureMap",
    "ReluFeatureMap",
    "PerformerFeatureMap",
    "PerformerKeyMap",
    "CosFormerFeatureMap",
    "ExpFeatureMap",
    "Taylor2FeatureMap",
    "T2RFeatureMap",
    "build_feature_map",
    "available_feature_maps",
    "register_feature_map",
]

# exp() of a float32 overflows past ~88.7. Pre-activations of the element-wise exponential maps are
# clamped to +-EXP_CLAMP so a single feature stays below e^30 ~ 1e13 and a q.k product below 1e26:
# sums over thousands of keys and 256 features remain finite in float32.
EXP_CLAMP = 30.0


def _check_input(x: torch.Tensor, num_heads: int, head_dim: int, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected x of shape [B, T, H, D] (4 dims), got shape {tuple(x.shape)}")
    if x.shape[2] != num_heads or x.shape[3] != head_dim:
        raise ValueError(
            f"{name}: expected x[..., H={num_heads}, D={head_dim}], got H={x.shape[2]}, D={x.shape[3]} "
            f"(shape {tuple(x.shape)})"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def _cdt(x: torch.Tensor) -> torch.dtype:
    """The dtype maps compute in: float32, or float64 for float64 input (kept exact, not rounded)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class FeatureMap(nn.Module):
    """Base class. Subclasses set ``feature_dim`` and implement :meth:`features`.

    ``forward`` validates ``x: [B, T, H, D]`` and returns ``[B, T, H, feature_dim]`` features that are
    non-negative. Maps compute in float32 (float64 for float64 input) and return ``x.dtype`` unless
    documented otherwise.
    """

    name: str = "base"

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"num_heads and head_dim must be >= 1, got {num_heads} and {head_dim}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.feature_dim = head_dim

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        _check_input(x, self.num_heads, self.head_dim, type(self).__name__)
        return self.features(x, positions)

    def features(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"


class HedgehogFeatureMap(FeatureMap):
    """Hedgehog's trainable spiky map (Sec. 4, App. A.1): ``phi(x) = [act(xW + b), act(-xW - b)]``.

    Args:
        num_heads: H, one ``W [D, F]`` and ``b [F]`` per head.
        head_dim: D.
        feature_dim: F (defaults to D). With ``negation`` the output has ``2F`` features.
        activation: ``"softmax"`` (Eq. 4; softmax over the F features of each half, stable in
            fp16/bf16 for any input because the max is subtracted) or ``"exp"`` (Eq. 5, element-wise,
            computed in float32 with pre-activations clamped to +-30; returns float32 features so
            half-precision inputs cannot overflow; float64 input stays float64).
        negation: concatenate the map of ``-(xW + b)`` (App. A.1 "negation mapping").
        bias: learn ``b`` (initialized to 0).
        init: ``"identity"`` (``W = I`` (rectangular eye when F != D), the paper's and LoLCATs'
            choice, so the untrained map is ``[softmax(x), softmax(-x)]``) or ``"random"``.

    Parameters: ``weight [H, D, F]``, ``bias [H, F]``.
    """

    name = "hedgehog"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_dim: int | None = None,
        activation: Literal["softmax", "exp"] = "softmax",
        negation: bool = True,
        bias: bool = True,
        init: Literal["identity", "random"] = "identity",
    ) -> None:
        super().__init__(num_heads, head_dim)
        if activation not in ("softmax", "exp"):
            raise ValueError(f"activation must be 'softmax' or 'exp', got {activation!r}")
        if init not in ("identity", "random"):
            raise ValueError(f"init must be 'identity' or 'random', got {init!r}")
        self.activation = activation
        self.negation = negation
        self.map_dim = feature_dim or head_dim
        self.feature_dim = self.map_dim * (2 if negation else 1)
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, self.map_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, self.map_dim)) if bias else None
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "identity":
                eye = torch.eye(self.head_dim, self.map_dim)
                self.weight.copy_(eye.expand(self.num_heads, -1, -1))
            else:
                nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.head_dim))
            if self.bias is not None:
                self.bias.zero_()

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """``z = x W_h + b_h`` in float32 (float64 for float64 x), ``[B, T, H, D] -> [B, T, H, F]``."""
        cd = _cdt(x)
        z = torch.einsum("bthd,hdf->bthf", x.to(cd), self.weight.to(cd))
        if self.bias is not None:
            z = z + self.bias.to(cd)
        return z

    def features(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        z = self.preactivation(x)
        halves = (z, -z) if self.negation else (z,)
        if self.activation == "softmax":
            out = torch.cat([torch.softmax(h, dim=-1) for h in halves], dim=-1)
            return out.to(x.dtype)
        out = torch.cat([torch.exp(h.clamp(-EXP_CLAMP, EXP_CLAMP)) for h in halves], dim=-1)
        return out  # float32 (or float64) on purpose: e^30 does not fit fp16

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, activation={self.activation!r}, negation={self.negation}, "
            f"bias={self.bias is not None}"
        )


class EluFeatureMap(FeatureMap):
    """``1 + elu(x)`` (Katharopoulos et al., 2020). feature_dim = D."""

    name = "elu"

    def features(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return (1.0 + F.elu(x.to(_cdt(x)))).to(x.dtype)


class ReluFeatureMap(FeatureMap):
    """``relu(x)``. feature_dim = D."""

    name = "relu"

    def features(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return F.relu(x)


class ExpFeatureMap(FeatureMap):
    """``exp(t * x)`` element-wise (App. B.1's spiky-but-not-monotonic control; t=1, t=2).

    Computed in float32 with ``t*x`` clamped to +-30 and returned as float32 (float64 for float64 input).
    """

    name = "exp_t"

    def __init__(self, num_heads: int, head_dim: int, temperature: float = 1.0) -> None:
        super().__init__(num_heads, head_dim)
        self.temperature = float(temperature)

    def features(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return torch.exp((self.temperature * x.to(_cdt(x))).clamp(-EXP_CLAMP, EXP_CLAMP))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class Taylor2FeatureMap(FeatureMap):
    """2nd-order Taylor expansion of ``exp(q.k / sqrt(D))`` (the paper's Fig. 6/7 comparison).

    ``phi(x) = [1, x / D^(1/4), vec(x x^T) / (sqrt(2) * sqrt(D))]`` so that
    ``phi(q).phi(k) = 1 + s + s^2 / 2 >= 1/2`` with ``s = q.k / sqrt(D)``: the features themselves
    can be negative, but every kernel value (and so every normalizer) is positive.
    feature_dim = 1 + D + D^2.
    """

    name = "taylor2"

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__(num_heads, head_dim)
        self.feature_dim = 1 + head_dim + head_dim * head_dim

    def features(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        d = self.head_dim
        xf = x.to(_cdt(x))
        ones = torch.ones(*xf.shape[:-1], 1, dtype=xf.dtype, device=xf.device)
        first = xf / d**0.25
        second = (xf.unsqueeze(-1) * xf.unsqueeze(-2)).flatten(-2) / (math.sqrt(2.0) * math.sqrt(d))
        return torch.cat([ones, first, second], dim=-1).to(x.dtype)


class PerformerFeatureMap(FeatureMap):
    """FAVOR+ positive orthogonal random features (Choromanski et al., 2021).

    ``phi(x) = exp(w_i . x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = x / D^(1/4)`` so that
    ``E[phi(q).phi(k)] = exp(q.k / sqrt(D))``. ``w`` are blocks of orthogonal Gaussian rows (Haar:
    QR with the signs of ``diag(R)`` corrected, so no direction is favoured), one projection per
    head, stored as a buffer; :meth:`redraw` draws new ones (every ``redraw_every`` calls in
    training when set). ``head_groups``: consecutive heads that share one draw (the query heads of
    a grouped-query KV head). Keys must use the same features: :meth:`key_map` gives the map for
    them, which reads this map's projection and never redraws on its own. Computed and returned in
    float32 (float64 for float64 input; exponent clamped to +-30).
    """

    name = "performer"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_features: int | None = None,
        redraw_every: int | None = None,
        seed: int | None = None,
        head_groups: int = 1,
    ) -> None:
        super().__init__(num_heads, head_dim)
        if head_groups < 1 or num_heads % head_groups:
            raise ValueError(f"head_groups ({head_groups}) must divide num_heads ({num_heads})")
        self.feature_dim = num_features or head_dim
        self.redraw_every = redraw_every
        self.head_groups = head_groups
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.register_buffer("projection", self._draw(), persistent=True)
        self.register_buffer("_calls", torch.zeros((), dtype=torch.long), persistent=False)

    def _draw(self) -> torch.Tensor:
        """Orthogonal random features ``[H, D, m]`` scaled by chi-distributed row norms."""
        d, m = self.head_dim, self.feature_dim
        mats = []
        for _ in range(self.num_heads // self.head_groups):
            blocks = []
            for _ in range(math.ceil(m / d)):
                g = torch.randn(d, d, generator=self._generator)
                qmat, r = torch.linalg.qr(g)
                # LAPACK's QR fixes the signs of diag(R), which biases Q's rows towards some
                # directions (measured: the estimate of exp(q.k) ~9% off along the axes); flipping
                # each column by sign(R_ii) makes Q Haar-distributed
                qmat = qmat * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
                blocks.append(qmat.T)
            w = torch.cat(blocks, dim=0)[:m]  # [m, D], orthogonal rows within each block
            norms = torch.randn(m, d, generator=self._generator).norm(dim=1)
            mats.append((w * norms[:, None]).T)  # [D, m]
        return torch.stack(mats).repeat_interleave(self.head_groups, dim=0)

    @torch.no_grad()
    def redraw(self) -> None:
        self.projection.copy_(self._draw().to(self.projection.device))

    def key_map(self, group: int = 1) -> PerformerKeyMap:
        """The map for keys with ``num_heads // group`` heads (KV head ``j`` takes query head
        ``j * group``'s features, which its whole query group shares when ``head_groups == group``)."""
        if group < 1 or self.num_heads % group or (group > 1 and self.head_groups % group):
            raise ValueError(
                f"a key map over groups of {group} query heads needs num_heads ({self.num_heads}) and "
                f"head_groups ({self.head_groups}) divisible by it"
            )
        return PerformerKeyMap(self, group)

    def features(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if self.training and self.redraw_every:
            if int(self._calls) > 0 and int(self._calls) % self.redraw_every == 0:
                self.redraw()
            self._calls += 1
        return self.favor(x, self.projection)

    def favor(self, x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        """FAVOR+ features of ``x [B, T, H, D]`` under ``projection [H, D, m]``: ``[B, T, H, m]`` float32
        (float64 for float64 x)."""
        xs = x.to(_cdt(x)) / self.head_dim**0.25
        proj = torch.einsum("bthd,hdm->bthm", xs, projection.to(xs.dtype))
        sq = 0.5 * (xs * xs).sum(-1, keepdim=True)
        return torch.exp((proj - sq).clamp(-EXP_CLAMP, EXP_CLAMP)) / math.sqrt(self.feature_dim)


class PerformerKeyMap(FeatureMap):
    """Keys' side of a :class:`PerformerFeatureMap` (``source``): the same random features, read
    from the source at every call, so a redraw (counted on the query calls only, once per q/k pair)
    changes both sides at once. Holds no buffer of its own: the source owns the projection."""

    name = "performer"

    def __init__(self, source: PerformerFeatureMap, group: int = 1) -> None:
        super().__init__(source.num_heads // group, source.head_dim)
        self.feature_dim = source.feature_dim
        self.group = group
        self._source = [source]  # a list, not a submodule: one owner of the projection in state dicts

    @property
    def source(self) -> PerformerFeatureMap:
        return self._source[0]

    def features(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self.source.favor(x, self.source.projection[:: self.group])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # fmt: skip
        # checkpoints from before this class held the key map's own copy of the projection: the
        # source's copy wins (they were equal, or the keys were wrong: GQA)
        state_dict.pop(prefix + "projection", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip


class CosFormerFeatureMap(FeatureMap):
    """cosFormer (Qin et al., 2022): ReLU features re-weighted by ``cos(pi i / 2M)`` at position i.

    ``cos(pi (i - j) / 2M) = cos_i cos_j + sin_i sin_j`` decomposes, so the features are
    ``[relu(x) cos(pi i / 2M), relu(x) sin(pi i / 2M)]`` (feature_dim = 2D). ``positions``
    ``[B, T]`` (default ``0..T-1``) must be given for decoding; ``M = max_length`` is fixed so that
    prefill and token-by-token decoding agree. Positions must stay below ``M``.
    """

    name = "cosformer"

    def __init__(self, num_heads: int, head_dim: int, max_length: int = 4096) -> None:
        super().__init__(num_heads, head_dim)
        self.max_length = int(max_length)
        self.feature_dim = 2 * head_dim

    def features(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        b, t = x.shape[:2]
        if positions is None:
            positions = torch.arange(t, device=x.device).expand(b, t)
        if positions.shape != (b, t):
            raise ValueError(f"cosformer: positions must be [B, T] = {(b, t)}, got {tuple(positions.shape)}")
        if int(positions.max()) >= self.max_length:
            raise ValueError(
                f"cosformer: position {int(positions.max())} >= max_length {self.max_length}; "
                "build the map with a larger max_length"
            )
        cd = _cdt(x)
        angle = (math.pi / (2 * self.max_length)) * positions.to(cd)  # [B, T]
        r = F.relu(x.to(cd))
        out = torch.cat([r * angle.cos()[..., None, None], r * angle.sin()[..., None, None]], dim=-1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_length={self.max_length}"


class T2RFeatureMap(FeatureMap):
    """T2R (Kasai et al., 2021): trainable one-layer ReLU MLP per head, ``relu(x W + b)``.

    Trained end to end (T2R) or with the attention-distillation loss (T2R-HH). Parameters
    ``weight [H, D, F]``, ``bias [H, F]``; ``init="random"`` (T2R's choice) or ``"identity"``.
    """

    name = "t2r"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_dim: int | None = None,
        bias: bool = True,
        init: Literal["identity", "random"] = "random",
    ) -> None:
        super().__init__(num_heads, head_dim)
        self.feature_dim = feature_dim or head_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, self.feature_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, self.feature_dim)) if bias else None
        if init not in ("identity", "random"):
            raise ValueError(f"init must be 'identity' or 'random', got {init!r}")
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "identity":
                self.weight.copy_(torch.eye(self.head_dim, self.feature_dim).expand(self.num_heads, -1, -1))
            else:
                nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.head_dim))
            if self.bias is not None:
                self.bias.zero_()

    def features(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        cd = _cdt(x)
        z = torch.einsum("bthd,hdf->bthf", x.to(cd), self.weight.to(cd))
        if self.bias is not None:
            z = z + self.bias.to(cd)
        return F.relu(z).to(x.dtype)


_REGISTRY: dict[str, Callable[..., FeatureMap]] = {}


def register_feature_map(name: str, factory: Callable[..., FeatureMap]) -> None:
    """Add a feature map to the registry (``factory(num_heads=, head_dim=, **kwargs)``)."""
    if name in _REGISTRY:
        raise ValueError(f"feature map {name!r} is already registered")
    _REGISTRY[name] = factory


for _cls in (
    HedgehogFeatureMap,
    EluFeatureMap,
    ReluFeatureMap,
    PerformerFeatureMap,
    CosFormerFeatureMap,
    ExpFeatureMap,
    Taylor2FeatureMap,
    T2RFeatureMap,
):
    register_feature_map(_cls.name, _cls)
# Common aliases used in the paper's tables.
register_feature_map("hedgehog_exp", lambda **kw: HedgehogFeatureMap(activation="exp", **kw))
register_feature_map("t2r_hh", T2RFeatureMap)  # same map; the "HH" is the distillation loss


def available_feature_maps() -> list[str]:
    return sorted(_REGISTRY)


def build_feature_map(name: str, *, num_heads: int, head_dim: int, **kwargs) -> FeatureMap:
    """Build a registered feature map by name; unknown names raise listing the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature map {name!r}; valid names: {', '.join(available_feature_maps())}")
    try:
        return _REGISTRY[name](num_heads=num_heads, head_dim=head_dim, **kwargs)
    except TypeError as err:  # an unexpected keyword for this map: say which map and what came
        raise TypeError(f"feature map {name!r} rejected arguments {sorted(kwargs)}: {err}") from err
