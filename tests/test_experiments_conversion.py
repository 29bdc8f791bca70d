"""Conversion experiments at smoke size (tiny random BERT / Llama, synthetic data): every stage runs,
the report, plots and attention snapshots are written, and the snapshots are valid weights."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from hedgehog_attention.experiments.attention_maps import load_snapshots  # noqa: E402
from hedgehog_attention.experiments.attention_maps import main as maps_main  # noqa: E402
from hedgehog_attention.experiments.finetuned_conversion import main as fc_main  # noqa: E402
from hedgehog_attention.experiments.pretrained_conversion import main as pc_main  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _check_snapshots(path: Path, methods: set[str], causal: bool) -> None:
    snaps, meta = load_snapshots(path)
    assert set(snaps) == methods
    for d in snaps.values():
        for key in ("softmax", "linear"):
            w = d[key]  # [L, H, T, T]
            assert np.isfinite(w).all() and (w >= 0).all()
            np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-4)
            if causal:
                assert np.allclose(np.triu(w, 1), 0)
    assert len(meta["tokens"]) == snaps[next(iter(methods))]["linear"].shape[-1]


def test_finetuned_conversion_smoke(tmp_path):
    out = tmp_path / "fc"
    rc = fc_main(
        [
            "--config", str(CONFIGS / "finetuned_conversion_smoke.yaml"), "--out", str(out),
            "--set", "teacher.epochs=1", "--set", "convert.distill_steps=4", "--set", "data.synthetic_size=64",
            "--set", "methods=[{name: t2r, feature_map: t2r}, {name: hedgehog, feature_map: hedgehog, distill: true}]",
        ]
    )  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert [m["method"] for m in res["methods"]] == ["t2r", "hedgehog"]
    hh = res["methods"][1]
    assert hh["distill"] and hh["distill_steps"] >= 1
    assert 0 <= hh["test_accuracy"] <= 1 and 0 <= res["teacher"]["test_accuracy"] <= 1
    # Hedgehog's map (identity init, distilled) is monotone in q.k; T2R's random ReLU map is not.
    assert hh["monotonicity_linear"] > res["methods"][0]["monotonicity_linear"]
    md = (out / "finetuned_conversion.md").read_text()
    assert "% of teacher" in md and "| hedgehog | yes |" in md
    # The table holds each method's own numbers; % of teacher = test accuracy / teacher test accuracy.
    teacher = res["teacher"]["test_accuracy"]
    assert f"test accuracy **{100 * teacher:.1f}%**" in md
    for m in res["methods"]:
        row = (
            f"| {m['method']} | {'yes' if m['distill'] else 'no'} | {100 * m['test_accuracy']:.1f} | "
            f"{100 * m['test_accuracy'] / teacher:.1f}% | {100 * m['dev_accuracy_after_swap']:.1f} | "
            f"{m['entropy_linear']:.2f} | {m['monotonicity_linear']:.2f} | {m['kl']:.3f} |"
        )
        assert row in md, (row, md)
    assert (out / "monotonicity.png").exists() and (out / "attention_maps_layer0.png").exists()
    _check_snapshots(out / "attention_maps.npz", {"t2r", "hedgehog"}, causal=False)
    # --report-only re-renders the table from results.json (how a partial run is reported).
    (out / "finetuned_conversion.md").unlink()
    cfg_arg = ["--config", str(CONFIGS / "finetuned_conversion_smoke.yaml"), "--out", str(out)]
    assert fc_main([*cfg_arg, "--report-only"]) == 0
    assert "| hedgehog | yes |" in (out / "finetuned_conversion.md").read_text()
    # The standalone renderer reads the same file.
    assert maps_main(["--from", str(out / "attention_maps.npz"), "--out", str(tmp_path / "maps")]) == 0
    assert (tmp_path / "maps" / "attention_maps_layer0.png").stat().st_size > 1000
    # The entropy table holds the heads' mean of the per-panel entropies, teacher first.
    import torch

    from hedgehog_attention.experiments.attention_maps import entropy_table
    from hedgehog_attention.metrics import attention_entropy

    snaps, meta = load_snapshots(out / "attention_maps.npz")
    table = entropy_table(snaps, meta).splitlines()
    assert table[2].startswith("| softmax (teacher) |") and table[4].startswith("| hedgehog |")
    w = snaps["hedgehog"]["linear"][0]  # [H, T, T]
    want = np.mean([float(attention_entropy(torch.from_numpy(h)[None, None]).mean()) for h in w])
    assert table[4] == f"| hedgehog | {want:.2f} |"


def test_pretrained_conversion_smoke(tmp_path):
    out = tmp_path / "pc"
    rc = pc_main(
        [
            "--config", str(CONFIGS / "pretrained_conversion_smoke.yaml"), "--out", str(out),
            "--set", "stages.distill_steps=4", "--set", "stages.finetune_steps=20",
            "--set", "methods=[{name: hedgehog, feature_map: hedgehog, distill: true}, "
            "{name: 1+elu, feature_map: elu}]",
        ]
    )  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    for m in res["methods"]:
        # Finetuning on the (learnable) training stream lowers held-out perplexity after the swap.
        assert m["test_ppl"] < m["ppl_after_swap"]
        assert m["finetune_tokens"] == 20 * 8 * 32
    assert res["methods"][0]["distill_tokens"] == res["methods"][0]["distill_steps"] * 8 * 32 > 0
    assert res["methods"][1]["distill_tokens"] == 0
    md = (out / "pretrained_conversion.md").read_text()
    assert "softmax (original)" in md and "finetune tokens" in md
    # The table holds each method's own numbers.
    assert f"| softmax (original) | - | {res['original_test_ppl']:.2f} | - | - | 0 | 0 |" in md
    for m in res["methods"]:
        after_distill = f"{m['ppl_after_distill']:.1f}" if m["distill"] else "-"
        row = (
            f"| {m['method']} | {'yes' if m['distill'] else 'no'} | {m['test_ppl']:.2f} | {m['ppl_after_swap']:.1f} | "
            f"{after_distill} | {m['distill_tokens']:,} | {m['finetune_tokens']:,} |"
        )
        assert row in md, (row, md)
    # The original model's perplexity = exp(mean next-token NLL) over the test blocks (one batch of 8
    # here), recomputed from the model and blocks the run loads.
    import torch
    import torch.nn.functional as F

    from hedgehog_attention.experiments.common import load_config
    from hedgehog_attention.experiments.pretrained_conversion import PretrainedConversionConfig, load_model_and_blocks

    cfg = load_config(PretrainedConversionConfig, CONFIGS / "pretrained_conversion_smoke.yaml")
    model, _, blocks = load_model_and_blocks(cfg)
    test = blocks["test"]
    assert test.shape == (8, 32)
    with torch.no_grad():
        logits = model.eval()(input_ids=test).logits.double()
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), test[:, 1:].flatten())
    assert res["original_test_ppl"] == pytest.approx(float(nll.exp()), rel=1e-4)
    _check_snapshots(out / "attention_maps.npz", {"hedgehog", "1+elu"}, causal=True)


def _tiny_bert_folder(path: Path) -> list[str]:
    """A random 1-layer BertModel + a word-level tokenizer saved like all-MiniLM-L6-v2; returns its words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = [f"w{i}" for i in range(40)]
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    # from_pretrained, not BertTokenizerFast(vocab_file=...): in transformers 5 the latter maps every word to [UNK].
    BertTokenizerFast.from_pretrained(path).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=45, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(path)
    return words


