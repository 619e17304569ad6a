"""Internalize a video: turn it into a LoRA adapter file that ask.py answers questions from, with no video tokens.

    python internalize.py clip.mp4                          # -> adapter.safetensors (toy base + toy hypernetwork)
    python internalize.py clip.mp4 -o dog.safetensors --size 500M     # the authors' released hypernetwork
    python internalize.py clip.mp4 --size 500M --hypernet ckpt/500m   # ours, their .pt, or hf:REPO/FILE
    python internalize.py long.mp4 --segments 4             # 4 segments internalized apart, then composed
    python internalize.py a.mp4 b.mp4 -o adapters/          # one file per video, models loaded once

Spec: ../shared/design/method.md §2 (what the VLM reads), §3 (the hypernetwork), §5 step 1-2, §7 (segments).
The frozen base model reads [video + fixed instruction] with no LoRA; the hidden states entering its L layers go
through the hypernetwork, which emits r generated rows per layer plus its static rows. The file format is in
adapter.py. A long video can be cut into non-overlapping segments, each internalized on its own (12 frames
each by default) and stacked in rank space: the paper's chunked path, zero-shot since training saw one chunk.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import model as M
from adapter import Adapter, adapter_from_lora, base_facts, concat_adapters, save_adapter, sha256_file
from hypernet import ReleaseError, compile_hypernet, fetch_hypernet, load_hypernet, released_hypernet

ROOT = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ setup
def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: time what ran, not what was queued


def load_base(size, model_dir, device, dtype):
    """-> (vlm, model folder, base-model metadata for the adapter). Errors are one line."""
    try:
        path = M.resolve_model_dir(size, model_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"error: no base model at {path} (pass --model DIR or --size)")
    try:
        vlm = M.load_model(path, dtype=dtype, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {path}: {e}") from None
    ident = M.PRESETS.get(size, size) if model_dir is None else Path(model_dir).name
    meta = {"base_model": ident or "tiny", "base_size": size if model_dir is None else None,
            "base_model_dir": str(Path(path).resolve()), **base_facts(vlm)}
    return vlm, Path(path), meta


@dataclass
class Models:
    vlm: M.SmolVLM
    hyper: torch.nn.Module
    proc: data.Processor
    device: torch.device
    meta: dict                 # base-model and hypernetwork facts every adapter from these models carries


def hypernet_spec(args, size) -> str:
    """--hypernet as given; else the authors' release for 500M / 2.2B (none for 256M), the shipped one for tiny."""
    if args.hypernet:
        return args.hypernet
    if args.model is not None:
        raise SystemExit("error: --model needs --hypernet (a hypernetwork trained for that base model)")
    if size in M.PRESETS:
        try:
            return released_hypernet(size)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return str(ROOT / "checkpoints" / (size or "tiny") / "hypernet")


