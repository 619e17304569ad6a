"""Hypernetwork forward at the 500M shape on CPU: time and peak memory, all layers at once vs layer chunks.

    python benchmarks/bench_hypernet.py            # 12 and 64 frames (T = 900, 4300), ~5 min on 2 cores
    python benchmarks/bench_hypernet.py --quick    # 12 frames only, ~1 min

Each case runs in a fresh process. "peak extra" is the highest resident memory seen while the forward runs
(sampled every 5 ms) minus the resident memory just before it, i.e. the activations, with the 0.5 GB of weights
and the input already counted out. Inputs are random: the cost of the forward does not depend on the values.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# 500M text backbone (method.md §1): D = 960, L = 32, d_ff = 2560. 64 tokens per frame plus ~130 tokens of
# chat template, timestamps and instruction, hence T ~ 900 at 12 frames and ~ 4300 at 64.
FRAMES_TO_T = {12: 900, 64: 4300}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(T: int, layer_chunk: int | None, amp: str | None, threads: int | None) -> dict:
    """Build the 500M-shape hypernetwork, run one no-grad forward over (1, L, T, D); report time and memory."""
    import torch

    from hypernet import HyperConfig, HyperNet
    from model import preset_config

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = HyperNet(HyperConfig.for_model(preset_config("500M"))).eval()
    h = torch.randn(1, net.config.num_layers, T, net.config.hidden_size)  # (B, L, T, D)
    mask = torch.ones(1, T, dtype=torch.long)
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():  # RSS sampler: torch's CPU allocator hands memory back to the OS, so RSS tracks live tensors
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with torch.no_grad():
        A, B = net(h, mask, layer_chunk=layer_chunk, amp_dtype=getattr(torch, amp) if amp else None)["down_proj"]
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    assert A.shape == (1, 32, 32, 2560) and B.shape == (1, 32, 32, 960)
    return dict(seconds=seconds, peak_extra_gb=(peak[0] - base) / 2**30, rss_before_gb=base / 2**30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 frames only (about a minute)")
    ap.add_argument("--frames", type=int, nargs="+", choices=sorted(FRAMES_TO_T), help="frame counts to run")
    ap.add_argument("--layer-chunk", type=int, default=4, help="layers per chunk for the chunked runs (default 4)")
    ap.add_argument("--amp", choices=["bfloat16"], default=None, help="bf16 autocast for the perceiver")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if not 1 <= args.layer_chunk <= 32:
        raise SystemExit("error: --layer-chunk must be between 1 and 32 (the 500M model has 32 layers)")
    frames = args.frames or ([12] if args.quick else [12, 64])
    ctx = mp.get_context("spawn")  # a fresh process per case, so one case's memory never shows in the next
    print(f"hypernet forward, 500M shape (L=32, D=960), B=1, no grad, CPU, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, {os.cpu_count()} cores")
    print(f"{'frames':>6} {'T':>5} {'layer_chunk':>11} {'time s':>7} {'peak extra GB':>13}")
    for n in frames:
        for chunk in (None, args.layer_chunk):
            with ctx.Pool(1) as pool:
                r = pool.apply(run_case, (FRAMES_TO_T[n], chunk, args.amp, args.threads))
            print(f"{n:>6} {FRAMES_TO_T[n]:>5} {str(chunk or 'all'):>11} {r['seconds']:>7.1f} "
                  f"{r['peak_extra_gb']:>13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