def test_finetuned_conversion_pack_roundtrip(tmp_path):
    """--pack keeps only the used embedding rows (float16); the rebuilt model gives the original's
    outputs on the packed data, and a token outside the kept rows is refused."""
    import torch
    from transformers import AutoModel

    from hedgehog_attention.experiments.common import load_config
    from hedgehog_attention.experiments.finetuned_conversion import (
        FinetunedConversionConfig,
        check_token_ids,
        load_model_and_data,
        make_batches,
        pack,
    )

    words = _tiny_bert_folder(tmp_path / "bert")
    train = [(" ".join(words[i : i + 5]), i % 2) for i in range(0, 20)]
    test = [("w3 w4 w21 w22", 1)]
    cfg = load_config(
        FinetunedConversionConfig,
        CONFIGS / "finetuned_conversion_gpu.yaml",
        ["data.max_length=16", "device=cpu"],
    )
    info = pack(cfg, tmp_path / "carry", rows=(train, test), source=tmp_path / "bert")
    used = {f"w{i}" for i in range(0, 24)}  # train covers w0..w23, test adds w21, w22
    assert info["kept_token_ids"] == len(used) + 5  # + the special tokens
    cfg2 = load_config(
        FinetunedConversionConfig,
        CONFIGS / "finetuned_conversion_gpu.yaml",
        [f"model.path={tmp_path / 'carry' / 'minilm'}", f"data.path={tmp_path / 'carry' / 'fine_food.json.gz'}",
         "data.max_length=16", "device=cpu"],
    )  # fmt: skip
    model, tok, tr, te = load_model_and_data(cfg2)
    assert tr == train and te == test
    batches = make_batches(tr + te, tok, cfg2)
    check_token_ids(batches, cfg2.model.path)
    ref = AutoModel.from_pretrained(tmp_path / "bert", attn_implementation="eager").eval()
    model.eval()
    b = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        got = model.bert(**b).last_hidden_state
        want = ref(**b).last_hidden_state
    torch.testing.assert_close(got, want, atol=5e-3, rtol=5e-3)  # float16 storage
    emb = model.bert.embeddings.word_embeddings.weight
    unused = tok.convert_tokens_to_ids("w39")
    assert float(emb[unused].detach().abs().max()) == 0.0
    bad = [{"input_ids": torch.tensor([[2, unused, 3]])}]
    with pytest.raises(ValueError, match="no embedding row"):
        check_token_ids(bad, cfg2.model.path)


