"""What the machine allows and how close our kernels come to it: memory bandwidth, matmul FLOP/s, the FLOPs of the
VLM encode and of the hypernetwork, the bytes one decode step reads, and a per-op profile that says where the time
goes.

    python benchmarks/limits.py                    # 500M shape, 8 frames, fp32 and bf16 (~3 min on 2 cores)
    python benchmarks/limits.py --quick            # 2 frames
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/limits.py --quick   # as on a CPU without AVX512_BF16

bench_ttft.py and bench_model.py import the counters and the two machine measurements, so every fraction they print
is measured in the same run as the numbers it divides. The counts are analytic (a multiply-add is 2 FLOPs, as
torch.utils.flop_counter counts them); tests/test_limits.py checks them against FlopCounterMode at tiny shapes.

  * bandwidth: a large tensor copy, bytes read + bytes written per second (the STREAM "copy" convention), and a
    large sum (bytes read per second). Decoding one token reads every decoder weight and the whole KV cache once.
  * gemv: one token through a large linear layer (M = 1), weight bytes per second: the BLAS kernel every decode
    step runs; on a CPU it may stream well below the copy bandwidth.
  * page faults: the minor faults of one encode, pages touched for the first time (glibc hands blocks over its
    mmap threshold back to the kernel on free, so a large new tensor faults in again: set MALLOC_MMAP_MAX_=0 and a
    large MALLOC_TRIM_THRESHOLD_, or preload a caching allocator, to keep them).
  * matmul: a square n x n @ n x n product in the model's dtype, 2 n^3 FLOPs. Prefill, the encode and the
    hypernetwork are almost all matmuls, so this is their ceiling on this machine.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402


# ------------------------------------------------------------------------------------------------ the machine
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device, repeats: int) -> list[float]:
    fn()  # warm-up: first-touch page faults, kernel selection
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def timed(fn, device="cpu") -> float:
    """Seconds of one call, no warm-up."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def copy_bandwidth(device="cpu", nbytes: int = 1 << 30, repeats: int = 3) -> dict[str, float]:
    """Bytes per second of a large copy (read + write counted, STREAM convention) and of a large sum (read only);
    medians. 1 GiB is far beyond any cache, so this is what DRAM delivers to torch's own kernels."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = statistics.median(_seconds(lambda: dst.copy_(src), device, repeats))
    read = statistics.median(_seconds(lambda: src.sum(), device, repeats))
    return {"copy": 2 * nbytes / copy, "read": nbytes / read}


def gemv_bandwidth(dtype=torch.float32, device="cpu", shape=(49280, 960), repeats: int = 3) -> float:
    """Weight bytes per second of one token through a (rows, cols) linear layer (the 500M LM head's shape, 189 MB
    in fp32): what the BLAS behind F.linear streams when M = 1, the decode step's own kernel."""
    w = torch.randn(*shape, device=device).to(dtype)
    x = torch.randn(1, shape[1], device=device).to(dtype)
    return w.numel() * w.element_size() / statistics.median(
        _seconds(lambda: torch.nn.functional.linear(x, w), device, repeats))


