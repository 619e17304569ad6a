"""torch.compile of the hypernetwork and of decoding: compile time, speedup over eager, graphs and recompiles.

    python benchmarks/bench_compile.py                # CUDA, 500M shape, bf16 (compiling takes most of the ~2 min)
    python benchmarks/bench_compile.py --smoke        # a tiny shape on the CPU with backend "eager" (traces only)

Random weights (bench_ttft.random_vlm / random_hypernet). Compilation is lazy: its cost is the first call's time
minus an eager call's. Reported:
  * hypernetwork: hypernet.compile_hypernet (the perceiver compiled, as train.py and internalize.py do on CUDA) on
    the hidden states of a 12-frame internalization prompt, layer chunks of --layer-chunk; eager vs compiled
    seconds per forward, then the first call at another length (a different video: a recompile, dynamic after it);
  * decoding: torch.compile(vlm) stepped one token at a time from our KV cache after a 64-token prompt; eager vs
    compiled tokens/s over --tokens steps after --warm-steps warm-up steps (those absorb the recompile that marks
    the cache length dynamic), with dynamo's counts of compiled frames (first compile + recompiles), graphs and
    graph breaks. The prompt itself runs eagerly (prefill is one call per question; the step is the hot loop).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
from bench_ttft import TINY_HYPER, random_hypernet, random_vlm  # noqa: E402
from hypernet import compile_hypernet  # noqa: E402
from limits import sync  # noqa: E402


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def fresh_compiler():
    """Forget compiled code and dynamo's counters, so each part counts its own."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def dynamo_counts() -> dict[str, int]:
    """Frames compiled (the first compile and every recompile), graphs made, graph breaks, since fresh_compiler."""
    from torch._dynamo.utils import counters

    return {"compiles": int(counters["frames"]["ok"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "breaks": int(sum(counters["graph_break"].values()))}


@torch.no_grad()
def bench_hypernet(cfg, device, dtype, tokens: int, layer_chunk: int, backend: str, repeats: int,
                   **hyper_overrides) -> dict:
    """Eager vs compiled perceiver on (1, L, tokens, D) hidden states; then a first call at 1.5x the length."""
    hyper = random_hypernet(cfg, 0, device, **hyper_overrides)
    h = torch.randn(1, cfg.text.num_hidden_layers, tokens, cfg.text.hidden_size, device=device, dtype=dtype)
    h2 = torch.randn(1, cfg.text.num_hidden_layers, tokens * 3 // 2, cfg.text.hidden_size, device=device, dtype=dtype)
    run = lambda x: (lambda: hyper(x, layer_chunk=layer_chunk))  # noqa: E731
    run(h)()  # eager warm-up (kernel selection, allocator)
    eager = statistics.median(timed(run(h), device) for _ in range(repeats))
    fresh_compiler()
    if backend == "inductor":
        compile_hypernet(hyper, enabled=True)
    else:  # the same swap compile_hypernet makes, with a backend that only traces (a CPU smoke run)
        hyper.perceive = torch.compile(hyper._perceive, backend=backend)
    with contextlib.redirect_stdout(sys.stderr):  # compile_hypernet prints its compile time; the report is stdout
        first = timed(run(h), device)
        steady = statistics.median(timed(run(h), device) for _ in range(repeats))
        other = timed(run(h2), device)
    return {"tokens": tokens, "eager_s": eager, "first_s": first, "compiled_s": steady, "other_tokens": h2.shape[2],
            "other_first_s": other, **dynamo_counts()}


@torch.no_grad()
def decode_rate(step, cache_len: int, warm: int, tokens: int, device) -> tuple[float, float]:
    """(seconds of the first step, tokens/s over `tokens` steps after `warm` more)."""
    first = timed(step, device)
    for _ in range(warm):
        step()
    return first, tokens / sum(timed(step, device) for _ in range(tokens))


@torch.no_grad()
def bench_decode(cfg, device, dtype, backend: str, warm: int, tokens: int) -> dict:
    vlm = random_vlm(cfg, 0, device).to(dtype)
    ids = torch.randint(0, min(cfg.text.vocab_size, 49000), (1, 64), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    out = {}
    for name, fwd in (("eager", vlm), ("compiled", None)):
        if fwd is None:
            fresh_compiler()
            fwd = torch.compile(vlm, backend=backend)
        cache = vlm.new_cache(1, ids.shape[1] + 2 + warm + tokens)
        logits = vlm(ids, cache=cache, logits="last").logits  # the prompt runs eagerly: only the step is compiled
        nxt = logits[:, -1].argmax(-1, keepdim=True)

        def step():
            fwd(nxt, cache=cache, logits="last")  # the same token every step: the cost does not depend on it

        out[name] = decode_rate(step, cache.length, warm, tokens, device)
    return {"eager_first_s": out["eager"][0], "eager_tok_s": out["eager"][1], "first_s": out["compiled"][0],
            "compiled_tok_s": out["compiled"][1], **dynamo_counts()}


def markdown(h: dict, d: dict, meta: str) -> str:
    return "\n".join([
        meta, "",
        "| part | eager | compiled, first call (compile + run) | compiled, steady | speedup | compiles / graphs / "
        "graph breaks |", "|---|---|---|---|---|---|",
        f"| hypernetwork, T = {h['tokens']} (s per forward) | {h['eager_s']:.3f} | {h['first_s']:.1f} "
        f"| {h['compiled_s']:.3f} | **{h['eager_s'] / h['compiled_s']:.2f}×** | {h['compiles']} / {h['graphs']} / "
        f"{h['breaks']} |",
        f"| hypernetwork, a new length T = {h['other_tokens']} (s, first call) | – | {h['other_first_s']:.1f} | – "
        f"| – | – |",
        f"| decoding (tokens/s) | {d['eager_tok_s']:.1f} | {d['first_s']:.1f} s | {d['compiled_tok_s']:.1f} "
        f"| **{d['compiled_tok_s'] / d['eager_tok_s']:.2f}×** | {d['compiles']} / {d['graphs']} / {d['breaks']} |",
    ]) + "\n"


def main(argv=None) -> tuple[dict, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="500M", choices=list(M.PRESETS))
    p.add_argument("--tokens-in", type=int, default=967, help="hypernet input length (a 12-frame 500M prompt: 967)")
    p.add_argument("--layer-chunk", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    p.add_argument("--warm-steps", type=int, default=4, help="decode steps after the first, not timed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager = trace only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny shape, CPU, backend eager, few steps")
    args = p.parse_args(argv)
    if args.smoke:
        from bench_parity import smoke_config

        cfg, device, dtype = smoke_config(), torch.device("cpu"), torch.float32
        args.tokens_in, args.layer_chunk, args.tokens, args.warm_steps, args.repeats = 40, 3, 4, 2, 1
        args.backend = "eager"
    else:
        cfg, device = M.preset_config(args.size), M.pick_device(args.device)
        dtype = M.pick_dtype("auto", device)
    h = bench_hypernet(cfg, device, dtype, args.tokens_in, args.layer_chunk, args.backend, args.repeats,
                       **(TINY_HYPER if args.smoke else {}))
    d = bench_decode(cfg, device, dtype, args.backend, args.warm_steps, args.tokens)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = (f"torch.compile (backend {args.backend}), {'tiny' if args.smoke else args.size} shape, random weights, "
            f"{name}, {str(dtype).replace('torch.', '')}, torch {torch.__version__}; hypernet layer chunk "
            f"{args.layer_chunk}, median of {args.repeats}; decode after a 64-token prompt, {args.tokens} steps timed "
            f"after {args.warm_steps} warm-up steps")
    print(markdown(h, d, meta))
    return h, d


if __name__ == "__main__":
    main()
