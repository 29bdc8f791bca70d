"""Conversion experiments at smoke size (tiny random BERT / Llama, synthetic data): every stage runs,
the report, plots and attention snapshots are written, and the snapshots are valid weights."""

import json
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
    _check_snapshots(out / "attention_maps.npz", {"hedgehog", "1+elu"}, causal=True)