def test_finetuned_conversion_halves_merge(tmp_path):
    """Two runs sharing one teacher (teacher_path), each with --only, merge into one report in
    config order; --only with an unknown name fails with exit code 2."""
    base = ["--config", str(CONFIGS / "finetuned_conversion_smoke.yaml"),
            "--set", f"teacher_path={tmp_path / 'teacher.pt'}", "--set", "teacher.epochs=1",
            "--set", "convert.distill_steps=2", "--set", "data.synthetic_size=64",
            "--set", "convert.backend=reference"]  # fmt: skip
    assert fc_main([*base, "--out", str(tmp_path / "a"), "--only", "hedgehog,t2r"]) == 0
    assert (tmp_path / "teacher.pt").is_file()
    # max_seconds=0: the first method still runs, the next is recorded as skipped.
    assert fc_main([*base, "--out", str(tmp_path / "b"), "--only", "1+elu,t2r-hh", "--set", "max_seconds=0"]) == 0
    ra = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    rb = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    assert ra["teacher"]["test_accuracy"] == rb["teacher"]["test_accuracy"]  # the loaded teacher
    assert fc_main([*base, "--out", str(tmp_path / "m"), "--merge", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())["results"]
    assert [m["method"] for m in merged["methods"]] == ["t2r", "t2r-hh", "hedgehog"]  # config order
    assert merged["skipped_for_time"] == ["1+elu"]
    snaps, _ = load_snapshots(tmp_path / "m" / "attention_maps.npz")
    assert set(snaps) == {"t2r", "t2r-hh", "hedgehog"}
    md = (tmp_path / "m" / "finetuned_conversion.md").read_text()
    assert "| t2r-hh | yes |" in md and "Not run (max_seconds reached): 1+elu." in md
    # Merging the same half twice is refused (a method would be counted twice).
    with pytest.raises(ValueError, match="more than one run"):
        fc_main([*base, "--out", str(tmp_path / "x"), "--merge", str(tmp_path / "a"), str(tmp_path / "a")])
    # A run measured against another teacher (accuracy 2 points off) is refused too.
    shutil.copytree(tmp_path / "b", tmp_path / "other")
    saved = json.loads((tmp_path / "other" / "results.json").read_text())
    saved["results"]["teacher"]["test_accuracy"] += 0.02
    (tmp_path / "other" / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="another teacher"):
        fc_main([*base, "--out", str(tmp_path / "y"), "--merge", str(tmp_path / "a"), str(tmp_path / "other")])
    # Runs with other settings than the merge's config are refused, naming the key: a shared
    # setting, or the settings of one of the run's methods (max_seconds, as run b's, is per run).
    edits = [
        (("convert", "distill_steps", 3), "convert.distill_steps: 3 -> 2"),
        (("methods", "t2r-hh", "distill", False), "'t2r-hh' of .* distill: False -> True"),
    ]
    for edit, match in edits:
        shutil.rmtree(tmp_path / "other")
        shutil.copytree(tmp_path / "b", tmp_path / "other")
        saved = json.loads((tmp_path / "other" / "results.json").read_text())
        if edit[0] == "methods":
            next(m for m in saved["config"]["methods"] if m["name"] == edit[1])[edit[2]] = edit[3]
        else:
            saved["config"][edit[0]][edit[1]] = edit[2]
        (tmp_path / "other" / "results.json").write_text(json.dumps(saved))
        with pytest.raises(ValueError, match=match):
            fc_main([*base, "--out", str(tmp_path / "y"), "--merge", str(tmp_path / "a"), str(tmp_path / "other")])
    # A method the merge's config does not have is refused too.
    with pytest.raises(ValueError, match="not in this config"):
        two = "methods=[{name: t2r, feature_map: t2r}, {name: hedgehog, feature_map: hedgehog, distill: true}]"
        halves = [str(tmp_path / "a"), str(tmp_path / "b")]
        fc_main([*base, "--set", two, "--out", str(tmp_path / "y"), "--merge", *halves])
    assert fc_main([*base, "--out", str(tmp_path / "c"), "--only", "nope"]) == 2


def test_pretrained_conversion_tokens_halves_softmax_baseline(tmp_path):
    """--prepare-data writes the blocks the run uses (a random train subset); data.source=tokens
    reads them back; halves (--only) merge; the softmax-ft baseline finetunes the unconverted model."""
    import torch

    from hedgehog_attention.experiments.common import load_config
    from hedgehog_attention.experiments.pretrained_conversion import PretrainedConversionConfig, load_model_and_blocks

    cfg_path = str(CONFIGS / "pretrained_conversion_smoke.yaml")
    npz = tmp_path / "tokens.npz"
    assert pc_main(["--config", cfg_path, "--set", "data.max_train_blocks=12", "--prepare-data", str(npz)]) == 0
    full = load_model_and_blocks(load_config(PretrainedConversionConfig, cfg_path))[2]
    with np.load(npz) as z:
        assert z["train"].dtype == np.uint16 and z["train"].shape == (12, 32)
        np.testing.assert_array_equal(z["test"], full["test"].numpy())
        train = torch.from_numpy(z["train"].astype(np.int64))
    # Every packed training block is one of the corpus's blocks, and they are not just the first 12.
    rows = {tuple(r) for r in full["train"].tolist()}
    assert all(tuple(r) in rows for r in train.tolist())
    assert not torch.equal(train, full["train"][:12])
    base = ["--config", cfg_path, "--set", "data.source=tokens", "--set", f"data.path={npz}",
            "--set", "stages.distill_steps=2", "--set", "stages.finetune_steps=12", "--set", "backend=reference",
            "--set", "map_tokens=8",
            "--set", "methods=[{name: hedgehog, feature_map: hedgehog, distill: true}, {name: t2r, feature_map: t2r}, "
            "{name: softmax-ft, feature_map: softmax}]"]  # fmt: skip
    assert pc_main([*base, "--out", str(tmp_path / "a"), "--only", "hedgehog"]) == 0
    assert pc_main([*base, "--out", str(tmp_path / "b"), "--only", "softmax-ft,t2r"]) == 0
    assert pc_main([*base, "--out", str(tmp_path / "m"), "--merge", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    res = json.loads((tmp_path / "m" / "results.json").read_text())["results"]
    assert [m["method"] for m in res["methods"]] == ["hedgehog", "t2r", "softmax-ft"]
    sm = res["methods"][2]
    assert sm["test_ppl"] < res["original_test_ppl"] and sm["distill_tokens"] == 0  # finetuning helps
    assert "ppl_after_swap" not in sm
    snaps, meta = load_snapshots(tmp_path / "m" / "attention_maps.npz")
    assert set(snaps) == {"hedgehog", "t2r"} and len(meta["tokens"]) == 8  # map_tokens crops the sample
    assert snaps["hedgehog"]["linear"].shape[-1] == 8
    assert "| softmax-ft | no |" in (tmp_path / "m" / "pretrained_conversion.md").read_text()
    bad = [*base, "--set", "methods=[{name: s, feature_map: softmax, distill: true}]", "--out", str(tmp_path / "z")]
    assert pc_main(bad) == 2


_FC_FAST = ["--config", str(CONFIGS / "finetuned_conversion_smoke.yaml"), "--set", "teacher.epochs=1",
            "--set", "convert.distill_steps=2", "--set", "data.synthetic_size=64",
            "--set", "convert.finetune_epochs=0"]  # fmt: skip


def test_conversion_method_results_do_not_depend_on_the_methods_run_before(tmp_path):
    """A method's random feature-map init is seeded per method: run alone (--only) or after another
    method, it gives the same numbers (halves merged into one report equal one full run)."""
    assert fc_main([*_FC_FAST, "--out", str(tmp_path / "a"), "--only", "t2r-hh"]) == 0
    assert fc_main([*_FC_FAST, "--out", str(tmp_path / "b"), "--only", "t2r,t2r-hh"]) == 0
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text())["results"]["methods"][-1] for d in "ab")
    assert ra["method"] == rb["method"] == "t2r-hh"
    assert ra["kl"] == rb["kl"] and ra["distill_best_eval_loss"] == rb["distill_best_eval_loss"]
    pc = ["--config", str(CONFIGS / "pretrained_conversion_smoke.yaml"), "--set", "stages.distill_steps=2",
          "--set", "stages.finetune_steps=1"]  # fmt: skip
    assert pc_main([*pc, "--out", str(tmp_path / "c"), "--only", "t2r"]) == 0
    assert pc_main([*pc, "--out", str(tmp_path / "d"), "--only", "hedgehog,t2r"]) == 0
    rc, rd = (json.loads((tmp_path / d / "results.json").read_text())["results"]["methods"][-1] for d in "cd")
    assert rc["method"] == rd["method"] == "t2r"
    assert rc["ppl_after_swap"] == rd["ppl_after_swap"] and rc["test_ppl"] == rd["test_ppl"]


def test_finetuned_conversion_report_only_states_the_runs_settings(tmp_path):
    """--report-only renders the settings the run used (saved in results.json), not those of the
    config file it is given (the run had --set overrides)."""
    out = tmp_path / "fc"
    assert fc_main([*_FC_FAST, "--out", str(out), "--only", "1+elu"]) == 0
    run_md = (out / "finetuned_conversion.md").read_text()
    assert "finetuned 1 epochs" in run_md and "<= 2 steps" in run_md
    cfg_arg = ["--config", str(CONFIGS / "finetuned_conversion_smoke.yaml"), "--out", str(out)]
    assert fc_main([*cfg_arg, "--report-only"]) == 0
    md = (out / "finetuned_conversion.md").read_text()
    assert "finetuned 1 epochs" in md and "<= 2 steps" in md and "then 0 epochs" in md
    assert md.split("\n", 4)[4] == run_md.split("\n", 4)[4]  # all but the command line


def test_finetuned_conversion_refuses_a_teacher_of_other_settings(tmp_path):
    """teacher_path saved by a run with another seed (another train/dev split) or recipe is not
    loaded as this config's teacher; the same settings load it."""
    base = [*_FC_FAST, "--set", f"teacher_path={tmp_path / 'teacher.pt'}", "--only", "1+elu"]
    assert fc_main([*base, "--out", str(tmp_path / "a")]) == 0
    assert fc_main([*base, "--out", str(tmp_path / "b"), "--set", "seed=1"]) == 2
    assert fc_main([*base, "--out", str(tmp_path / "c"), "--set", "teacher.lr=0.01"]) == 2
    assert not (tmp_path / "b" / "results.json").exists()
    assert fc_main([*base, "--out", str(tmp_path / "d")]) == 0
    ra, rd = (json.loads((tmp_path / d / "results.json").read_text())["results"] for d in "ad")
    assert ra["teacher"]["test_accuracy"] == rd["teacher"]["test_accuracy"]


@pytest.mark.parametrize("overrides", [["map_heads=[0,7]"], ["map_layers=[2]"], ["map_layers=[-1]"], ["map_layers=[]"]])
def test_conversion_map_indices_are_checked_before_any_training(tmp_path, monkeypatch, overrides):
    """map_layers / map_heads outside the model (smoke: 2 layers, 2 BERT / 4 Llama heads) or empty stop
    the command with exit 2 before the teacher or any method is trained, not at the first snapshot."""
    from hedgehog_attention.experiments import finetuned_conversion as fc
    from hedgehog_attention.experiments import pretrained_conversion as pc

    def trained(*args, **kwargs):
        raise AssertionError("trained before the map indices were checked")

    monkeypatch.setattr(fc, "train_teacher", trained)
    monkeypatch.setattr(fc, "convert_one", trained)
    monkeypatch.setattr(pc, "convert_one", trained)
    sets = [a for o in overrides for a in ("--set", o)]
    assert fc_main([*_FC_FAST, "--out", str(tmp_path / "fc"), *sets]) == 2
    pc_args = ["--config", str(CONFIGS / "pretrained_conversion_smoke.yaml"), "--out", str(tmp_path / "pc")]
    assert pc_main([*pc_args, *[a.replace("[0,7]", "[0,4]") for a in sets]]) == 2
    assert not (tmp_path / "fc" / "results.json").exists() and not (tmp_path / "pc" / "results.json").exists()
    # valid indices pass the same check
    from hedgehog_attention.experiments.common import check_map_indices, load_config

    cfg = load_config(pc.PretrainedConversionConfig, CONFIGS / "pretrained_conversion_smoke.yaml")
    check_map_indices(pc.load_model_and_blocks(cfg)[0], [0, 1], [0, 1, 2, 3])


def test_merge_takes_only_the_snapshots_of_the_methods_a_run_reports(tmp_path):
    """A run killed during its first method leaves an earlier run's attention_maps.npz beside its new
    results.json (no methods yet): --merge must not show those maps (of other settings) as this
    config's; snapshots of other map settings than the config's are refused."""
    from hedgehog_attention.experiments.common import merge_method_runs

    # an earlier run in folder a: hedgehog, with other map heads
    assert fc_main([*_FC_FAST, "--out", str(tmp_path / "a"), "--only", "hedgehog", "--set", "map_heads=[1]"]) == 0
    assert fc_main([*_FC_FAST, "--out", str(tmp_path / "b"), "--only", "hedgehog"]) == 0
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    config = json.loads(json.dumps(saved["config"]))
    # folder a re-run for t2r and killed during it: results.json as run_methods writes it before a method
    saved["config"]["methods"] = [m for m in saved["config"]["methods"] if m["name"] == "t2r"]
    saved["results"]["methods"] = []
    (tmp_path / "a" / "results.json").write_text(json.dumps(saved))
    assert fc_main([*_FC_FAST, "--out", str(tmp_path / "m"), "--merge", str(tmp_path / "b"), str(tmp_path / "a")]) == 0
    merged, meta = load_snapshots(tmp_path / "m" / "attention_maps.npz")
    own, own_meta = load_snapshots(tmp_path / "b" / "attention_maps.npz")
    assert meta == own_meta and meta["heads"] == [0, 1]
    np.testing.assert_array_equal(merged["hedgehog"]["linear"], own["hedgehog"]["linear"])
    # a snapshot file of other map settings than the config (and its results.json) state is refused
    np.savez(tmp_path / "b" / "attention_maps.npz", **{**np.load(tmp_path / "a" / "attention_maps.npz")})
    with pytest.raises(ValueError, match="attention maps"):
        merge_method_runs([tmp_path / "b"], tmp_path / "m2", config=config, method_order=["hedgehog"],
                          baseline=lambda r: 0.0, baseline_name="x", tolerance=0.0)  # fmt: skip
