"""Query time-to-first-token, the memory a ready-to-ask video takes, and how close the heavy steps come to the
machine's limits: the video in context vs its KV cache kept across questions vs the adapter vs the text alone.

    python benchmarks/bench_ttft.py                # 500M shape, random weights, 8..64 frames (~20 min on 2 free cores)
    python benchmarks/bench_ttft.py --quick        # 8 and 16 frames, one frame size, fewer repeats (~3 min)
    python benchmarks/bench_ttft.py --size tiny    # the toy base + hypernet (random ones until they are trained)
    python benchmarks/bench_ttft.py --device cuda --max-frames 1024 --frames 8,64,256,1024   # past the 64-frame cap

Protocol (method.md §5, §9.4, §11), everything on the same base weights in one process:
  (a) in context: [video + question], prefilled with the frames' pixels, then the first token;
  (d) kept KV cache, the strongest baseline (prefix caching, as vLLM and SGLang do): [chat start + video] is
      prefilled once into a KV cache that is kept; each question then prefills only its own tokens after that
      prefix (the cache is cut back to the prefix first) and samples its first token;
  (b) adapter: the text-only question with the video's LoRA passed to forward (zero visual tokens), and the
      same LoRA merged into the weights (W + alpha B^T A), the batch-1 way to answer;
  (c) text alone: the same text-only question, no LoRA.
TTFT = prefill + first token with the inputs ready (ids and pixels in memory, the kept cache in memory): from the
call to its first sampled token, synchronised on CUDA, the median over repeats (round-robin, so a busy machine slows
every condition alike), warm-up excluded. Internalization, once per video, is split into decode (PyAV + sampling +
pixels), VLM encode (the hidden states) and hypernetwork; the kept cache's one-time cost is its prefill. Amortised
cost per question over n questions: adapter = (decode + encode + hypernet) / n + TTFT(b); kept = (decode + prefill)
/ n + TTFT(d); in context = decode / n + TTFT(a) (frames decoded once and kept).
A ready-to-ask video is the kept KV cache (2 L Hkv hd T elements, counted from the cache's tensors) or the adapter
file (written by adapter.save_adapter, fp32 and bf16); "fit" is how many of them the given memory holds beside the base
weights in that dtype. Decode rates (tokens after the first) come with the bytes a token reads (decoder weights +
KV) against the copy bandwidth measured in the same run; the encode's and the hypernetwork's FLOP/s (analytic
counts, benchmarks/limits.py) against a large matmul's, also measured in the same run.
The frame size (the processor's longest edge) changes decoding only: SmolVLM2 never tiles video frames, every
frame is squashed to the encoder's square, so token counts and the model's inputs do not depend on it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import adapter  # noqa: E402
import data  # noqa: E402
import limits  # noqa: E402
import model as M  # noqa: E402
from toy import world
from hypernet import HyperConfig, HyperNet, load_hypernet  # noqa: E402

QUESTION = "Describe the video."
OTHER_QUESTION = "What colour is the circle?"  # a second question: where the two prompts part is the video prefix
MAX_FRAMES = 64  # SmolVLM2's processor default cap (video_sampling.max_frames): asking for more gives 64
AMORTISE_N = (1, 2, 3, 4, 5, 10, 15, 20, 25)
MEMORY_GB = (24, 80)  # this machine's RAM; one H100's memory
TINY_HYPER = dict(latent_size=64, n_latents=4, num_blocks=2, n_heads=4, head_dim=16, n_kv_heads=2)


# ------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stamped(run, device) -> list[float]:
    """Seconds from calling run(on_token) to each token it reports: [0] is the TTFT, the rest time the decode."""
    stamps = []

    def seen(token):  # called once each token exists
        sync(token.device)
        stamps.append(time.perf_counter())

    sync(device)
    t0 = time.perf_counter()
    run(seen)
    return [t - t0 for t in stamps]


def ttft(vlm, ids, pixels=None, lora=None, alpha=128.0, tokens: int = 1) -> float | list[float]:
    """Seconds from calling `generate` to its first token (prefill + first sampled token); with tokens > 1, the
    stamps of all of them."""
    t = stamped(lambda seen: M.generate(vlm, ids, pixel_values=pixels, lora=lora, lora_alpha=alpha,
                                        max_new_tokens=tokens, on_token=seen), ids.device)
    return t[0] if tokens == 1 else t


def decode_rate(stamps: list[float]) -> float:
    """Tokens per second after the first (the first token's time is the TTFT)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure(fns: dict, repeats: int, budget_s: float, device) -> dict[str, tuple[float, int]]:
    """Run every fn round-robin up to `repeats` rounds, stopping after the round that exceeds `budget_s` (so a
    64-frame prefill on a CPU runs once). fn returns its own seconds or None (then it is timed here).
    -> {name: (median seconds, rounds)}."""
    times = {k: [] for k in fns}
    start = time.perf_counter()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            s = fn()
            sync(device)
            times[name].append(s if s is not None else time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return {k: (statistics.median(v), len(v)) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------ the adapter
def lora_modules(vlm, target: str) -> list[torch.nn.Linear]:
    """The decoder linear called `target` in every layer, in layer order."""
    where = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return [getattr(getattr(layer, where), target) for layer in vlm.model.text_model.layers]


@torch.no_grad()
def merge_lora(vlm, lora: dict, alpha: float) -> list[tuple[torch.nn.Linear, torch.Tensor]]:
    """Fold a batch-1 LoRA into new weights W' = W + alpha * B^T A (what forward(lora=...) adds, method.md §4),
    computed in fp32 and cast to W's dtype. Returns (module, merged weight) pairs; `swapped` installs them."""
    merged = []
    for target, (A, B) in lora.items():  # A (1, L, r, d_in), B (1, L, r, d_out)
        if A.shape[0] != 1:
            raise ValueError("merging needs a batch-1 LoRA: every row of a batch has its own adapter")
        for layer, lin in enumerate(lora_modules(vlm, target)):
            delta = B[0, layer].float().T @ A[0, layer].float()  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
            merged.append((lin, (lin.weight.float() + alpha * delta).to(lin.weight.dtype)))
    return merged


@contextlib.contextmanager
def swapped(merged: list[tuple[torch.nn.Linear, torch.Tensor]]):
    """Answer with merged weights inside the block; the base weights are back (the same tensors) after it."""
    saved = [(lin, lin.weight) for lin, _ in merged]
    for lin, w in merged:
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
    try:
        yield
    finally:
        for lin, w in saved:
            lin.weight = w


# ------------------------------------------------------------------------------------------------ the kept KV cache
def prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common start of two (1, T) prompts: for [video + question 1] and [video + question 2], the
    video prefix every question can share (chat start, the video's intro and frames, the blank line after them)."""
    n = min(a.shape[1], b.shape[1])
    differ = (a[0, :n] != b[0, :n]).nonzero()
    return int(differ[0]) if len(differ) else n


@torch.no_grad()
def prefill_video(vlm, prefix_ids, pixels, room: int) -> M.KVCache:
    """Read the video prefix (1, P) once into a KV cache with `room` free slots for a question and its answer."""
    cache = vlm.new_cache(1, prefix_ids.shape[1] + room)
    vlm(prefix_ids, pixels, cache=cache, logits="none")
    return cache


@torch.no_grad()
def ask_kept(vlm, cache: M.KVCache, prefix_len: int, question_ids, max_new_tokens: int = 1,
             on_token=None) -> tuple[list[int], torch.Tensor]:
    """Answer greedily from a kept video cache: cut it back to the prefix (an earlier question and its answer sit in
    the slots after it; the new tokens overwrite them and the attention never reads past cache.length), prefill only
    the question's (1, Q) tokens, then decode. The cache's positions continue the prefix's, as in a full re-read.
    -> (tokens, logits (n, V) that chose them)."""
    if cache.length < prefix_len or prefix_len + question_ids.shape[1] + max_new_tokens > cache.k.shape[3]:
        raise ValueError(f"the cache holds {cache.length} of {cache.k.shape[3]} slots: no room for a "
                         f"{question_ids.shape[1]}-token question after a {prefix_len}-token prefix")
    cache.length = prefix_len
    out = vlm(question_ids, cache=cache, logits="last")
    tokens, logits = [], []
    for step in range(max_new_tokens):
        logits.append(out.logits[0, -1])
        nxt = out.logits[:, -1].argmax(-1)  # (1,)
        tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if step < max_new_tokens - 1:
            out = vlm(nxt[:, None], cache=cache, logits="last")
    return torch.cat(tokens).tolist(), torch.stack(logits)


def kv_bytes(cache: M.KVCache, length: int) -> dict[str, int]:
    """Bytes of the keys and values of `length` positions, counted from the cache's tensors, in fp32 and bf16."""
    n = cache.k[..., :length, :].numel() + cache.v[..., :length, :].numel()  # 2 L Hkv hd length
    return {"fp32": 4 * n, "bf16": 2 * n}


def adapter_file_bytes(lora: dict, rank: int) -> dict[str, int]:
    """Bytes of the adapter file internalize.py would write for this LoRA (adapter.save_adapter), in fp32 and bf16:
    the tensors and the metadata internalize.py records (digests as placeholders of the same length)."""
    sha = "0" * 64
    A = next(iter(lora.values()))[0]  # (1, L, 2r, d_in)
    meta = {"base_model": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct", "base_size": "500M", "base_config_sha256": sha,
            "base_weights_sha256": sha, "hypernet": "hf:MananSuri27/Frames2LoRA-SmolVLM-ckpts/"
            "frames2lora-smolvlm2-500m-best-ce.pt", "hypernet_sha256": sha, "alpha": 16.0, "num_layers": A.shape[1],
            "targets": [[t, a.shape[-1], b.shape[-1]] for t, (a, b) in lora.items()], "frames": 64,
            "video_size": 384, "frame_side": 512, "video": "clip.mp4", "video_sha256": sha, "start": 0.0,
            "end": 60.0, "segments": [{"video": "clip.mp4", "video_sha256": sha, "start": 0.0, "end": 60.0,
                                       "frames": 64, "weight": 1.0}], "created_by": "internalize.py"}
    ad = adapter.adapter_from_lora(lora, rank, meta)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            out[name] = adapter.save_adapter(Path(tmp) / f"{name}.safetensors", ad, dtype).stat().st_size
    return out


def model_bytes(vlm) -> dict[str, int]:
    """The whole base model (vision tower, connector, decoder, head) in fp32 and bf16: what answering needs resident."""
    n = sum(p.numel() for p in vlm.parameters())
    return {"fp32": 4 * n, "bf16": 2 * n}


def fits(memory_gb: float, per_video: int, base: int) -> int:
    """Ready videos that fit in `memory_gb` (10^9 bytes) beside the base weights."""
    return max(0, int((memory_gb * 1e9 - base) // per_video))


# ------------------------------------------------------------------------------------------------ setup
@dataclass
class Setup:
    vlm: M.SmolVLM
    hyper: HyperNet
    proc_dir: Path            # config.json + tokenizer.json for data.Processor
    label: str                # what the table header says about the weights

    def processor(self, frames: int, size: int) -> data.Processor:
        return data.Processor(self.proc_dir, max_frames=frames, video_size=size)

    def ids(self, proc: data.Processor, ids: torch.Tensor) -> torch.Tensor:
        """The toy tokenizer stands in for SmolLM2's when a checkpoint ships none: its <image> id becomes the
        model's (49190). Every other id is a valid row of the real vocabulary, and <image> is all that splices."""
        ids = ids.clone()
        ids[ids == proc.image_token_id] = self.vlm.config.image_token_id
        return ids.to(self.vlm.model.text_model.embed_tokens.weight.device)


def random_vlm(cfg: M.SmolVLMConfig, seed: int, device="cpu") -> M.SmolVLM:
    """Random weights without a checkpoint (e.g. on a GPU machine): N(0, 0.02) matrices, norms at one. Built on
    `device` (a 2.2B model initialises in a second on a GPU, in a minute on a CPU)."""
    torch.manual_seed(seed)
    with torch.device(device):
        vlm = M.SmolVLM(cfg)
    for p in vlm.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    return vlm.eval().requires_grad_(False)


def write_proc_dir(cfg: M.SmolVLMConfig, path: Path) -> Path:
    """config.json + the toy tokenizer: enough for data.Processor to build SmolVLM2's real prompt layout with the
    real tokens per frame. Only the word pieces differ from SmolLM2's BPE (a few text tokens either way)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    world.toy_tokenizer().save(str(path / "tokenizer.json"))
    return path


def random_hypernet(cfg: M.SmolVLMConfig, seed: int, device="cpu", **overrides) -> HyperNet:
    """A fresh hypernetwork with scaler_B made non-zero, so the LoRA is a real (random) update, not dW = 0."""
    torch.manual_seed(seed)
    with torch.device(device):
        hyper = HyperNet(HyperConfig.for_model(cfg, **overrides)).eval().requires_grad_(False)
    for s in hyper.scaler_B.values():
        s.data.fill_(0.01)
    return hyper


def tiny_setup(workdir: Path, device, dtype, seed: int = 0) -> Setup:
    """The shipped toy base and hypernet if they exist, else random ones of the toy shape (written once)."""
    hyper_dir = M.TINY_DIR.parent / "hypernet"
    if (M.TINY_DIR / "model.safetensors").exists():
        base, label = M.TINY_DIR, "toy base (checkpoints/tiny/base)"
    else:
        from toy import base as toy_base

        base, label = workdir / "random-tiny", "toy shape, random weights"
        if not (base / "model.safetensors").exists():
            tok = world.toy_tokenizer()
            cfg = toy_base.toy_config(tok.get_vocab_size(), tok.token_to_id("<image>"))
            toy_base.write_model_dir(base, cfg, tok, random_vlm(cfg, seed).state_dict())
    vlm = M.load_model(base, dtype, device)
    if (hyper_dir / "hypernet.safetensors").exists():
        hyper, label = load_hypernet(hyper_dir, vlm.config).eval().requires_grad_(False), label + " + trained hypernet"
    else:
        hyper, label = random_hypernet(vlm.config, seed, **TINY_HYPER), label + " + random hypernet"
    return Setup(vlm, hyper.to(device), base, label)


def real_setup(size: str, model_dir, workdir: Path, device, dtype, seed: int = 0) -> Setup:
    """A released shape with random weights: the checkpoint in `model_dir` (bench_model.py writes one to
    /tmp/v2l-bench/random-500M) if it exists, else built in memory; the hypernetwork at the released config."""
    cfg = M.preset_config(size)
    path = Path(model_dir or workdir / f"random-{size}")
    if (path / "config.json").exists():
        vlm, label = M.load_model(path, dtype, device), f"{size} shape, random weights ({path})"
    else:
        vlm, label = random_vlm(cfg, seed, device).to(dtype), f"{size} shape, random weights (seed {seed})"
    return Setup(vlm, random_hypernet(vlm.config, seed, device), write_proc_dir(vlm.config, workdir / f"proc-{size}"),
                 label + ", released hypernet config")


def long_clip(workdir: Path, width: int, height: int, seconds: int, fps: int = 4) -> Path:
    """An H.264 clip of `seconds` (SmolVLM2 samples 1 frame/s): one shape crossing a black frame."""
    path = workdir / f"clip-{width}x{height}-{seconds}s-{fps}fps.mp4"
    if not path.exists():
        side = min(width, height) // 4
        obj = world.ObjectSpec("red", (220, 40, 40), "circle", side, 0.0, (height - side) / 2, "right", 0.7)
        world.write_clip(world.ClipSpec(width, height, fps, seconds * fps, (obj,)), path)
    return path


# ------------------------------------------------------------------------------------------------ one frame count
def encode(vlm, ids, pixels) -> torch.Tensor:
    """hypernet.internalize, first half: the plain VLM's residual streams entering its L layers -> (1, L, T, D)."""
    with torch.no_grad():
        return torch.stack(vlm(ids, pixels, output_hidden_states=True, logits="none").hidden_states, dim=1)


def bench_frames(s: Setup, clip_path: Path, requested: int, args) -> dict:
    """Every number of the tables for one requested frame count (capped at args.max_frames, as the processor is)."""
    w = s.vlm.model.text_model.embed_tokens.weight
    device, dtype = w.device, w.dtype
    timing = dict(repeats=args.repeats, budget_s=args.budget_s, device=device)
    held, decode = {}, {}
    for size in args.sizes:  # decoding is the only step the frame size changes
        proc = s.processor(min(requested, args.max_frames), size)

        def load(proc=proc, size=size):
            held[size] = proc.load_video(clip_path)  # (F, 3, S, S) pixels, S the encoder's side whatever `size`

        decode[size] = measure({"decode": load}, **timing)["decode"]
    shapes = {tuple(torch.stack(held[z].frames).shape) for z in args.sizes}
    assert len(shapes) == 1, f"frame size changed the model inputs: {shapes}"
    clip, proc = held[args.sizes[0]], s.processor(min(requested, args.max_frames), args.sizes[0])
    ctx_ids, pixels = proc.question_inputs(QUESTION, clip)
    ctx_ids, pixels = s.ids(proc, ctx_ids), pixels.to(device, dtype)
    int_ids = s.ids(proc, proc.internalization_inputs(clip)[0])
    txt_ids = s.ids(proc, proc.question_inputs(QUESTION)[0])  # the same for the adapter and the text alone
    P = prefix_length(ctx_ids, s.ids(proc, proc.question_inputs(OTHER_QUESTION, clip)[0]))
    q_ids = ctx_ids[:, P:]  # (1, Q): the question's own tokens after the kept video prefix
    n_dec, alpha = args.decode_tokens, s.hyper.config.alpha
    n = args.matmul_n or (8192 if device.type == "cuda" else 4096)  # the reference matmul, large enough for the peak
    held["mat"] = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def matmul():
        a, b = held["mat"]
        a @ b

    def enc():
        held["hidden"] = encode(s.vlm, int_ids, pixels)

    def hyper():
        with torch.no_grad():
            held["lora"] = s.hyper(held["hidden"], layer_chunk=args.layer_chunk)

    def merge():
        held["merged"] = merge_lora(s.vlm, held["lora"], alpha)

    def merged_ttft():
        with swapped(held["merged"]):
            return ttft(s.vlm, txt_ids)

    def kept_prefill():
        held.pop("cache", None)  # free the previous cache before allocating the next
        held["cache"] = prefill_video(s.vlm, ctx_ids[:, :P], pixels, room=q_ids.shape[1] + 1 + n_dec)

    def kept(tokens=1):
        t = stamped(lambda seen: ask_kept(s.vlm, held["cache"], P, q_ids, tokens, seen), device)
        return t[0] if tokens == 1 else t

    # The heavy steps and the reference matmul round-robin, so a busy machine slows them alike.
    heavy = measure({"in_context": lambda: ttft(s.vlm, ctx_ids, pixels), "encode": enc, "hypernet": hyper,
                     "matmul": matmul}, **timing)
    del held["hidden"], held["mat"]
    heavy |= measure({"kept_prefill": kept_prefill}, **{**timing, "repeats": 1})  # paid once per video
    heavy |= measure({"merge": merge}, **timing)
    heavy |= measure({"text": lambda: ttft(s.vlm, txt_ids),
                      "adapter": lambda: ttft(s.vlm, txt_ids, lora=held["lora"], alpha=alpha),
                      "merged": merged_ttft, "kept": kept}, **timing)
    rates = {k: [] for k in ("kept", "adapter", "text")}
    for _ in range(min(3, args.repeats) if n_dec else 0):  # tokens after the first, round-robin
        rates["kept"].append(decode_rate(kept(1 + n_dec)))
        rates["adapter"].append(decode_rate(ttft(s.vlm, txt_ids, lora=held["lora"], alpha=alpha, tokens=1 + n_dec)))
        rates["text"].append(decode_rate(ttft(s.vlm, txt_ids, tokens=1 + n_dec)))
    lora_bytes = limits.tensor_bytes(x for ab in held["lora"].values() for x in ab)
    mid = n_dec // 2  # the cache's length halfway through the decode
    hc = s.hyper.config
    return {"requested": requested, "frames": len(clip.frames),
            "tokens": {"in_context": ctx_ids.shape[1], "adapter": txt_ids.shape[1], "text": txt_ids.shape[1],
                       "internalize": int_ids.shape[1], "prefix": P, "kept": q_ids.shape[1]},
            "window": ctx_ids.shape[1] > s.vlm.config.text.max_position_embeddings,
            "seconds": {k: v[0] for k, v in heavy.items()} | {f"decode_{z}": decode[z][0] for z in args.sizes},
            "rounds": {k: v[1] for k, v in heavy.items()} | {f"decode_{z}": decode[z][1] for z in args.sizes},
            "decode_tok_s": {k: statistics.median(v) for k, v in rates.items() if v},
            "bytes": {"kv": kv_bytes(held["cache"], P), "adapter": adapter_file_bytes(held["lora"], hc.rank),
                      "model": model_bytes(s.vlm),
                      "token_kept": sum(limits.decode_bytes(s.vlm, ctx_ids.shape[1] + mid).values()),
                      "token_adapter": sum(limits.decode_bytes(s.vlm, txt_ids.shape[1] + mid).values()) + lora_bytes,
                      "token_text": sum(limits.decode_bytes(s.vlm, txt_ids.shape[1] + mid).values())},
            "bandwidth": max(limits.copy_bandwidth(device).values()),
            "flops": {"encode": sum(limits.encode_flops(s.vlm.config, len(clip.frames), int_ids.shape[1]).values()),
                      "hypernet": sum(limits.hypernet_flops(hc, int_ids.shape[1]).values()),
                      "matmul": 2 * n**3}}


# ------------------------------------------------------------------------------------------------ report
def amortised(row: dict, n: int, size: int) -> tuple[float, float, float]:
    """Seconds per question over n questions on one video: (adapter, in context, kept KV cache)."""
    s = row["seconds"]
    decode = s[f"decode_{size}"]
    return ((decode + s["encode"] + s["hypernet"]) / n + s["adapter"], decode / n + s["in_context"],
            (decode + s["kept_prefill"]) / n + s["kept"])


def targets(rows: list[dict]) -> list[str]:
    """The issue's three checks, each one line starting PASS or FAIL."""
    ratio = [r["seconds"]["adapter"] / r["seconds"]["text"] for r in rows]
    merged = [r["seconds"]["merged"] / r["seconds"]["text"] for r in rows]
    speed = [r["seconds"]["in_context"] / r["seconds"]["adapter"] for r in rows]
    tokens = {r["tokens"]["adapter"] for r in rows}
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    # Two adapter paths: the LoRA as a forward argument adds a few small ops per layer, which cost kernel launches
    # on a GPU and thread barriers on a busy CPU; merged into the weights (batch-1 answering) it adds none.
    return [f"{ok(max(ratio) <= 1.10)} adapter (LoRA argument) TTFT within 10 % of text alone at every frame "
            f"count (adapter / text: {fmt(ratio)})",
            f"{ok(max(merged) <= 1.10)} adapter (LoRA merged) TTFT within 10 % of text alone at every frame "
            f"count (merged / text: {fmt(merged)})",
            f"{ok(len(tokens) == 1)} adapter input tokens independent of video length ({sorted(tokens)})",
            f"{ok(all(b >= a for a, b in zip(speed, speed[1:])))} speedup over in-context grows with frames "
            f"({', '.join(f'{x:.1f}x' for x in speed)})"]


GB = 1e9


def answer_table(rows: list[dict]) -> list[str]:
    out = ["**Answer time** (per question; TTFT = prefill + first token, seconds; † = the prompt is longer than the "
           "model's context window, timed for cost only)", "",
           "| frames (asked → got) | tokens prefilled per question: in-context / kept KV / adapter (reduction) "
           "| TTFT in-context | TTFT kept KV | TTFT adapter | TTFT adapter merged | TTFT text "
           "| in-context / adapter | kept KV / adapter | adapter / text |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, s = r["tokens"], r["seconds"]
        out.append(f"| {r['requested']} → {r['frames']}{' †' if r['window'] else ''} | {t['in_context']} / "
                   f"{t['kept']} / {t['adapter']} (**{t['in_context'] / t['adapter']:.0f}×**) | {s['in_context']:.3f} "
                   f"| {s['kept']:.3f} | {s['adapter']:.3f} | {s['merged']:.3f} | {s['text']:.3f} "
                   f"| **{s['in_context'] / s['adapter']:.1f}×** | **{s['kept'] / s['adapter']:.2f}×** "
                   f"| {s['adapter'] / s['text']:.2f} |")
    return out


def memory_table(rows: list[dict]) -> list[str]:
    """What a ready-to-ask video occupies, and how many fit beside the base weights."""
    out = ["", "**A ready-to-ask video** (MB = 10^6 bytes; KV cache of the video prefix vs the adapter file; "
           "fit = videos held beside the base weights in that dtype)", "",
           "| frames | prefix tokens | KV cache fp32 / bf16 MB | adapter file fp32 / bf16 MB | KV / adapter "
           + "".join(f"| fit in {g} GB, fp32: KV / adapter | fit in {g} GB, bf16: KV / adapter " for g in MEMORY_GB)
           + "|", "|---" * (5 + 2 * len(MEMORY_GB)) + "|"]
    for r in rows:
        b = r["bytes"]
        kv, ad, base = b["kv"], b["adapter"], b["model"]
        cells = [f"{fits(g, kv[d], base[d]):,} / {fits(g, ad[d], base[d]):,}" for g in MEMORY_GB for d in ("fp32", "bf16")]
        out.append(f"| {r['frames']} | {r['tokens']['prefix']} | {kv['fp32'] / 1e6:.1f} / {kv['bf16'] / 1e6:.1f} "
                   f"| {ad['fp32'] / 1e6:.2f} / {ad['bf16'] / 1e6:.2f} | **{kv['fp32'] / ad['fp32']:.1f}×** | "
                   + " | ".join(cells) + " |")
    return out


def decode_table(rows: list[dict]) -> list[str]:
    if not rows[0]["decode_tok_s"]:
        return []
    out = ["", "**Decoding after the first token** (tokens/s; a token reads every decoder weight and the whole KV "
           "cache, plus the LoRA on the adapter path; bound = copy bandwidth / bytes per token)", "",
           "| frames | kept KV tok/s | adapter tok/s | text tok/s | GB per token: kept / adapter "
           "| of the bound: kept / adapter | bandwidth GB/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d, b, bw = r["decode_tok_s"], r["bytes"], r["bandwidth"]
        out.append(f"| {r['frames']} | {d['kept']:.1f} | {d['adapter']:.1f} | {d['text']:.1f} "
                   f"| {b['token_kept'] / GB:.3f} / {b['token_adapter'] / GB:.3f} "
                   f"| {d['kept'] * b['token_kept'] / bw:.2f} / {d['adapter'] * b['token_adapter'] / bw:.2f} "
                   f"| {bw / GB:.1f} |")
    return out


def internalization_table(rows: list[dict], sizes: list[int]) -> list[str]:
    z = sizes[0]
    out = ["", "**Once per video** (seconds; decode per processor longest edge; the kept KV cache's one-time cost "
           "is its prefill)", "",
           "| frames | tokens read | " + " | ".join(f"decode {x} px" for x in sizes)
           + " | VLM encode | hypernet | adapter total | merge (optional) | kept KV prefill |",
           "|---" * (7 + len(sizes)) + "|"]
    for r in rows:
        s = r["seconds"]
        out.append(f"| {r['frames']} | {r['tokens']['internalize']} | "
                   + " | ".join(f"{s[f'decode_{x}']:.2f}" for x in sizes)
                   + f" | {s['encode']:.2f} | {s['hypernet']:.2f} | {s[f'decode_{z}'] + s['encode'] + s['hypernet']:.2f}"
                   f" | {s['merge']:.3f} | {s['kept_prefill']:.2f} |")
    return out


def amortised_table(rows: list[dict], z: int) -> list[str]:
    out = ["", f"**Amortised per question** (seconds, one-time costs included, decode at {z} px): adapter / kept KV / "
           "in context (kept KV ÷ adapter)", "",
           "| questions | " + " | ".join(f"{r['frames']} frames" for r in rows) + " |", "|---" * (1 + len(rows)) + "|"]
    for n in AMORTISE_N:
        cells = [amortised(r, n, z) for r in rows]
        out.append(f"| {n} | " + " | ".join(f"{a:.2f} / {k:.2f} / {c:.2f} ({k / a:.1f}×)" for a, c, k in cells) + " |")
    return out


def limits_table(rows: list[dict]) -> list[str]:
    out = ["", "**Close to the limit** (achieved FLOP/s of the once-per-video steps, analytic FLOPs with causal "
           "attention counted as its lower triangle, against an n × n matmul in the model's dtype timed "
           "round-robin with them)", "",
           "| frames | matmul GFLOP/s | VLM encode: GFLOP, GFLOP/s, of matmul | hypernet: GFLOP, GFLOP/s, of matmul |",
           "|---|---|---|---|"]
    for r in rows:
        f, s = r["flops"], r["seconds"]
        peak = f["matmul"] / s["matmul"]
        out.append(f"| {r['frames']} | {peak / GB:.1f} | {f['encode'] / GB:.1f}, {f['encode'] / s['encode'] / GB:.1f}, "
                   f"**{f['encode'] / s['encode'] / peak:.2f}** | {f['hypernet'] / GB:.1f}, "
                   f"{f['hypernet'] / s['hypernet'] / GB:.1f}, **{f['hypernet'] / s['hypernet'] / peak:.2f}** |")
    return out


def markdown(rows: list[dict], meta: str, sizes: list[int]) -> str:
    out = [meta, ""] + answer_table(rows) + memory_table(rows) + decode_table(rows) \
        + internalization_table(rows, sizes) + amortised_table(rows, sizes[0]) + limits_table(rows)
    out += ["", "Timed runs per cell, over the frame counts (the median is reported; fewer runs once a cell "
            "exceeds the time budget): " + ", ".join(f"{k} {min(r['rounds'][k] for r in rows)}–"
                                                    f"{max(r['rounds'][k] for r in rows)}" for k in rows[0]["rounds"]),
            "", "**Targets**", ""] + [f"- {line}" for line in targets(rows)]
    return "\n".join(out) + "\n"


def plots(rows: list[dict], out: Path, title: str, size: int) -> list[Path]:
    """ttft_vs_frames.png and amortised.png; skipped with a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed, no plots (pip install matplotlib)", file=sys.stderr)
        return []
    frames = [r["frames"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("in_context", "(a) video in context", "o-"), ("kept", "(d) kept KV cache", "d-"),
                              ("adapter", "(b) adapter", "s-"),
                              ("merged", "(b) adapter, merged", "x--"), ("text", "(c) text alone", "^:")):
        ax.plot(frames, [r["seconds"][key] for r in rows], style, label=label)
    ax.set(xlabel="frames", ylabel="query TTFT (s)", yscale="log", title=title)
    ax.legend()
    fig2, ax2 = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(rows):
        pts = [amortised(r, n, size) for n in range(1, 26)]
        ax2.plot(range(1, 26), [a for a, _, _ in pts], "-", color=f"C{i}", label=f"adapter, {r['frames']} frames")
        ax2.plot(range(1, 26), [k for _, _, k in pts], ":", color=f"C{i}", label=f"kept KV, {r['frames']} frames")
        ax2.plot(range(1, 26), [c for _, c, _ in pts], "--", color=f"C{i}", label=f"in context, {r['frames']} frames")
    ax2.set(xlabel="questions per video", ylabel="seconds per question", yscale="log",
            title="amortised cost (internalization included)")
    ax2.legend(fontsize=7, ncol=2)
    paths = []
    for f, name in ((fig, "ttft_vs_frames.png"), (fig2, "amortised.png")):
        f.tight_layout()
        f.savefig(out / (name + ".tmp"), format="png", dpi=120)
        os.replace(out / (name + ".tmp"), out / name)
        paths.append(out / name)
    plt.close("all")
    return paths


def write_atomic(path: Path, text: str):
    path.with_name(path.name + ".tmp").write_text(text)
    os.replace(path.with_name(path.name + ".tmp"), path)


def run(s: Setup, args, on_row=None) -> tuple[list[dict], str]:
    """Warm up every condition on a 1-frame video (not counted), then sweep the frame counts; on_row(rows, meta)
    after each one (the results so far are written, so a run cut short still leaves its tables)."""
    w, h = args.clip
    # Long enough for the most frames asked at SmolVLM2's 1 frame/s; past the default cap, 2 fps keeps it small.
    seconds = max(MAX_FRAMES, min(max(args.frames), args.max_frames)) + 4
    fps = 4 if seconds <= MAX_FRAMES + 4 else 2
    clip = long_clip(Path(args.workdir), w, h, seconds=seconds, fps=fps)
    hc = s.hyper.config
    w_ = s.vlm.model.text_model.embed_tokens.weight
    meta = (f"{s.label}; {w_.device.type} {str(w_.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads"
            f"{', ' + torch.cuda.get_device_name(w_.device) if w_.device.type == 'cuda' else ''}, torch "
            f"{torch.__version__}; {s.vlm.config.image_seq_len} tokens per frame; hypernet latent {hc.latent_size}, "
            f"{hc.num_blocks} blocks, rank {hc.rank} (+{hc.rank} static) on {', '.join(hc.targets)}, layer chunk "
            f"{args.layer_chunk}; clip {w}x{h} H.264, {seconds} s at {fps} fps, at most {args.max_frames} frames "
            f"sampled; question {QUESTION!r}; context window {s.vlm.config.text.max_position_embeddings} positions; "
            f"up to {args.repeats} timed runs per cell, warm-up excluded; {args.decode_tokens} decode tokens timed.")
    warm = argparse.Namespace(**{**vars(args), "repeats": 1, "sizes": args.sizes[:1]})
    t0 = time.perf_counter()
    bench_frames(s, clip, 1, warm)
    print(f"warm-up done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = []
    for n in args.frames:
        t0 = time.perf_counter()
        rows.append(bench_frames(s, clip, n, args))
        r = rows[-1]
        print(f"{n} frames asked, {r['frames']} got: in-context {r['seconds']['in_context']:.3f} s, kept KV "
              f"{r['seconds']['kept']:.3f} s, adapter {r['seconds']['adapter']:.3f} s, text {r['seconds']['text']:.3f} s "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        if on_row is not None:
            on_row(rows, meta)
    return rows, meta


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="500M", choices=["tiny", *M.PRESETS], help="model shape (default 500M)")
    p.add_argument("--model", help="checkpoint folder for a released shape (default WORKDIR/random-SIZE, "
                                   "else random weights built in memory)")
    p.add_argument("--frames", default="8,12,24,48,64", help="frame counts to ask for (capped at --max-frames)")
    p.add_argument("--max-frames", type=int, default=MAX_FRAMES,
                   help=f"the processor's frame cap (default {MAX_FRAMES}, SmolVLM2's own; raise it to sweep further)")
    p.add_argument("--decode-tokens", type=int, default=8,
                   help="tokens decoded after the first to time decoding (kept KV, adapter, text); 0 skips it")
    p.add_argument("--sizes", default="384,1024", help="processor longest-edge sizes, px (the first is the main one)")
    p.add_argument("--clip", default="640x360", help="source clip resolution WxH (H.264, 4 fps)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per cell at most")
    p.add_argument("--budget-s", type=float, default=20.0, help="stop repeating a cell after this many seconds")
    p.add_argument("--layer-chunk", type=int, default=8, help="hypernet layers per chunk (bounds its memory)")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="side of the reference n x n matmul (default 4096 on a CPU, 8192 on a GPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workdir", default="/tmp/v2l-bench", help="where the clip and random checkpoints are cached")
    p.add_argument("--out", default="results/ttft", help="results folder (Markdown, JSON, PNG)")
    p.add_argument("--quick", action="store_true", help="8 and 16 frames, one size, 5 runs, 5 s budget")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.sizes, args.repeats, args.budget_s = "8,16", args.sizes.split(",")[0], 5, 5.0
    try:
        args.frames = [int(x) for x in args.frames.split(",")]
        args.sizes = [int(x) for x in str(args.sizes).split(",")]
        args.clip = tuple(int(x) for x in args.clip.lower().split("x"))
    except ValueError:
        raise SystemExit("error: --frames and --sizes take comma-separated integers, --clip WxH (e.g. 640x360)")
    if min(args.frames) < 1 or min(args.sizes) < 16 or len(args.clip) != 2 or args.repeats < 1 \
            or args.max_frames < 1 or args.decode_tokens < 0:
        raise SystemExit("error: frames, repeats and --max-frames must be >= 1, sizes >= 16 px, --decode-tokens >= 0, "
                         "--clip WxH")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, dtype {dtype}, {torch.get_num_threads()} threads", file=sys.stderr)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    s = tiny_setup(workdir, device, dtype) if args.size == "tiny" else \
        real_setup(args.size, args.model, workdir, device, dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(rows, meta):
        write_atomic(out / "results.md", markdown(rows, meta, args.sizes))
        write_atomic(out / "results.json", json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=2))

    rows, meta = run(s, args, on_row=save)
    pngs = plots(rows, out, f"{args.size}, {device.type}", args.sizes[0])
    print("\n" + markdown(rows, meta, args.sizes))
    print(f"wrote {out / 'results.md'}, results.json" + "".join(f", {p.name}" for p in pngs), file=sys.stderr)


if __name__ == "__main__":
    main()
