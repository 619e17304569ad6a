"""model.py vs transformers on the same random weights at a real shape: prefill and decode speed, peak memory,
and both against what the machine allows.

    python benchmarks/bench_model.py                 # 500M shape, 12 frames, fp32 and bf16
    python benchmarks/bench_model.py --quick         # 2 frames, fewer decode tokens

Each (implementation, dtype) runs in its own process, so peak memory (max RSS) is that implementation's alone;
both load the same safetensors checkpoint written once to --workdir. Ratios are ours / transformers: below 1.0
means ours is faster or smaller.

The timing process also measures, in every round beside the two implementations (benchmarks/limits.py): the copy
bandwidth, the bandwidth a BLAS gemv streams (one token through a large linear layer) and a large matmul's FLOP/s.
Decoding is memory-bound: a token reads every decoder weight and the KV cache once, so its bound is bandwidth /
bytes per token. Prefill is compute-bound: its achieved FLOP/s (analytic count) is set against the matmul's.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
import limits  # noqa: E402  (benchmarks/ is this script's own folder, first on sys.path)


def prompt_ids(cfg: M.SmolVLMConfig, frames: int, text_tokens: int = 40) -> torch.Tensor:
    """A video prompt of the real layout: per frame ~8 text tokens, 3 specials and image_seq_len <image>."""
    ids = [1, 11126, 42]
    for _ in range(frames):
        ids += [198, 5, 6, 7, 8, 9, 10, 42, 49189, 49152] + [cfg.image_token_id] * cfg.image_seq_len + [49189]
    return torch.tensor([ids + [300 + i for i in range(text_tokens)] + [49279, 198, 9519, 9531, 42]])


def make_checkpoint(size: str, workdir: Path) -> Path:
    path = workdir / f"random-{size}"
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return path
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(0)
    hf = SmolVLMForConditionalGeneration(SmolVLMConfig(**M.preset_config(size).to_hf_dict()))
    hf.save_pretrained(path)
    return path


def load(impl: str, path: Path, dtype: torch.dtype):
    if impl == "ours":
        return M.load_model(path, dtype=dtype)
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


def worker(args) -> dict:
    """Timing: both implementations loaded in this process and run alternately, so a busy machine slows both
    alike; the ratio is what we report. Memory (`--memory IMPL`): one implementation alone, its max RSS."""
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    impls = [args.memory] if args.memory else ["ours", "transformers"]
    models = {impl: load(impl, Path(args.ckpt), dtype) for impl in impls}
    cfg = M.preset_config(args.size)
    ids = prompt_ids(cfg, args.frames)
    pixels = (torch.rand(args.frames, 3, cfg.vision.image_size, cfg.vision.image_size) * 2 - 1).to(dtype)
    prefill = {impl: [] for impl in impls}
    decode = {impl: [] for impl in impls}
    machine = {"copy": [], "read": [], "gemv": [], "matmul": []}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # the first round is warm-up and is not counted
            for impl, model in models.items():
                t0 = time.perf_counter()
                if impl == "ours":
                    model(ids, pixels, logits="last")
                else:
                    model(input_ids=ids, pixel_values=pixels[None], logits_to_keep=1)
                t1 = time.perf_counter()
                decode_s = run_decode(impl, model, ids[:, :64], args.decode_tokens)
                if rep:
                    prefill[impl].append(t1 - t0)
                    decode[impl].append(args.decode_tokens / decode_s)
            if rep and not args.memory:  # the machine, in the same rounds (never in a memory run: 2 GiB of buffers)
                for k, v in limits.copy_bandwidth(repeats=1).items():
                    machine[k].append(v)
                machine["gemv"].append(limits.gemv_bandwidth(dtype, repeats=1))
                machine["matmul"].append(limits.matmul_flops(dtype, repeats=1))
    out = {"tokens": ids.shape[1], "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           **{impl: {"prefill_s": statistics.median(prefill[impl]), "decode_tok_s": statistics.median(decode[impl])}
              for impl in impls}}
    if not args.memory:
        vlm = models["ours"]
        ctx = 64 + args.decode_tokens // 2  # decode runs after a 64-token prompt: the cache's mean length
        out["machine"] = {k: statistics.median(v) for k, v in machine.items()}
        out["prefill_flops"] = sum(limits.encode_flops(cfg, args.frames, ids.shape[1], head_rows=1).values())
        out["token_bytes"] = sum(limits.decode_bytes(vlm, ctx).values())
    return out


def run_decode(impl, model, ids, n) -> float:
    """Seconds for n greedy decode steps after a short text prefill (the prefill is excluded)."""
    if impl == "ours":
        cache = model.new_cache(1, ids.shape[1] + n)
        out = model(ids, cache=cache, logits="last")
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(out.logits[:, -1].argmax(-1, keepdim=True), cache=cache, logits="last")
        return time.perf_counter() - t0
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + n)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=out.logits[:, -1].argmax(-1, keepdim=True), past_key_values=out.past_key_values,
                    use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="500M", choices=list(M.PRESETS))
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workdir", default="/tmp/v2l-bench")
    p.add_argument("--quick", action="store_true", help="2 frames, 8 decode tokens, 1 repeat")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.frames, args.decode_tokens, args.repeats = 2, 8, 1
    ckpt = make_checkpoint(args.size, Path(args.workdir))
    base = [sys.executable, __file__, "--worker", "--ckpt", str(ckpt), "--size", args.size, "--frames",
            str(args.frames), "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads)]
    run = lambda *extra: json.loads(subprocess.run(base + list(extra), capture_output=True, text=True,  # noqa: E731
                                                   check=True).stdout.strip().splitlines()[-1])
    dtypes = args.dtypes.split(",")
    rows = {}
    for dtype in dtypes:
        rows[dtype] = run("--dtype", dtype, "--repeats", str(args.repeats))
        for impl in ("ours", "transformers"):  # memory: each alone in a fresh process, one round
            rows[dtype][impl]["peak_rss_gb"] = run("--dtype", dtype, "--repeats", "1", "--memory", impl)["peak_rss_gb"]
        print(f"  {dtype}: {rows[dtype]}", file=sys.stderr)
    print(f"\n{args.size} shape, random weights, {args.frames} frames ({rows[dtypes[0]]['tokens']} prompt tokens), "
          f"{args.threads} threads, torch {torch.__version__}, median of {args.repeats}\n")
    print("| dtype | prefill s: ours / transformers (ratio) | decode tok/s: ours / transformers (time ratio) "
          "| peak RSS GB: ours / transformers (ratio) |")
    print("|---|---|---|---|")
    for dtype in dtypes:
        o, h = rows[dtype]["ours"], rows[dtype]["transformers"]
        print(f"| {dtype} | {o['prefill_s']:.2f} / {h['prefill_s']:.2f} (**{o['prefill_s'] / h['prefill_s']:.2f}**) "
              f"| {o['decode_tok_s']:.1f} / {h['decode_tok_s']:.1f} (**{h['decode_tok_s'] / o['decode_tok_s']:.2f}**) "
              f"| {o['peak_rss_gb']:.2f} / {h['peak_rss_gb']:.2f} (**{o['peak_rss_gb'] / h['peak_rss_gb']:.2f}**) |")
    print(limits_table(rows, dtypes))


def limits_table(rows: dict, dtypes: list[str]) -> str:
    """Both implementations against the machine, measured in the same rounds."""
    out = ["\nClose to the limit (same process, same rounds): decode against bandwidth (the higher of copy and read) / "
           "bytes per token and against the gemv's rate / bytes per token; prefill against a 4096 x 4096 matmul in "
           "the same dtype\n",
           "| dtype | copy / read / gemv GB/s | GB per token | decode, of the bandwidth bound: ours / transformers "
           "| of the gemv bound: ours / transformers | matmul GFLOP/s | prefill GFLOP/s: ours / transformers "
           "| of matmul: ours / transformers |", "|---|---|---|---|---|---|---|---|"]
    for dtype in dtypes:
        r = rows[dtype]
        m, b = r["machine"], r["token_bytes"]
        o, h = r["ours"], r["transformers"]
        bw = max(m["copy"], m["read"])
        rate = {k: r["prefill_flops"] / x["prefill_s"] for k, x in (("o", o), ("h", h))}
        out.append(f"| {dtype} | {m['copy'] / 1e9:.1f} / {m['read'] / 1e9:.1f} / {m['gemv'] / 1e9:.1f} | {b / 1e9:.3f} "
                   f"| **{o['decode_tok_s'] * b / bw:.2f}** / {h['decode_tok_s'] * b / bw:.2f} "
                   f"| **{o['decode_tok_s'] * b / m['gemv']:.2f}** / {h['decode_tok_s'] * b / m['gemv']:.2f} "
                   f"| {m['matmul'] / 1e9:.1f} | {rate['o'] / 1e9:.1f} / {rate['h'] / 1e9:.1f} "
                   f"| **{rate['o'] / m['matmul']:.2f}** / {rate['h'] / m['matmul']:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
