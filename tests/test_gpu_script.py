"""benchmarks/gpu.sh and its parts, in their CPU smoke modes: each part's entry point runs at a tiny shape and
reports what the GPU run will report (the GPU numbers themselves need a CUDA machine: `bash benchmarks/gpu.sh`)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_compile  # noqa: E402
import bench_hypernet  # noqa: E402
import bench_parity  # noqa: E402
import bench_train  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def run_script(*args, env=None):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_script_parses_and_refuses_a_machine_without_cuda():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = run_script("--bogus")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown argument")
    if not torch.cuda.is_available():
        r = run_script(env={"CUDA_VISIBLE_DEVICES": ""})
        assert r.returncode == 1 and r.stderr.startswith("error: no CUDA device") and r.stdout == ""


def test_parity_smoke_is_exact_in_fp32():
    """transformers and model.py on one set of weights: the same logits, top-1 and greedy tokens."""
    r = bench_parity.main(["--smoke"])["tiny"]
    assert r["max_abs"] < 1e-4 and r["top1"] == 1.0
    assert r["greedy_equal"] == r["forced_equal"] == r["new_tokens"] == 16


def test_compile_smoke_traces_decoding_without_graph_breaks():
    """A decode step is one graph: no data-dependent branch on the device (model._attention_mask's fast path)."""
    h, d = bench_compile.main(["--smoke"])
    assert d["breaks"] == 0 and h["breaks"] == 0
    assert d["eager_tok_s"] > 0 and d["compiled_tok_s"] > 0 and h["compiled_s"] > 0


def test_hypernet_smoke_reports_every_chunking():
    rows = bench_hypernet.main(["--smoke", "--chunks", "all,1"])
    assert [r["chunk"] for r in rows] == [None, 1] and not any(r["oom"] for r in rows)
    assert all(r["T"] == bench_hypernet.prompt_tokens(bench_parity.smoke_config().image_seq_len, 2) for r in rows)


def test_train_smoke_steps():
    r = bench_train.main(["--smoke"])
    assert r["step_s"] > 0 and r["samples_s"] == pytest.approx(1 / r["step_s"])


@pytest.mark.slow
def test_whole_script_smoke(tmp_path):
    """Every part through the script itself (about a minute and a half on 2 busy cores)."""
    r = run_script("--smoke", env={"OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    for title in ("1. Parity", "2. torch.compile", "3. TTFT sweep", "4. Hypernetwork", "5. Training step"):
        assert f"## {title}" in r.stdout
    assert "failed" not in r.stdout and "cut at" not in r.stdout and "TTFT kept KV" in r.stdout
