"""The benchmark scripts run end to end and write the JSON their READMEs describe.

Smoke runs with tiny settings: they check the scripts work, not their timings (which only mean
something on a quiet machine, in a full run).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

from data_formats import write_fashion_mnist

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_overhead_quick_run_writes_every_variant_target_and_the_allocator_setting(tmp_path):
    out = tmp_path / "overhead.json"
    stdout = run("overhead.py", "--quick", "--models", "small_cnn,wrn_28_10", "--output", str(out))
    result = json.loads(out.read_text())
    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    malloc = result["machine"]["malloc"]
    assert malloc.startswith("glibc malloc keeps freed memory" if glibc else "left alone"), malloc
    assert stdout.startswith(f"malloc: {malloc}\n")
    for name, model in result["models"].items():
        variants = model["variants"]
        assert set(variants) == {
            "sgd",
            "fwd_bwd_1x",
            "fwd_bwd_2x",
            "sam",
            "sam_no_foreach",
            "sam_helper",
            "esam_sharpness",
            "esam_loss",
            "gsam",
            "wsam",
            "fsam",
            "looksam",
            "rst",
            "msam",
            "saf",
            "mesa",
        }
        rounds = model["timing"]["rounds"]
        for v in variants.values():
            assert v["median_ms"] > 0 and v["median_page_faults"] >= 0
            assert len(v["samples_page_faults"]) == len(v["samples_ms"]) == rounds
        assert variants["sgd"]["ratio_to_sgd"] == 1.0
        assert variants["sam"]["memory"]["delta_mb"] >= 0  # --quick probes sgd and sam
        targets = {t["name"]: t for t in model["targets"]}
        assert f"ESAM(loss)/SGD ({name})" in targets
        assert f"optimizer-only overhead % of SAM step, in-step ({name})" in targets
        assert ("SAM/SGD (small CNN)" in targets) == (name == "small_cnn")
        for t in targets.values():
            assert t["met"] == (t["value"] <= t["limit"])
        share = model["breakdown"]["foreach=True"]["optimizer_share_pct"]
        assert 0 < share < 100


def test_overhead_can_leave_the_allocator_alone(tmp_path):
    out = tmp_path / "overhead.json"
    args = ["--quick", "--models", "small_cnn", "--no-memory", "--no-breakdown"]
    run("overhead.py", *args, "--malloc", "default", "--output", str(out))
    assert json.loads(out.read_text())["machine"]["malloc"].startswith("left alone")


def test_ddp_scaling_smoke_run_measures_all_six_configurations(tmp_path):
    out = tmp_path / "ddp.json"
    run("ddp_scaling.py", "--steps", "2", "--repeats", "1", "--warmup", "1", "--output", str(out))
    rows = json.loads(out.read_text())["results"]
    configs = {(r["optimizer"], r["processes"], r["threads_per_process"]) for r in rows}
    assert configs == {(o, p, t) for o in ("sgd", "sam") for p, t in ((1, 1), (1, 2), (2, 1))}
    assert all(r["images_per_sec"] > 0 for r in rows)


def test_analysis_cost_quick_run_times_every_variant_and_the_default_command(tmp_path):
    out = tmp_path / "analysis_cost.json"
    stdout = run("analysis_cost.py", "--quick", "--output", str(out), timeout=600)
    result = json.loads(out.read_text())
    assert result["machine"]["torch"] and result["machine"]["torch_threads"] >= 1
    assert "cpu_model" in result["machine"] or sys.platform != "linux"
    rows = result["summary"]["rows"]
    assert set(rows) == {
        "fwd_bwd",
        "hvp",
        "hvp_first",
        "hvp_rebuilt",
        "hvp_fwd_over_rev",
        "fwd_bwd_b128",
        "hvp_b128",
        "hvp_rebuilt_b128",
    }
    assert all(r["median_wall_s"] > 0 and r["x_fwd_bwd"] > 0 for r in rows.values())
    assert rows["fwd_bwd"]["x_fwd_bwd"] == rows["fwd_bwd_b128"]["x_fwd_bwd"] == 1.0
    target = result["summary"]["target"]
    assert target["limit"] == 2.5 and target["met"] == (target["value"] <= 2.5)
    agreement = result["timing"]["agreement"]
    assert agreement["hvp_equals_hvp_rebuilt_bitwise"]
    assert agreement["hvp_fwd_over_rev_max_abs_diff_over_max_abs"] < 1e-3
    default = result["default_run"]
    assert default["num_hvp"] == default["num_lanczos_steps"] <= 3
    assert default["wall_s"] >= default["elapsed_sec"] > 0
    assert "target: s per HVP / s per forward+backward" in stdout
    assert "samkit hessian RUN (defaults)" in stdout


def test_train_throughput_quick_run_measures_loop_and_bare(tmp_path):
    data = tmp_path / "fashion_mnist"
    write_fashion_mnist(data, n_train=768, n_test=32)  # the loop's 2 + 3 steps of 128 images
    out = tmp_path / "train_throughput.json"
    stdout = run("train_throughput.py", "--quick", "--data-dir", str(data), "--output", str(out))
    result = json.loads(out.read_text())
    machine = result["machine"]
    assert machine["threads"] >= 1 and "native_bf16" in machine and machine["torch"]
    amps = ["none"] + (
        [machine["amp_auto_resolves_to"]] * (machine["amp_auto_resolves_to"] != "none")
    )
    rows = {(r["optimizer"], r["amp"]): r for r in result["rows"]}
    assert set(rows) == {(o, a) for o in ("sgd", "sam") for a in amps}
    for row in rows.values():
        assert row["bare_images_per_sec"] > 0 and row["loop_images_per_sec"] > 0
        ratio = row["loop_images_per_sec"] / row["bare_images_per_sec"]
        assert abs(row["loop_over_bare"] - ratio) < 1e-9  # one round: the ratio of the two
    assert "loop/bare" in stdout
