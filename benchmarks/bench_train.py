"""One training step of train.py at the 500M shape (random weights): time per phase and peak memory.

    python benchmarks/bench_train.py               # batch 1, 12 frames, 1 step: ~5 min on 2 cores
    python benchmarks/bench_train.py --quick       # 4 frames: ~2 min on 2 cores
    python benchmarks/bench_train.py --device cuda --steps 4   # bf16 base model, hypernet under bf16 autocast
    python benchmarks/bench_train.py --smoke       # a tiny shape on the CPU, 2 steps (seconds)

The step is train.sample_losses + backward + clip + AdamW, the code the CLI runs, on synthetic inputs shaped like
a real batch: an internalization prompt of 12 frames x 64 image tokens plus ~130 text tokens (T ~ 900) and a
text-only [prompt][answer] of 48 tokens, 24 of them labelled. Values do not change the cost, so no video is
decoded and no checkpoint downloaded. CPU peak memory is the process's peak resident set (ru_maxrss: weights,
optimizer state and activations together); CUDA reports torch.cuda.max_memory_allocated. The first step pays
one-time costs (allocator growth, kernel selection): the summary is the median of the later ones when there are.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
import train  # noqa: E402
from hypernet import HyperConfig, HyperNet  # noqa: E402


def synthetic_batch(config: M.SmolVLMConfig, batch: int, frames: int, device) -> dict:
    """Token ids with the image tokens where a 12-frame prompt has them, random pixels, labels on the answer."""
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, 49000, (n,), generator=g)  # noqa: E731 (ordinary BPE ids, no specials)
    per_frame = torch.cat([text(8), torch.full((config.image_seq_len,), config.image_token_id)])
    ctx = torch.cat([text(40), per_frame.repeat(frames), text(90)])  # (T,)
    ids = text(48)
    labels = torch.cat([torch.full((24,), -100), ids[24:]])
    S = config.vision.image_size
    return train.to_device({
        "ctx_ids": ctx.repeat(batch, 1), "ctx_mask": torch.ones(batch, len(ctx), dtype=torch.long),
        "pixel_values": torch.randn(batch * frames, 3, S, S, generator=g),
        "input_ids": ids.repeat(batch, 1), "attention_mask": torch.ones(batch, 48, dtype=torch.long),
        "labels": labels.repeat(batch, 1)}, device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="500M", choices=["256M", "500M", "2.2B"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--steps", type=int, default=1, help="steps to run (each is reported)")
    p.add_argument("--layer-chunk", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="4 frames instead of 12")
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, 2 frames, 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.frames = 4
    overrides = {}
    if args.smoke:
        from bench_parity import smoke_config
        from bench_ttft import TINY_HYPER

        config, device, args.frames, args.steps, overrides = smoke_config(), torch.device("cpu"), 2, 2, TINY_HYPER
    else:
        config, device = M.preset_config(args.size), M.pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        vlm = M.SmolVLM(config).to(dtype).eval().requires_grad_(False)
        hyper = HyperNet(HyperConfig.for_model(config, **overrides))
    opt = torch.optim.AdamW(hyper.parameters(), lr=1e-4, weight_decay=0.01)
    batch = synthetic_batch(config, args.batch, args.frames, device)
    T = batch["ctx_ids"].shape[1]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{'tiny' if args.smoke else args.size} shape, random weights, {name}, base {str(dtype)[6:]}"
          f"{', hypernet under bf16 autocast' if device.type == 'cuda' else ''}: batch {args.batch}, {args.frames} "
          f"frames, T = {T}, hypernet {sum(p.numel() for p in hyper.parameters()) / 1e6:.1f}M params, layer chunk "
          f"{args.layer_chunk or 'all'}\n")
    print("| step | seconds | of it the no-grad video encode | samples/s | loss |\n|---|---|---|---|---|")
    steps = []
    for step in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():  # phase 1 alone, for the breakdown (sample_losses repeats it)
            vlm(batch["ctx_ids"], batch["pixel_values"], batch["ctx_mask"], output_hidden_states=True, logits="none")
        sync(device)
        t1 = time.perf_counter()
        ce, _ = train.sample_losses(vlm, hyper, batch, args.layer_chunk)
        ce.mean().backward()
        torch.nn.utils.clip_grad_norm_(hyper.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        encode, full = t1 - t0, t2 - t1
        steps.append(full)
        print(f"| {step + 1} | {full:.2f} | {encode:.2f} | {args.batch / full:.2f} | {ce.mean().item():.3f} |",
              flush=True)
    steady = statistics.median(steps[1:] or steps)
    if device.type == "cuda":
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (max_memory_allocated)"
    else:
        peak = f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    print(f"\nstep time {steady:.2f} s ({'median of steps 2..' + str(args.steps) if len(steps) > 1 else 'one step'}),"
          f" **{args.batch / steady:.2f} samples/s**; {peak}")
    return {"step_s": steady, "samples_s": args.batch / steady}


if __name__ == "__main__":
    main()