def load_models(args) -> Models:
    device = M.pick_device(args.device)
    dtype = M.pick_dtype(args.dtype, device)
    size = args.size if args.model is None else None
    spec = hypernet_spec(args, size)
    try:  # a hf: hypernetwork is downloaded (or found offline) before the base model costs a load
        local = fetch_hypernet(spec)
    except ValueError as e:
        raise SystemExit(f"error: hypernetwork {e}") from None
    vlm, path, meta = load_base(size or "tiny", args.model, device, dtype)
    try:
        hyper = load_hypernet(local, vlm.config, device=device, cache_dir=args.hypernet_cache)
    except FileNotFoundError:
        raise SystemExit(f"error: no hypernetwork at {spec} (train one with train.py, or pass --hypernet)") from None
    except ReleaseError as e:  # its message starts with the file
        raise SystemExit(f"error: hypernetwork {e}") from None
    except (ValueError, KeyError, OSError) as e:
        raise SystemExit(f"error: hypernetwork {spec}: {str(e).splitlines()[0]}") from None
    hyper = compile_hypernet(hyper.eval().requires_grad_(False), args.compile)  # opt-in: costs more than it saves
    release = hyper.source["release"] or {}
    # The authors' released weights read what their pipeline fed them (hypernet.RELEASE_RECIPE: 384 px, 1 fps;
    # --frames defaults to their 12); any other released size reads 384-px frames (method.md §2); a folder of our
    # own keeps its processor's frame size.
    recipe = release.get("recipe") or {}
    video_size = args.video_size or recipe.get("video_size") or (384 if size in M.PRESETS else None)
    proc = data.Processor(path, max_frames=args.frames, video_size=video_size, sample_fps=recipe.get("sample_fps"))
    c = hyper.config
    meta.update(hypernet=str(spec), hypernet_sha256=sha256_file(hyper.source["weights"]), alpha=c.alpha,
                rank=c.rank, num_layers=c.num_layers, targets=[list(s) for s in c.target_shapes],
                frames=proc.max_frames, video_size=proc.video_size, frame_side=proc.side)
    if release:  # provenance of the authors' file the hypernetwork was converted from
        meta.update(hypernet_release=release["file"], hypernet_release_sha256=release["sha256"],
                    hypernet_trained_on=release["base_model_name_or_path"])
    what = f" (the authors' {release['file']}, sha256 {release['sha256'][:12]})" if release else ""
    print(f"device {device}, {str(dtype).replace('torch.', '')}; base {meta['base_model']} ({path}); "
          f"hypernetwork {spec}{what}", file=sys.stderr)
    return Models(vlm, hyper, proc, device, meta)


# ------------------------------------------------------------------------------------------------ segments
def encode_segment(m: Models, path: Path, start, end, timings: dict) -> tuple[dict, int, int]:
    """One segment -> (LoRA {t: (A (1, L, 2r, d_in), B (1, L, 2r, d_out))}, frames read, prompt tokens)."""
    t0 = time.perf_counter()
    clip = m.proc.load_video(path, start=start, end=end)               # DecodeError on a bad file or range
    ids, pixels = m.proc.internalization_inputs(clip)                  # (1, T), (F, 3, S, S)
    t1 = time.perf_counter()
    with torch.no_grad():  # method.md §2: the plain model, no LoRA, no LM head; keep the L states entering layers
        out = m.vlm(ids.to(m.device), pixels.to(m.device), output_hidden_states=True, logits="none")
        hidden = torch.stack(out.hidden_states, dim=1)                 # L x (1, T, D) -> (1, L, T, D)
        sync(m.device)
        t2 = time.perf_counter()
        lora = m.hyper(hidden, torch.ones_like(ids, device=m.device))    # §3: generated rows, then static rows
        sync(m.device)
    t3 = time.perf_counter()
    for key, dt in (("decode", t1 - t0), ("VLM encode", t2 - t1), ("hypernetwork", t3 - t2)):
        timings[key] = timings.get(key, 0.0) + dt
    return lora, len(clip.frames), ids.shape[1]


