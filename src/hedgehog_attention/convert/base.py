"""Model surgery the PEFT way: explicit targets, replace through the parent, keep the original.

A converted layer is a :class:`LinearizedAttention` that holds

* ``original``: the HF attention module, untouched (its projections are reused, so the swap adds
  only the feature maps, and :func:`unlinearize` puts it back exactly);
* ``attn``: a :class:`hedgehog_attention.LinearAttention` (feature maps + the linear-attention op).

Each architecture contributes a small subclass that knows how its attention projects
``hidden_states`` to ``q, k, v`` (after RoPE for Llama) and how it maps the head outputs back; the
rest (masks, decode state, distillation capture) lives here once.
"""

from __future__ import annotations

import functools
import inspect
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..attention import LinearAttention
from .config import LinearizeConfig

__all__ = [
    "Adapter",
    "ConversionReport",
    "LinearizedAttention",
    "find_targets",
    "key_padding_mask",
    "linearize",
    "linearized_modules",
    "register_adapter",
    "unlinearize",
]


# ---------------------------------------------------------------------------------------- masks
def key_padding_mask(attention_mask: torch.Tensor | None, q_len: int, *, causal: bool) -> torch.Tensor | None:
    """The ``[B, q_len]`` bool padding mask (True = real token) of the current tokens, or None.

    HF attention modules receive the mask in the form their attention implementation wants: None
    (no padding), 2-D ``[B, Tk]`` (flash-attention), 4-D bool ``[B, 1, Tq, Tk]`` (sdpa, True =
    attend) or 4-D additive float (eager, 0 = attend, dtype min = masked). A key is a real token
    when at least one query sees it. The 4-D mask must be exactly "causal (or bidirectional) AND key
    padding": a sliding window, packed sequences or a custom pattern would be silently ignored by
    linear attention, so they raise instead.
    """
    if attention_mask is None:
        return None
    # Every converted layer of one forward receives the same mask tensor: check it and reduce it
    # once, not once per layer. The check ends in host syncs (torch.equal, bool(m.all())) that stall
    # the CPU until the GPU has caught up; per layer they cost the CPU/GPU overlap of the whole
    # forward (measured: 2 syncs x 30 layers per SmolLM2 distillation step).
    key = _mask_memo_key(attention_mask, q_len, causal)
    if key is not None and _MASK_MEMO[0] is not None:
        ref, memo_key, memo_out = _MASK_MEMO[0]
        if ref() is attention_mask and memo_key == key:
            return memo_out
    out = _key_padding_mask(attention_mask, q_len, causal=causal)
    if key is not None:
        _MASK_MEMO[0] = (weakref.ref(attention_mask), key, out)
    return out


# (weakref to the last mask, (version, q_len, causal), result): the weak reference makes a freed
# mask (whose id a new tensor may reuse) miss, and the version counter an in-place change.
_MASK_MEMO: list = [None]


def _mask_memo_key(attention_mask, q_len: int, causal: bool):
    if not isinstance(attention_mask, torch.Tensor):
        return None
    try:
        return (attention_mask._version, q_len, causal)
    except RuntimeError:  # inference tensors have no version counter: no memo
        return None


def _key_padding_mask(attention_mask: torch.Tensor, q_len: int, *, causal: bool) -> torch.Tensor | None:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"linear attention needs a tensor attention mask, got {type(attention_mask).__name__}; load the "
            "model with attn_implementation='eager' or 'sdpa' (flex-attention BlockMasks are not supported)"
        )
    if attention_mask.dim() == 2:
        m = attention_mask[:, -q_len:].to(torch.bool)
    elif attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            vis = attention_mask[:, 0]
        else:
            vis = attention_mask[:, 0] > torch.finfo(attention_mask.dtype).min / 2
        tq, tk = vis.shape[-2:]
        if tq != q_len:
            raise ValueError(f"attention mask covers {tq} queries but the layer got {q_len} tokens")
        keys = vis.any(dim=-2)  # [B, Tk]
        expected = keys[:, None, :].expand_as(vis)
        if causal:
            i = torch.arange(tq, device=vis.device)[:, None] + (tk - tq)
            j = torch.arange(tk, device=vis.device)[None, :]
            expected = expected & (j <= i)
        if not torch.equal(vis, expected):
            raise ValueError(
                "the attention mask is not a plain "
                f"{'causal' if causal else 'bidirectional'} padding mask (sliding window, packed sequences or "
                "a custom pattern?); linear attention supports padding masks only ([B, T] real-token masks)"
            )
        m = keys[:, -q_len:]
    else:
        raise ValueError(f"expected a 2-D or 4-D attention mask, got shape {tuple(attention_mask.shape)}")
    return None if bool(m.all()) else m


