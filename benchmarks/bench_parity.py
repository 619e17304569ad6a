"""model.py against transformers on the same random weights at the released shapes: logits and greedy tokens.

    python benchmarks/bench_parity.py                 # CUDA, bf16, the 256M, 500M and 2.2B shapes (~1 min on an H100)
    python benchmarks/bench_parity.py --smoke         # a tiny shape on the CPU in fp32 (seconds)

transformers builds and initialises each model (its own init: N(0, 0.02) matrices, norms at one) and ours takes the
very same tensors (load_state_dict(assign=True): the names are the checkpoint's, so the mapping is one to one).
The prompt has the real video layout (bench_model.prompt_ids) with random pixels. Per shape:
  * logits at every prompt position: the largest |ours - transformers|, also relative to the spread (std) of the
    reference logits, and the fraction of positions whose top-1 token agrees;
  * greedy decoding of N tokens by each (M.generate vs transformers' generate): how many leading tokens are equal;
    and teacher-forced along transformers' tokens: at how many of the N steps ours picks the same token;
  * where a top-1 disagrees, the reference's gap between its top two logits: a near tie flips on any rounding.
bf16 kernels differ between the two (fused vs separate ops, different reduction orders), so bf16 parity is a
tolerance, not bit equality; random weights give nearly flat logits, so near ties are far commoner than with a
trained model, which is why the gap is printed beside every disagreement count.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
from bench_model import prompt_ids  # noqa: E402


def smoke_config() -> M.SmolVLMConfig:
    """A tiny SmolVLM2 (2 vision layers, 3 decoder layers with GQA) whose token ids fit prompt_ids's layout."""
    vision = M.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            patch_size=8, image_size=32)
    text = M.TextConfig(vocab_size=49280, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=8, rope_theta=100000.0,
                        rms_norm_eps=1e-5, max_position_embeddings=2048)
    return M.SmolVLMConfig(vision, text, scale_factor=2, image_token_id=49190)


def build_pair(cfg: M.SmolVLMConfig, device, dtype, seed: int = 0):
    """(transformers model, our model) sharing one set of random weights, on `device` in `dtype`."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        hf = SmolVLMForConditionalGeneration(SmolVLMConfig(**cfg.to_hf_dict()))
    hf = hf.to(dtype).eval().requires_grad_(False)
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 2
    with torch.device("meta"):
        ours = M.SmolVLM(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    return hf, ours.eval()


@torch.no_grad()
def compare(hf, ours, cfg: M.SmolVLMConfig, frames: int, new_tokens: int, device, dtype) -> dict:
    """Every number of one table row (see the module docstring)."""
    ids = prompt_ids(cfg, frames).to(device)  # (1, T)
    g = torch.Generator().manual_seed(1)
    S = cfg.vision.image_size
    pixels = (torch.rand(frames, 3, S, S, generator=g) * 2 - 1).to(device, dtype)
    want = hf(input_ids=ids, pixel_values=pixels[None]).logits[0].float()  # (T, V)
    got = ours(ids, pixels).logits[0].float()
    diff = (got - want).abs().max().item()
    top2 = want.topk(2, dim=-1).values  # (T, 2)
    flips = got.argmax(-1) != want.argmax(-1)
    ref = hf.generate(input_ids=ids, pixel_values=pixels[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False)[0, ids.shape[1]:].tolist()
    mine = M.generate(ours, ids, pixel_values=pixels, max_new_tokens=new_tokens)[0]
    equal = next((i for i, (a, b) in enumerate(zip(ref, mine)) if a != b), len(ref))
    forced = torch.cat([ids, torch.tensor([ref[:-1]], device=device)], dim=1)  # transformers' tokens, teacher-forced
    step_want = hf(input_ids=forced, pixel_values=pixels[None]).logits[0, ids.shape[1] - 1:].float()
    step_got = ours(forced, pixels).logits[0, ids.shape[1] - 1:].float()
    step_flips = step_got.argmax(-1) != step_want.argmax(-1)
    gaps = torch.cat([(top2[:, 0] - top2[:, 1])[flips], (lambda t: t[:, 0] - t[:, 1])(
        step_want.topk(2, dim=-1).values)[step_flips]])
    return {"tokens": ids.shape[1], "max_abs": diff, "rel": diff / want.std().item(),
            "top1": 1 - flips.float().mean().item(), "greedy_equal": equal, "forced_equal": int((~step_flips).sum()),
            "new_tokens": new_tokens, "max_gap_at_flip": gaps.max().item() if len(gaps) else None,
            "median_gap": (top2[:, 0] - top2[:, 1]).median().item()}


def markdown(rows: dict, device, dtype, frames: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out = [f"model.py vs transformers (same random weights), {name}, {str(dtype).replace('torch.', '')}, {frames} "
           f"frames of random pixels, torch {torch.__version__}", "",
           "| shape | prompt tokens | max abs Δ logit (÷ logit std) | top-1 agreement, prompt positions "
           "| greedy: equal leading tokens | teacher-forced: equal steps | largest top-2 gap at a flip "
           "(median gap) | seconds |", "|---|---|---|---|---|---|---|---|"]
    for shape, r in rows.items():
        gap = "no flip" if r["max_gap_at_flip"] is None else f"{r['max_gap_at_flip']:.3g}"
        out.append(f"| {shape} | {r['tokens']} | {r['max_abs']:.3g} ({r['rel']:.2g}) | {r['top1']:.4f} "
                   f"| {r['greedy_equal']} / {r['new_tokens']} | {r['forced_equal']} / {r['new_tokens']} "
                   f"| {gap} ({r['median_gap']:.3g}) | {r['seconds']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256M,500M,2.2B", help="released shapes to compare")
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, fp32")
    args = p.parse_args(argv)
    device = M.pick_device("cpu" if args.smoke else args.device)
    dtype = M.pick_dtype(args.dtype, device)
    shapes = {"tiny": smoke_config()} if args.smoke else {s: M.preset_config(s) for s in args.sizes.split(",")}
    rows = {}
    for shape, cfg in shapes.items():
        t0 = time.perf_counter()
        hf, ours = build_pair(cfg, device, dtype)
        rows[shape] = compare(hf, ours, cfg, args.frames, args.new_tokens, device, dtype)
        rows[shape]["seconds"] = time.perf_counter() - t0
        del hf, ours
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{shape}: {rows[shape]}", file=sys.stderr, flush=True)
    print(markdown(rows, device, dtype, args.frames))
    return rows


if __name__ == "__main__":
    main()