def internalize_video(m: Models, path: Path, args) -> tuple[Adapter, dict, str]:
    """Every segment of one video -> one adapter (segments composed in rank space), timings, a summary line."""
    timings = {"decode": 0.0}
    t0 = time.perf_counter()
    video_sha = sha256_file(path)
    start = args.start or 0.0
    end = args.end
    if end is None:  # the video's length, from a one-frame read (data.py counts frames by demuxing only)
        end = start + m.proc.load_video(path, start=args.start, num_frames=1).duration
    if end <= start:
        raise data.DecodeError(f"{path}: empty range [{start}, {end}) s")
    timings["decode"] += time.perf_counter() - t0
    parts, frames, tokens = [], [], 0
    for s, e in data.plan_segments(start, end, args.segments, args.segment_seconds):
        lora, n_frames, T = encode_segment(m, path, s, e, timings)
        seg = {"video": path.name, "video_sha256": video_sha, "start": round(s, 6), "end": round(e, 6),
               "frames": n_frames, "weight": 1.0}
        parts.append(adapter_from_lora(lora, m.hyper.config.rank, {**m.meta, "segments": [seg]}))
        frames.append(n_frames)
        tokens = max(tokens, T)
    adapter = concat_adapters(parts, meta={"created_by": "internalize.py"})
    note = (f"{len(parts)} segment(s), frames {'+'.join(map(str, frames))}, up to {tokens} tokens read | "
            + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return adapter, timings, note


# ------------------------------------------------------------------------------------------------ CLI
def output_paths(videos: list[Path], out: str | None) -> list[Path]:
    """One video: -o FILE (default adapter.safetensors) or -o DIR/. Several: -o DIR (default .), <stem>.adapter.*"""
    if len(videos) == 1 and not (out and (out.endswith(("/", "\\")) or Path(out).is_dir())):
        return [Path(out or "adapter.safetensors")]
    folder = Path(out or ".")
    if folder.suffix == ".safetensors":
        raise SystemExit(f"error: {len(videos)} videos need -o to be a folder, not the file {folder}")
    paths = [folder / f"{v.stem}.adapter.safetensors" for v in videos]
    if len(set(paths)) != len(paths):
        raise SystemExit("error: two videos have the same file stem; internalize them in separate calls")
    return paths


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", help="video file(s); several in one call reuse the loaded models")
    p.add_argument("-o", "--out", help="output file (one video; default adapter.safetensors) or folder")
    p.add_argument("--size", default=None, help="base model preset: tiny (default), 256M, 500M, 2.2B")
    p.add_argument("--model", default=None, help="a SmolVLM2 folder (config.json + safetensors); overrides --size")
    p.add_argument("--hypernet", default=None,
                   help="hypernetwork: our folder or .safetensors, the authors' released .pt, or hf:OWNER/REPO/FILE "
                        "(default: the authors' release for 500M and 2.2B, checkpoints/tiny/hypernet for tiny)")
    p.add_argument("--hypernet-cache", default=None, metavar="DIR",
                   help="where a .pt is converted to our format, once (default: beside the .pt, i.e. beside its "
                        "Hugging Face cache entry for a download)")
    p.add_argument("--frames", type=int, default=12, help="max frames per segment, 1 fps sampling (method: 12)")
    p.add_argument("--video-size", type=int, default=None,
                   help="longest edge frames are resized to (default: 384 for released sizes, else the model's)")
    p.add_argument("--start", type=float, default=None, help="start of the span to internalize, seconds")
    p.add_argument("--end", type=float, default=None, help="end of the span, seconds (default: the video's end)")
    seg = p.add_mutually_exclusive_group()
    seg.add_argument("--segments", type=int, default=None, help="cut the span into N equal segments and compose")
    seg.add_argument("--segment-seconds", type=float, default=None, help="cut the span into S-second segments")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="base model weights (auto: bf16 on CUDA, fp32 on CPU); the hypernetwork stays fp32")
    p.add_argument("--save-dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the stored A and B")
    p.add_argument("--compile", action="store_true", help="torch.compile the hypernetwork's perceiver")
    args = p.parse_args(argv)
    if (args.segments is not None and args.segments < 1) or (args.segment_seconds is not None
                                                             and args.segment_seconds <= 0):
        p.error("--segments must be >= 1 and --segment-seconds > 0")
    if args.frames < 1:
        p.error("--frames must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    videos = [Path(v) for v in args.videos]
    for v in videos:  # before the models load: a typo should not cost a model load
        if not v.is_file():
            raise SystemExit(f"error: {v}: no such file")
    outs = output_paths(videos, args.out)
    t0 = time.perf_counter()
    m = load_models(args)
    print(f"models loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    save_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.save_dtype]
    for video, out in zip(videos, outs):
        try:
            adapter, _, note = internalize_video(m, video, args)
        except data.DecodeError as e:
            raise SystemExit(f"error: {e}") from None
        save_adapter(out, adapter, save_dtype)
        print(f"{video.name}: {note}", file=sys.stderr)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, rank {adapter.meta['generated_rank']}"
              f"+{adapter.meta['rank']})")


if __name__ == "__main__":
    main()