# ---------------------------------------------------------------------------------------- wrapper
class LinearizedAttention(nn.Module):
    """Base of the converted attention modules (one subclass per architecture).

    Subclasses implement :meth:`project` (``hidden_states -> q [B,T,H,D], k, v [B,T,Hk,D]``),
    :meth:`output` (``o [B,T,H,D] -> [B,T,hidden]``) and a ``forward`` with the original module's
    signature that calls :meth:`attend`.

    The feature maps are kept in float32 whatever the model dtype (their optimizer needs the
    precision; the maps compute in float32 internally anyway) and on the original's device.
    """

    architecture: str = "base"

    def __init__(
        self,
        original: nn.Module,
        *,
        name: str,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        causal: bool,
        scale: float,
        config: LinearizeConfig,
    ) -> None:
        super().__init__()
        self.original = original
        self.name = name
        self.layer_idx = layer_idx
        self.scale = float(scale)
        p = next(original.parameters())
        self.attn = LinearAttention(
            num_heads,
            head_dim,
            num_kv_heads,
            feature_map=config.feature_map,
            feature_map_kwargs=config.feature_map_kwargs,
            tie_qk=config.tie_qk,
            causal=causal,
            backend=config.backend,
            eps=config.eps,
        ).to(device=p.device)
        # Set only by convert.distill.TeacherCapture for the duration of its `with` block: while set,
        # the layer reports its (q, k, v) to the collector and returns the original softmax output.
        self._collector = None

    @property
    def causal(self) -> bool:
        return self.attn.causal

    # -- architecture-specific ------------------------------------------------------------------
    def project(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def output(self, o: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def attend(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache,
        teacher: Callable[[], tuple],
        **project_kwargs,
    ) -> tuple[torch.Tensor, None]:
        q, k, v = self.project(hidden_states, **project_kwargs)  # (B, T, H, D), (B, T, Hk, D) x2
        layer = None
        if self._collector is None and cache is not None and self.causal:
            from .generation import linear_state_layer

            # before the mask: an unsupported cache says so instead of failing the mask check
            layer = linear_state_layer(cache, self.layer_idx)
        key_mask = key_padding_mask(attention_mask, q.shape[1], causal=self.causal)
        if self._collector is not None:
            self._collector.observe(self, q, k, v, key_mask)
            return teacher()
        # A position-dependent map (cosFormer) defaults to positions 0..T-1: after a state the new
        # tokens continue at `seen`, as in the full forward. (Hedgehog maps ignore positions; leaving
        # them out keeps the fused kernel eligible.)
        positions = None
        if layer is not None and layer.seen > 0 and not self.attn._fused_hedgehog():
            positions = torch.arange(layer.seen, layer.seen + q.shape[1], device=q.device).expand(q.shape[0], -1)
        out = self.attn(
            q,
            k,
            v,
            attention_mask=key_mask,
            positions=positions,
            state=None if layer is None else layer.state,
            use_cache=layer is not None,
        )
        if layer is not None:
            layer.advance(out.state, q.shape[1])
        return self.output(out.o), None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layer_idx={self.layer_idx}, scale={self.scale:.4g}"


@functools.cache
def _cache_kwarg(cls: type) -> str:
    """The name under which ``cls.forward`` takes its KV cache: transformers renamed
    ``past_key_values`` to ``cache`` in its 5.2x releases (5.17 has the old name, 5.24 the new)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwargs(module: nn.Module, cache) -> dict:
    """``{name: cache}`` for calling ``module`` (an attention module or a whole model) with a cache,
    under the keyword its transformers version uses."""
    return {_cache_kwarg(type(module)): cache}


# ---------------------------------------------------------------------------------------- adapters
@dataclass(frozen=True)
class Adapter:
    """How to find and convert one architecture's attention modules.

    ``class_names``: attention classes this adapter converts (matched on ``type(m).__name__`` plus
    the attribute check in ``accepts``, so same-shaped families such as Mistral reuse Llama's).
    ``build(original, name, layer_idx, config) -> LinearizedAttention``.
    """

    name: str
    class_names: tuple[str, ...]
    accepts: Callable[[nn.Module], bool]
    build: Callable[..., LinearizedAttention]
    lora_targets: tuple[str, ...]

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.class_names and self.accepts(module)


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> None:
    """Add an architecture (see ``convert/bert.py`` for a complete example)."""
    _ADAPTERS[adapter.name] = adapter


def _ensure_builtin_adapters() -> None:
    from . import bert, gpt2, llama  # noqa: F401  (modules register themselves)


def available_adapters() -> dict[str, Adapter]:
    _ensure_builtin_adapters()
    return dict(_ADAPTERS)


def _attention_like(model: nn.Module) -> list[str]:
    pat = re.compile(r"attention|attn", re.IGNORECASE)
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and pat.search(type(m).__name__)]


def _supported() -> str:
    return "; ".join(f"{a.name}: {', '.join(a.class_names)}" for a in available_adapters().values())


def _refused(named) -> str:
    """The note for modules of a supported class that their adapter's ``accepts`` turned down."""
    names = [
        f"{n} ({type(m).__name__})"
        for n, m in named
        if any(type(m).__name__ in a.class_names and not a.accepts(m) for a in available_adapters().values())
    ]
    if not names:
        return ""
    return (
        f"; refused although of a supported class: {names} (a configuration linear attention cannot reproduce, "
        "e.g. sliding-window or cross-attention)"
    )


def find_targets(model: nn.Module, targets: list[str] | None = None) -> tuple[Adapter, list[tuple[str, nn.Module]]]:
    """The adapter and the ``(name, module)`` attention modules it converts, in model order.

    Raises ``ValueError`` listing the attention-like modules found when nothing matches, when an
    explicit target does not exist or is not a supported attention module, or when the model
    mixes architectures.
    """
    adapters = available_adapters()
    modules = dict(model.named_modules())
    if targets is not None:
        missing = [t for t in targets if t not in modules]
        if missing:
            raise ValueError(
                f"target module(s) {missing} not found in {type(model).__name__}; attention-like modules: "
                f"{_attention_like(model) or 'none'}"
            )
        found = [(t, modules[t]) for t in targets]
    else:
        found = [(n, m) for n, m in modules.items() if any(a.matches(m) for a in adapters.values())]
    if not found:
        raise ValueError(
            f"no supported attention module found in {type(model).__name__}; attention-like modules: "
            f"{_attention_like(model) or 'none'}; supported classes: {_supported()}{_refused(modules.items())}"
        )
    used = set()
    for n, m in found:
        match = [a for a in adapters.values() if a.matches(m)]
        if not match:
            raise ValueError(
                f"module {n!r} ({type(m).__name__}) is not a supported attention module; supported classes: "
                f"{_supported()}{_refused([(n, m)])}"
            )
        used.add(match[0].name)
    if len(used) > 1:
        raise ValueError(f"targets span several architectures {sorted(used)}; convert them one at a time")
    return adapters[used.pop()], found


# ---------------------------------------------------------------------------------------- swap
@dataclass
class ConversionReport:
    """What :func:`linearize` did."""

    architecture: str
    feature_map: str
    converted: list[str] = field(default_factory=list)
    kept_softmax: list[str] = field(default_factory=list)
    trainable_parameters: int = 0
    config: LinearizeConfig | None = None

    def __str__(self) -> str:
        lines = [
            f"linearized {len(self.converted)} attention module(s) ({self.architecture}) with feature map "
            f"{self.feature_map!r}; {self.trainable_parameters:,} feature-map parameters"
        ]
        lines += [f"  linear : {n}" for n in self.converted]
        lines += [f"  softmax: {n}" for n in self.kept_softmax]
        return "\n".join(lines)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def linearized_modules(model: nn.Module) -> list[tuple[str, LinearizedAttention]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LinearizedAttention)]


def linearize(model: nn.Module, config: LinearizeConfig | None = None) -> ConversionReport:
    """Swap the model's attention modules for linear attention, in place.

    The original modules stay inside the new ones (``.original``) so :func:`unlinearize` restores
    the model exactly. Layers in ``config.keep_softmax_layers`` (indices into the list of targets)
    are left as they are. The result is also stored on the model as ``model.hedgehog_conversion``.
    """
    config = config or LinearizeConfig()
    if model is None or not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if linearized_modules(model):
        raise ValueError("the model is already linearized; call unlinearize(model) first")
    adapter, found = find_targets(model, config.targets)
    n = len(found)
    keep = set()
    for i in config.keep_softmax_layers:
        if not -n <= i < n:
            raise ValueError(f"keep_softmax_layers index {i} out of range for {n} attention layers")
        keep.add(i % n)
    report = ConversionReport(adapter.name, config.feature_map, config=config)
    for i, (name, module) in enumerate(found):
        if i in keep:
            report.kept_softmax.append(name)
            continue
        layer_idx = getattr(module, "layer_idx", None)
        wrapper = adapter.build(module, name=name, layer_idx=i if layer_idx is None else int(layer_idx), config=config)
        parent, child = _parent(model, name)
        setattr(parent, child, wrapper)
        report.converted.append(name)
        report.trainable_parameters += sum(p.numel() for p in wrapper.attn.parameters() if p.requires_grad)
    if not report.converted:
        raise ValueError(f"keep_softmax_layers={config.keep_softmax_layers} keeps all {n} layers: nothing to convert")
    model.hedgehog_conversion = report
    return report


def unlinearize(model: nn.Module) -> list[str]:
    """Put every original attention module back (exact undo of :func:`linearize`); returns the names."""
    names = []
    for name, wrapper in linearized_modules(model):
        parent, child = _parent(model, name)
        setattr(parent, child, wrapper.original)
        names.append(name)
    if not names:
        raise ValueError("the model has no linearized attention module to undo")
    if hasattr(model, "hedgehog_conversion"):
        del model.hedgehog_conversion
    return names


def feature_map_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every converted layer's feature maps (what distillation trains)."""
    seen, out = set(), []
    for _, m in linearized_modules(model):
        for p in m.attn.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
