"""benchmarks/llm_stages.py runs every stage end to end on a small random Llama and writes the figures it prints."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
stages = load_benchmark("benchmarks_llm_stages", ROOT / "benchmarks" / "llm_stages.py")


def test_llm_stages_runs_each_stage_and_writes_its_rows_as_json(tmp_path, capsys):
    out = tmp_path / "stages.json"
    report = stages.main(["--model", "random-llama", "--batch", "2", "--seq", "12", "--new-tokens", "3",
                          "--train-steps", "1", "--extract-batches", "1", "--ranks", "4", "--repeats", "1",
                          "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["rows"]
    assert all(set(r) == set(stages.COLUMNS) for r in rows)
    assert {r["stage"] for r in rows} == {"load", "generate", "extract", "train"}
    ratios = [r for r in rows if r["ratio_cpu"] is not None]
    # every stage has at least one ratio to its plain operation, and every figure is a positive number
    assert {r["stage"] for r in ratios} == {"load", "generate", "extract", "train"}
    assert all(r["wall_s"] > 0 and r["cpu_s"] >= 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert all(r["ratio_cpu"] >= 0 and r["ratio_wall"] > 0 for r in ratios)
    assert "| load | load_model(dir) |" in capsys.readouterr().out