def matmul_flops(dtype=torch.float32, device="cpu", n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of one n x n @ n x n product in `dtype` (2 n^3 FLOPs), median of `repeats`."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    return 2 * n**3 / statistics.median(_seconds(lambda: a @ b, device, repeats))


# ------------------------------------------------------------------------------------------------ FLOP counts
def encode_flops(cfg: M.SmolVLMConfig, frames: int, tokens: int, causal_full: bool = False,
                 head_rows: int = 0) -> dict[str, int]:
    """FLOPs of one forward of the VLM over `tokens` prompt tokens with `frames` frames, by part.

    The vision tower sees every frame at the encoder's square (N patches each, bidirectional attention); the
    decoder sees all `tokens`. Causal attention does T(T+1)/2 query-key pairs; `causal_full` counts T^2 instead, as
    FlopCounterMode does (it ignores the mask). head_rows: positions whose logits are computed (0 for the encode,
    1 for a prefill with logits="last")."""
    v, t = cfg.vision, cfg.text
    N, V, I = (v.image_size // v.patch_size) ** 2, v.hidden_size, v.intermediate_size
    D, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    pairs = tokens * tokens if causal_full else tokens * (tokens + 1) // 2
    return {
        # patch embedding (a P x P stride-P convolution) + per layer q, k, v, out (V x V) and fc1, fc2 (V x I)
        "vision_linear": frames * (2 * N * 3 * v.patch_size**2 * V + v.num_hidden_layers * 2 * N * (4 * V * V + 2 * V * I)),
        "vision_attention": frames * v.num_hidden_layers * 4 * N * N * V,  # QK^T and PV, every head: 2 * 2 N^2 V
        "connector": frames * 2 * cfg.image_seq_len * V * cfg.scale_factor**2 * D,
        "text_linear": t.num_hidden_layers * 2 * tokens * (D * q + 2 * D * kv + q * D + 3 * D * t.intermediate_size),
        "text_attention": t.num_hidden_layers * 4 * pairs * q,  # GQA: every query head scores, whatever Hkv
        "head": 2 * head_rows * D * t.vocab_size,
    }


def hypernet_flops(c, tokens: int, batch: int = 1) -> dict[str, int]:
    """FLOPs of one hypernetwork forward over (batch, L, tokens, D) hidden states, by part (hypernet.py's modules)."""
    W, H, Hkv, hd, D = c.latent_size, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_size
    n_q = len(c.targets) * c.rank

    def block(Q, context):  # one PerceiverLayer: Q latents attend to [context; latents] (S = context + Q keys)
        S = context + Q
        return 2 * Q * W * H * hd + 2 * 2 * S * W * Hkv * hd + 4 * Q * S * H * hd + 2 * Q * H * hd * W \
            + 3 * 2 * Q * W * 4 * W

    n = batch * c.num_layers  # every (sample, layer) is one sequence through the perceiver
    return {
        "projection": n * 2 * tokens * (2 * D * c.proj_mult * D + c.proj_mult * D * W),  # SwiGLU D -> 4D -> W
        "encoder": n * c.num_blocks * block(c.n_latents, tokens),   # the latents read the projected tokens
        "decoder": n * block(n_q, c.n_latents),                     # the LoRA queries read the encoder's latents
        "pre_head": n * 2 * 2 * n_q * W * 4 * W,
        "head": n * sum(2 * c.rank * W * (i + o) for _, i, o in c.target_shapes),
    }


# ------------------------------------------------------------------------------------------------ decode bytes
def tensor_bytes(tensors) -> int:
    return sum(x.numel() * x.element_size() for x in tensors)


def decode_bytes(vlm: M.SmolVLM, context: int, kv_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes one decode step must read at `context` cached positions, counted from the model's own tensors:
    every decoder layer's weights and the final norm, the LM head (the embedding matrix when tied), one embedding
    row, and the keys and values of every layer (2 L Hkv hd context elements)."""
    tm, t = vlm.model.text_model, vlm.config.text
    head = vlm.lm_head.weight if vlm.lm_head is not None else tm.embed_tokens.weight
    w = tm.embed_tokens.weight
    kv_elem = torch.empty((), dtype=kv_dtype or w.dtype).element_size()
    return {"weights": tensor_bytes(tm.layers.parameters()) + tensor_bytes(tm.norm.parameters())
            + tensor_bytes([head]) + t.hidden_size * w.element_size(),
            "kv": 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * context * kv_elem}


# ------------------------------------------------------------------------------------------------ per-op profile
def op_profile(fn, device="cpu") -> dict[str, float]:
    """Self time (seconds) of every aten op while fn() runs once, summed by op name; the rows of the matmuls,
    by input shapes, go under the key "shapes" as {(op, shapes): (calls, seconds, FLOPs)}."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        fn()
        sync(device)
    out, shapes = defaultdict(float), {}
    for e in prof.key_averages(group_by_input_shape=True):
        s = ((getattr(e, "self_device_time_total", 0.0) if len(acts) > 1 else 0.0) or e.self_cpu_time_total) / 1e6
        out[e.key] += s
        dims = [list(d) for d in e.input_shapes if d]
        if e.key in ("aten::mm", "aten::addmm") and len(dims) >= 2:
            a, b = dims[-2:]  # addmm(bias, a, b): the last two are the product's operands
            shapes[(e.key, f"{a[0]}x{a[1]} @ {b[0]}x{b[1]}")] = (e.count, s, 2 * a[0] * a[1] * b[1] * e.count)
    return {**out, "shapes": shapes}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
              "aten::convolution", "aten::_convolution", "aten::mkldnn_matmul")


def op_groups(ops: dict[str, float]) -> dict[str, float]:
    """matmul / attention / everything else (elementwise, norms, copies, casts: no FLOPs counted)."""
    g = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, s in ops.items():
        if name == "shapes":
            continue
        key = "matmul" if name in MATMUL_OPS else "attention" if "attention" in name else "other"
        g[key] += s
    return g


def profile_markdown(title: str, ops: dict[str, float], flops: dict[str, int], peak: float, top: int = 10) -> str:
    """Where one pass's time goes: the groups with their achieved FLOP/s, then the top ops by self time."""
    groups = op_groups(ops)
    total = sum(groups.values())
    mm = sum(v for k, v in flops.items() if "attention" not in k)
    att = sum(v for k, v in flops.items() if "attention" in k)
    out = [f"**{title}**: {sum(flops.values()) / 1e9:.1f} GFLOP in {total:.2f} s of op time = "
           f"{sum(flops.values()) / total / 1e9:.1f} GFLOP/s, **{sum(flops.values()) / total / peak:.2f}** of the "
           f"matmul peak ({peak / 1e9:.1f} GFLOP/s)", "",
           "| group | seconds | share | GFLOP | GFLOP/s | of peak |", "|---|---|---|---|---|---|"]
    for name, s, f in (("matmul + conv", groups["matmul"], mm), ("attention (SDPA)", groups["attention"], att),
                       ("everything else", groups["other"], 0)):
        rate = f"{f / s / 1e9:.1f} | {f / s / peak:.2f}" if f and s else "– | –"
        out.append(f"| {name} | {s:.3f} | {s / total:.1%} | {f / 1e9:.1f} | {rate} |")
    out += ["", "| op (top by self time) | seconds | share |", "|---|---|---|"]
    for name, s in sorted(((k, v) for k, v in ops.items() if k != "shapes"), key=lambda kv: -kv[1])[:top]:
        out.append(f"| `{name}` | {s:.3f} | {s / total:.1%} |")
    out += ["", "| matmul (top by time): M x K @ K x N | calls | seconds | GFLOP/s | of peak |", "|---|---|---|---|---|"]
    for (op, shape), (n, s, f) in sorted(ops.get("shapes", {}).items(), key=lambda kv: -kv[1][1])[:top // 2]:
        out.append(f"| `{op}` {shape} | {n} | {s:.3f} | {f / s / 1e9:.1f} | {f / s / peak:.2f} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ CLI
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="500M", choices=list(M.PRESETS))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="2 frames")
    args = p.parse_args(argv)
    if args.quick:
        args.frames = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import bench_model
    import bench_ttft

    cfg = M.preset_config(args.size)
    ids = bench_model.prompt_ids(cfg, args.frames)  # (1, T): the real prompt layout, frames of image tokens
    T = ids.shape[1]
    pixels = torch.rand(args.frames, 3, cfg.vision.image_size, cfg.vision.image_size) * 2 - 1
    base = bench_ttft.random_vlm(cfg, 0)
    hyper = bench_ttft.random_hypernet(cfg, 0)
    lim = copy_bandwidth()
    print(f"# limits.py: {args.size} shape, {args.frames} frames (T = {T}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print(f"bandwidth: copy {lim['copy'] / 1e9:.1f} GB/s, read {lim['read'] / 1e9:.1f} GB/s\n")
    for name in args.dtypes.split(","):
        dtype = M.DTYPES[name]
        vlm = base.to(dtype)
        peak, gemv = matmul_flops(dtype), gemv_bandwidth(dtype)
        with torch.no_grad():
            enc = lambda: vlm(ids, pixels.to(dtype), output_hidden_states=True, logits="none")  # noqa: E731
            enc()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = timed(enc)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            ops = op_profile(enc)
            print(profile_markdown(f"{name} VLM encode", ops, encode_flops(cfg, args.frames, T), peak))
            # Pages touched for the first time fault into the process; glibc returns freed blocks over its mmap
            # threshold to the kernel, so each large new tensor faults again (MALLOC_MMAP_MAX_=0 keeps them).
            print(f"{name} VLM encode unprofiled: {seconds:.2f} s, {faults:,} minor page faults "
                  f"({faults * resource.getpagesize() / 1e9:.1f} GB first touched)\n")
            hidden = torch.stack(enc().hidden_states, dim=1)
            amp = None if dtype == torch.float32 else dtype
            hyp = lambda: hyper(hidden, layer_chunk=8, amp_dtype=amp)  # noqa: E731
            hyp()
            ops = op_profile(hyp)
            print(profile_markdown(f"{name} hypernetwork (layer_chunk 8{', bf16 autocast' if amp else ''})", ops,
                                   hypernet_flops(hyper.config, T), peak))
            for where, prompt, pix in (("after the video", ids, pixels.to(dtype)), ("after a text question",
                                                                                    ids[:, -16:], None)):
                cache = vlm.new_cache(1, prompt.shape[1] + 9)  # the prompt, a warm-up step and 8 timed steps
                out = vlm(prompt, pix, cache=cache, logits="last")
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                s = statistics.median(_seconds(lambda: vlm(nxt, cache=cache, logits="last"), "cpu", 8))
                b = sum(decode_bytes(vlm, prompt.shape[1]).values())
                bw = max(lim.values())
                print(f"**{name} decode {where}** ({prompt.shape[1]} cached positions): {1 / s:.1f} tok/s, reading "
                      f"{b / 1e9:.3f} GB a token: **{b / s / bw:.2f}** of the {bw / 1e9:.1f} GB/s bandwidth, "
                      f"**{b / s / gemv:.2f}** of the {gemv / 1e9:.1f} GB/s a {name} gemv streams\n")
            print(f"matmul peak {name}: {peak / 1e9:.1f} GFLOP/s (n = 4096)\n")


if __name__ == "__main__":
    main()
