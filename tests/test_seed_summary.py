"""Multi-seed summary of conversion runs (experiments/seeds.py)."""

import io
import json
import math
import sys

import pytest

from hedgehog_attention.experiments.seeds import load_seed_runs, main, seeds_markdown, summarize_seeds


def _write(tmp_path, seed, teacher, methods):
    p = tmp_path / f"seed{seed}.json"
    p.write_text(
        json.dumps({"config": {"seed": seed}, "results": {"teacher": {"test_accuracy": teacher}, "methods": methods}})
    )
    return p


def test_mean_std_and_pct_of_teacher_per_seed(tmp_path):
    a = _write(
        tmp_path,
        0,
        0.8,
        [{"method": "hedgehog", "test_accuracy": 0.8, "kl": 0.1}, {"method": "t2r", "test_accuracy": 0.6}],
    )
    b = _write(
        tmp_path,
        1,
        0.9,
        [{"method": "hedgehog", "test_accuracy": 0.72, "kl": 0.3}, {"method": "elu", "test_accuracy": 0.45}],
    )
    s = summarize_seeds(load_seed_runs([a, b]))
    hh = s["methods"]["hedgehog"]
    assert hh["test_accuracy"]["values"] == [0.8, 0.72]
    assert hh["test_accuracy"]["mean"] == pytest.approx(0.76)
    assert hh["test_accuracy"]["std"] == pytest.approx(math.sqrt(2 * 0.04**2))
    # % of teacher per seed against that seed's teacher: 1.0 and 0.8
    assert hh["pct_of_teacher"]["values"] == pytest.approx([1.0, 0.8])
    assert hh["kl"]["mean"] == pytest.approx(0.2)
    # a method present in one seed only: n = 1, no std
    assert s["methods"]["t2r"]["test_accuracy"]["n"] == 1 and math.isnan(s["methods"]["t2r"]["test_accuracy"]["std"])
    # ... and its % of teacher is against the teacher of the seed it ran in (seed 1's 0.9 for elu)
    assert s["methods"]["t2r"]["pct_of_teacher"]["values"] == pytest.approx([0.75])
    assert s["methods"]["elu"]["pct_of_teacher"]["values"] == pytest.approx([0.5])
    assert s["teacher"]["values"] == [0.8, 0.9] and s["teacher"]["mean_std"] == pytest.approx((0.85, 0.1 / 2**0.5))
    md = seeds_markdown(s)
    assert md.splitlines()[0].startswith("Seeds [0, 1]; teacher test accuracy 85.0 ± 7.1% (per seed: 80.0, 90.0).")
    assert md.splitlines()[4:] == [  # methods in order of first appearance; "-" where a metric is missing
        "| hedgehog | 76.0 ± 5.7 (2) | 90.0 ± 14.1 (2) | - | 0.200 ± 0.141 (2) | - | 80.0, 72.0 |",
        "| t2r | 60.0 (1) | 75.0 (1) | - | - | - | 60.0, - |",
        "| elu | 45.0 (1) | 50.0 (1) | - | - | - | -, 45.0 |",
    ]
    out = tmp_path / "t.md"
    main([str(a), str(b), "--out", str(out)])
    assert out.read_text() == md and json.loads(out.with_suffix(".json").read_text())["seeds"] == [0, 1]


def test_rejects_duplicate_seeds_and_foreign_files(tmp_path):
    a = _write(tmp_path, 0, 0.8, [{"method": "x", "test_accuracy": 0.5}])
    with pytest.raises(ValueError, match="distinct seeds"):
        load_seed_runs([a, a])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": {"methods": []}}))
    with pytest.raises(ValueError, match="not a conversion results file"):
        load_seed_runs([bad])


def test_per_seed_values_name_their_seeds(tmp_path):
    """A method missing from a seed: its per-seed values stay under their own seeds, not the first ones."""
    runs = [
        _write(tmp_path, 3, 0.8, [{"method": "hh", "test_accuracy": 0.7}]),
        _write(tmp_path, 5, 0.9, [{"method": "hh", "test_accuracy": 0.8}, {"method": "elu", "test_accuracy": 0.5}]),
        _write(tmp_path, 7, 0.9, [{"method": "hh", "test_accuracy": 0.9}]),
    ]
    s = summarize_seeds(load_seed_runs(runs))
    assert s["methods"]["elu"]["test_accuracy"]["seeds"] == [5]
    assert s["methods"]["hh"]["pct_of_teacher"]["seeds"] == [3, 5, 7]
    rows = seeds_markdown(s).splitlines()
    assert rows[0].startswith("Seeds [3, 5, 7];")
    assert rows[4].endswith("| 70.0, 80.0, 90.0 |") and rows[5].endswith("| -, 50.0, - |")


def test_main_refuses_a_json_out_and_keeps_old_files_when_a_write_fails(tmp_path, monkeypatch):
    a = _write(tmp_path, 0, 0.8, [{"method": "hh", "test_accuracy": 0.6}])
    out = tmp_path / "seeds.md"
    main([str(a), "--out", str(out)])
    before = {p.name: p.read_text() for p in tmp_path.glob("seeds*")}
    assert sorted(before) == ["seeds.json", "seeds.md"]
    # --out x.json: the summary would overwrite the markdown table it was asked to write
    with pytest.raises(SystemExit):
        main([str(a), "--out", str(tmp_path / "table.json")])
    assert not (tmp_path / "table.json").exists()
    # a write that fails midway (a name that cannot be encoded) leaves the previous table and summary whole
    b = _write(tmp_path, 1, 0.7, [{"method": "hh \ud800", "test_accuracy": 0.5}])
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # the table is printed before it is written
    with pytest.raises(UnicodeEncodeError):
        main([str(b), "--out", str(out)])
    assert {p.name: p.read_text() for p in tmp_path.glob("seeds*")} == before
