"""Hypernetwork forward at a released shape: time and peak memory, all layers at once vs layer chunks.

    python benchmarks/bench_hypernet.py                           # 500M, 12 and 64 frames, CPU (~5 min on 2 cores)
    python benchmarks/bench_hypernet.py --quick                   # 12 frames only, ~1 min
    python benchmarks/bench_hypernet.py --device cuda --frames 1024 --chunks all,8,4,1   # the GPU report's case
    python benchmarks/bench_hypernet.py --smoke                   # a tiny shape on the CPU (seconds)

The input is what the VLM hands over for an internalization prompt of that many frames, (1, L, T, D) hidden states
in the base model's dtype (fp32 on a CPU, bf16 on CUDA) with T = frames x (tokens per frame + 13 text tokens) + 45
(the real layout: 8 frames -> 659 tokens, 64 -> 4977 at 500M). Values are random: the cost does not depend on them.
"peak extra" is the memory the forward adds on top of its weights and input: on a CPU the highest resident set
seen (sampled every 5 ms, each case in a fresh process) minus the resident set just before; on CUDA
torch.cuda.max_memory_allocated minus the memory allocated before. On CUDA the perceiver runs under bf16 autocast
(hypernet.py's "auto"), as in training and internalize.py. A case that runs out of memory is reported as such.
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


def prompt_tokens(image_seq_len: int, frames: int) -> int:
    """Internalization prompt length: per frame its image tokens and ~13 text tokens ("Frame from MM:SS:" and the
    image markers), plus ~45 for the chat template, the video's intro and the instruction."""
    return frames * (image_seq_len + 13) + 45


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(size: str, frames: int, layer_chunk: int | None, device: str, threads: int | None) -> dict:
    """Build the hypernetwork at the `size` shape ("tiny": bench_ttft's toy one), run one no-grad forward over
    (1, L, T, D); report seconds and peak extra memory (GB), or {"oom": True}."""
    import torch

    import model as M
    from bench_ttft import TINY_HYPER, random_hypernet

    if threads:
        torch.set_num_threads(threads)
    if size == "tiny":
        from bench_parity import smoke_config
        cfg, overrides = smoke_config(), TINY_HYPER
    else:
        cfg, overrides = M.preset_config(size), {}
    dev = torch.device(device)
    hyper = random_hypernet(cfg, 0, dev, **overrides)
    T = prompt_tokens(cfg.image_seq_len, frames)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the base model's dtype hands these over
    try:
        h = torch.randn(1, cfg.text.num_hidden_layers, T, cfg.text.hidden_size, device=dev, dtype=dtype)
    except torch.OutOfMemoryError:
        return {"T": T, "oom": True}
    peak, done = [0], threading.Event()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = rss_bytes()

        def sample():  # torch's CPU allocator hands large blocks back to the OS, so RSS tracks live tensors
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.005)

        threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            lora = hyper(h, layer_chunk=layer_chunk)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except torch.OutOfMemoryError:
        return {"T": T, "oom": True}
    finally:
        done.set()
    seconds = time.perf_counter() - t0
    A, B = lora[hyper.config.targets[-1]]
    assert A.shape[:2] == (1, cfg.text.num_hidden_layers) and B.shape[:2] == A.shape[:2]
    top = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak[0]
    return {"T": T, "seconds": seconds, "peak_extra_gb": (top - base) / 2**30, "oom": False}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="500M", choices=["256M", "500M", "2.2B"])
    ap.add_argument("--frames", type=int, nargs="+", help="frame counts to run (default 12 64)")
    ap.add_argument("--chunks", default="all,4", help="layer chunks to compare, 'all' = every layer at once")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="12 frames only (about a minute)")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, 2 frames")
    args = ap.parse_args(argv)
    try:
        chunks = [None if c == "all" else int(c) for c in args.chunks.split(",")]
    except ValueError:
        raise SystemExit("error: --chunks takes 'all' or layer counts, comma-separated (e.g. all,8,4)")
    if any(c is not None and c < 1 for c in chunks):
        raise SystemExit("error: a layer chunk must be at least 1")
    size, device = ("tiny", "cpu") if args.smoke else (args.size, args.device)
    frames = [2] if args.smoke else args.frames or ([12] if args.quick else [12, 64])
    if device.startswith("cuda") or args.smoke:
        import torch
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is available")
        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
        call = lambda *a: run_case(*a)  # noqa: E731  (in process: the CUDA peak counter is reset per case)
    else:
        name = f"CPU, {os.cpu_count()} cores"
        ctx = mp.get_context("spawn")  # a fresh process per case, so one case's memory never shows in the next

        def call(*a):
            with ctx.Pool(1) as pool:
                return pool.apply(run_case, a)
    print(f"hypernet forward, {size} shape, B=1, no grad, {name}, "
          f"{'bf16 autocast, bf16 input' if device.startswith('cuda') else 'fp32'}\n")
    print("| frames | tokens T | layer chunk | seconds | peak extra GB |\n|---|---|---|---|---|")
    rows = []
    for n in frames:
        for chunk in chunks:
            r = call(size, n, chunk, device, args.threads)
            if device.startswith("cuda"):
                import torch
                torch.cuda.empty_cache()  # hand back this case's blocks (an out-of-memory case's too)
            rows.append({"frames": n, "chunk": chunk, **r})
            cells = "out of memory | –" if r["oom"] else f"{r['seconds']:.2f} | {r['peak_extra_gb']:.2f}"
            print(f"| {n} | {r['T']} | {chunk or 'all'} | {cells} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
