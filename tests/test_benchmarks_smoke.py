"""The end-to-end benchmarks run on the CPU with a tiny model, so they cannot rot between GPU runs.

No speed is asserted: only that every script runs, writes the JSON fields the GPU run reports, and
that the synthetic cache fill they time is the state a real prefill leaves.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import e2e_common as common  # noqa: E402
from centroidkv.cache import CentroidKVCache, CentroidKVLayer  # noqa: E402
from centroidkv.policies import PlainClustering  # noqa: E402


def run_script(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{Path(script).stem}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--tiny", *args, "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


# ------------------------------------------------------------- synthetic fill == real prefill
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("seen", [1, 67, 68, 131, 133, 500, 1027])
@pytest.mark.parametrize("recent", [0, 64])
@pytest.mark.parametrize("policy", ["plain", "default"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_synthetic_fill_matches_real_prefill(ratio, seen, recent, policy, static):
    shape = common.Shape(**{**common.TINY.__dict__, "layers": 1})
    batch = 2
    horizon = dict(max_cache_len=seen + 700) if static else {}
    real = CentroidKVCache(ratio=ratio, recent=recent, policy=common.make_policy(policy), **horizon)
    layer = CentroidKVLayer(real.options)
    keys = torch.randn(batch, shape.kv_heads, seen, shape.head_dim)
    with torch.inference_mode():
        layer.update(keys, torch.randn_like(keys))
        layer.settle()
    synthetic = CentroidKVCache(ratio=ratio, recent=recent, policy=common.make_policy(policy), **horizon)
    layout = common.fill_centroidkv(synthetic, shape, batch, seen, "cpu", torch.float32)
    fake = synthetic.layers[0]

    assert fake.lengths == layer.lengths == [layout.live] * batch
    assert fake.head_end == layer.head_end
    assert fake.seen == layer.seen == seen
    assert fake.capacity == layer.capacity == layout.capacity
    assert fake.memory_bytes() == layer.memory_bytes()
    assert fake._clustered_any == layer._clustered_any
    assert torch.equal(fake.lengths_dev, layer.lengths_dev)
    assert fake.static == layer.static == static
    if static:
        assert fake.seen_dev.item() == layer.seen_dev.item() == seen
    # Sizes: exact tokens 1, empty slots 0, and every (row, head) stands for all `seen` tokens
    # (the real clusters differ in size, the synthetic ones are all the mean size).
    torch.testing.assert_close(fake.sizes.sum(-1), layer.sizes.sum(-1))
    assert torch.equal(fake.sizes[..., layout.live:], layer.sizes[..., layout.live:])
    exact = [slice(0, layout.clustered_from), slice(layout.head_end, layout.live)]
    for part in exact:
        assert torch.equal(fake.sizes[..., part], layer.sizes[..., part])


def test_synthetic_fill_decodes_like_a_cache():
    """A filled cache takes further tokens through its normal update/settle path."""
    shape = common.Shape(**{**common.TINY.__dict__, "layers": 1})
    cache = CentroidKVCache(ratio=0.75, policy=PlainClustering())
    layout = common.fill_centroidkv(cache, shape, 1, 700, "cpu", torch.float32)
    layer = cache.layers[0]
    token = torch.randn(1, shape.kv_heads, 1, shape.head_dim)
    with torch.inference_mode():
        for _ in range(200):
            layer.update(token, token)
            layer.settle()
    assert layer.seen == 900
    assert layer.lengths[0] < layout.live + 200  # blocks leaving the window were clustered
    torch.testing.assert_close(layer.sizes.sum(-1), torch.full((1, shape.kv_heads), 900.0))


# ---------------------------------------------------------------------------- the scripts
@pytest.mark.parametrize("policy", ["plain", "default"])
def test_bench_decode_tiny(tmp_path, policy):
    # 0.0003 GB "free": the 256-token points fit, the 1024-token ones must be skipped.
    data = run_script("bench_decode.py", "--contexts", "256", "1024", "--batches", "1", "--steps", "2",
                      "--free-gb", "0.0003", "--policy", policy, tmp_path=tmp_path)
    rows = data["decode"]
    assert {r["variant"] for r in rows} == {"stock", "static_sdpa", "inplace_op", "ckv_0.5", "ckv_0.75"}
    for r in rows:
        if r["context"] == 1024:
            assert r["status"] == "skipped" and r["reason"].startswith("memory"), r
            continue
        assert r["status"] == "ok", r
        for key in ("ms_median", "ms_mean", "host_ms_median", "tokens_per_s", "kv_bytes_held", "bytes_read_per_step"):
            assert r[key] > 0, (key, r)
    ckv = {r["variant"]: r for r in rows if r["context"] == 256}
    # Live slots shrink with the ratio (held bytes need not at 256 tokens: the buffers are only
    # reallocated smaller once they are 1.5x the live size).
    assert ckv["ckv_0.75"]["live_slots"] < ckv["ckv_0.5"]["live_slots"] < ckv["inplace_op"]["live_slots"] == 256
    comps = data["comparisons"]
    assert {c["ratio"] for c in comps} == {0.5, 0.75}
    for c in comps:
        assert c["bound"] > 1 and c["speedup_vs_stock"] > 0 and c["speedup_vs_best_full"] > 0
        assert c["best_full"] in ("static_sdpa", "inplace_op") and c["fraction_of_bound"] > 0
    assert data["weights_bytes_read"] > 0 and data["env"]["device"].startswith("CPU")


@pytest.mark.parametrize("policy", ["plain", "default"])
def test_bench_prefill_tiny(tmp_path, policy):
    data = run_script("bench_prefill.py", "--model", "tiny", "--contexts", "200", "--chunk", "64", "--reps", "1",
                      "--policy", policy, tmp_path=tmp_path)
    (row,) = data["rows"]
    variants = {"stock", "ckv_off", "ckv_0.75", "ckv_0.75_scored", "stock_chunked", "ckv_0.75_chunked"}
    assert set(row["median_ms"]) == variants and all(ms > 0 for ms in row["median_ms"].values())
    assert row["vs_stock"]["stock"] == 1.0 and set(row["vs_ckv_off"]) == {v for v in variants if v.startswith("ckv")}
    assert data["env"]["device"].startswith("CPU") and "peak_bytes" not in row


@pytest.mark.parametrize("policy", ["plain", "default"])
def test_bench_serving_tiny(tmp_path, policy):
    data = run_script("bench_serving.py", "--policy", policy, tmp_path=tmp_path)
    s = data["serving"]
    assert s["sequences"]["full"] == 4  # the tiny budget holds 4 full sequences by construction
    assert s["sequences"]["ckv_0.75"] > s["sequences"]["full"]
    assert s["bytes_per_sequence"]["ckv_0.75"] < s["bytes_per_sequence"]["full"]
    for variant in ("full_inplace", "ckv_0.75", "stock"):
        r = s["runs"][variant]
        assert r["status"] == "ok", r
        assert r["ms_median"] > 0 and r["tokens_per_s"] > 0 and r["tokens_per_s_mean"] > 0
        assert r["kv_bytes_held"] <= s["kv_budget_bytes"] * 1.05  # the in-place cache holds sizes too
    assert s["runs"]["ckv_0.75"]["batch"] == s["sequences"]["ckv_0.75"]
    assert s["throughput_vs_full_inplace"] > 0 and s["sequences_ratio"] > 1


def test_bench_captured_decode_tiny(tmp_path):
    data = run_script("bench_captured_decode.py", "--contexts", "300", "--steps", "70", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in data["decode"]}
    assert set(rows) == {"stock_eager", "static_eager", "static_compiled", "ckv_0_eager", "ckv_0_compiled",
                         "ckv_0.75_eager", "ckv_0.75_compiled"}
    for variant, r in rows.items():
        assert r["status"] == "ok", r
        assert r["ms_mean"] > 0 and r["tokens_per_s"] > 0 and r["bytes_read_per_step"] > data["weights_bytes_read"]
    # The timed steps crossed a block: the clustered cache shrank while being decoded.
    assert rows["ckv_0.75_compiled"]["live_slots_end"] < rows["ckv_0_compiled"]["live_slots_end"]
    (c,) = data["comparisons"]
    assert c["ratio"] == 0.75 and c["bound"] > 1 and c["floor_ms"] > 0 and c["of_floor"] > 0
    assert c["best_full"] in rows and c["speedup_vs_best_full"] > 0 and c["compiled_speedup"] > 0
    assert data["bandwidth_gbs"] > 0 and data["env"]["device"].startswith("CPU")


def test_bench_serving_captured_tiny(tmp_path):
    data = run_script("bench_serving.py", "--captured", tmp_path=tmp_path)
    s = data["serving"]
    for variant in ("full_inplace", "static_compiled", "ckv_0.75", "stock"):
        assert s["runs"][variant]["status"] == "ok", s["runs"][variant]
    assert s["sequences"]["ckv_0.75"] > s["sequences"]["full"] == 4
    assert s["throughput_vs_static_compiled"] > 0 and s["throughput_vs_full_inplace"] > 0


def test_deadline_skips_points(tmp_path):
    data = run_script("bench_decode.py", "--contexts", "256", "--batches", "1", "--deadline-s", "0",
                      "--min-point-s", "1", tmp_path=tmp_path)
    assert data["decode"] and all(r["status"] == "skipped" and r["reason"] == "deadline" for r in data["decode"])


@pytest.mark.slow  # loads SmolLM2 (GGUF) and generates through the real cache
def test_eval_cache_e2e_smoke(tmp_path):
    from centroidkv.eval import data
    try:
        data.smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    import eval_cache_e2e
    out = tmp_path / "e2e.json"
    payload = eval_cache_e2e.main(["--tasks", "passkey", "--length", "256", "--samples", "1", "--ratios", "0.75",
                                   "--configs", "full,surprisal50", "--json", str(out)])
    assert json.loads(out.read_text())["summary"] == payload["summary"]
    assert {(r["setting"], r["config"]) for r in payload["rows"]} == {
        (s, c) for s in ("question_in_prompt", "question_after") for c in ("full", "surprisal50")}
    assert all(0.0 <= r["score"] <= 1.0 and isinstance(r["generated"], str) for r in payload["rows"])


def test_cache_limits_script_reports_the_counts_the_readme_quotes(tmp_path):
    out = tmp_path / "cache_limits.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / "cache_limits.py"), "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["block_tokens"] == {"0.5": 32, "0.75": 64, "0.9": 256, "0.99": 2048}
    kept = result["slots_after_2000_token_prompt"]
    assert kept["0.99"] == 2000 and kept["0.9"] < kept["0.75"] < 2000  # 0.99's block outgrows the prompt
    budget = result["budget_100"]
    assert budget["end_slots"] <= budget["peak_slots"] and budget["peak_slots"] > 100  # not a hard cap


def test_needle_coverage_tiny(tmp_path):
    """Every ranking reports a share in [0, 1] for every task; the product's preset, ranked by
    its own protection_scores, keeps exactly what the run-min7 span 10/4 candidate keeps."""
    table = run_script("needle_coverage.py", "--tasks", "passkey,niah_multikey", tmp_path=tmp_path)
    assert table and all(0.0 <= v <= 1.0 for v in table.values())
    for ratio in (0.5, 0.75):
        for task in ("all", "passkey", "niah_multikey"):
            assert table[f"256/{ratio}/query_agnostic() preset/{task}"] == table[f"256/{ratio}/run-min7 span 10/4/{task}"]



def test_window_coverage_tiny(tmp_path):
    """Coverage shares lie in [0, 1] for both settings; the window's focus is at least that of a
    flat window (peak share times length >= 1, top 2% of tokens >= 2% of the attention)."""
    table = run_script("window_coverage.py", tmp_path=tmp_path)
    for setting in ("question after", "question in prompt"):
        for ratio in (0.5, 0.75):
            cell = {k.split("/")[2]: v for k, v in table.items() if k.startswith(f"{setting}/{ratio}/")}
            assert cell["focus: peak"] >= 1.0 - 1e-5 and cell["focus: top 2%"] >= 0.02 - 1e-6
            shares = [v for k, v in cell.items() if not k.startswith("focus")]
            assert len(shares) == 6 and all(0.0 <= v <= 1.0 for v in shares)


def test_needle_coverage_preset_row_is_the_run_candidate():
    import needle_coverage

    info = torch.rand(300, generator=torch.Generator().manual_seed(2)) * 6
    ranked = needle_coverage.rankings(info)
    torch.testing.assert_close(ranked["query_agnostic() preset"], ranked["run-min7 span 10/4"])
    assert not torch.equal(ranked["run-min7 span 10/4"], ranked["span 15/15 (pool 31, round 6's preset)"])


def test_fit_generalisation_tiny(tmp_path):
    """Every error is finite and >= 0; a values-only fit leaves the region's mass as the default's,
    and eviction draws another mass than the centroids."""
    table = run_script("fit_generalisation.py", tmp_path=tmp_path)["summary"]
    for row in table.values():
        for value in (row["probe"]["mass"], row["probe"]["output"], row["held_out"]["mass"],
                      row["held_out"]["output"], row["layer"]):
            assert value >= 0 and value == value and value != float("inf")
    for kind in ("probe", "held_out"):
        assert table["default_fit"][kind]["mass"] == pytest.approx(table["default"][kind]["mass"], rel=1e-5)
    assert table["default+evict"]["probe"]["mass"] != pytest.approx(table["default"]["probe"]["mass"], rel=1e-3)


def test_fit_generalisation_errors_vanish_for_lossless_merges():
    """Pairs of identical tokens merged into one slot of size 2 lose nothing under the size bias;
    without it the region's log-mass is off by exactly log 2 and its output still exact."""
    import fit_generalisation as fg

    g = torch.Generator().manual_seed(3)
    slot_keys, slot_values = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    keys, values = slot_keys.repeat_interleave(2, 2), slot_values.repeat_interleave(2, 2)
    queries, sizes = torch.randn(1, 4, 7, 8, generator=g), torch.full((1, 2, 5), 2.0)
    mass, output = fg.region_errors(queries, keys, values, slot_keys, slot_values, sizes, 1.0)
    assert float(mass.max()) < 1e-5 and float(output.max()) < 1e-5
    mass, output = fg.region_errors(queries, keys, values, slot_keys, slot_values, sizes, 0.0)
    torch.testing.assert_close(mass, torch.full_like(mass, math.log(2.0)))
    assert float(output.max()) < 1e-5
    sink, tail = (torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 3, 4, generator=g)), \
        (torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 4, 4, generator=g))
    parts = [sink, (keys, values), tail]
    assert float(fg.prefix_output_error(queries, parts, (slot_keys, slot_values, sizes), 1.0).max()) < 1e-5
    dropped = (slot_keys[:, :, :2], slot_values[:, :, :2], sizes[:, :, :2])
    assert float(fg.prefix_output_error(queries, parts, dropped, 1.0).min()) > 0
