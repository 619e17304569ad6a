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
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
import model as M
from adapter import Adapter, adapter_from_lora, base_facts, concat_adapters, save_adapter, sha256_file
from hypernet import HyperNet, ReleaseError, compile_hypernet, fetch_hypernet, load_hypernet, released_hypernet

ROOT = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Base:
    """The frozen base model and what turns videos and text into its inputs; ask.py needs no more."""
    vlm: M.SmolVLM
    proc: data.Processor
    device: torch.device
    meta: dict                 # base-model facts every adapter made or read with it carries (adapter.py)


@dataclass
class Models(Base):
    hyper: HyperNet = None     # the hypernetwork, checked to fit `vlm` (internalize needs it)


def load_base(size: str | None = "tiny", model: str | None = None, device="auto", dtype="auto",
              frames: int = 12, video_size: int | None = None) -> Base:
    """The base model of a preset size (tiny ships here; 256M, 500M, 2.2B from the HF cache or hub) or of a local
    SmolVLM2 folder. A released size reads 384-px frames (method.md §2); a folder of our own keeps its processor's
    frame size. Raises ValueError (one line) when there is nothing loadable there."""
    device = M.pick_device(device)
    dtype = M.pick_dtype(dtype, device)
    size = None if model is not None else (size or "tiny")
    path = M.resolve_model_dir(size, model)
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"no base model at {path} (pass --model DIR or --size)")
    try:
        vlm = M.load_model(path, dtype=dtype, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{path}: {e}") from None
    proc = data.Processor(path, max_frames=frames, video_size=video_size or (384 if size in M.PRESETS else None))
    ident = M.PRESETS.get(size, size) if model is None else Path(model).name
    meta = {"base_model": ident, "base_size": size, "base_model_dir": str(Path(path).resolve()), **base_facts(vlm),
            "frames": proc.max_frames, "video_size": proc.video_size, "frame_side": proc.side}
    return Base(vlm, proc, device, meta)


def hypernet_spec(size: str | None, model, hypernet) -> str:
    """--hypernet as given; else the authors' release for 500M / 2.2B (none for 256M), the shipped one for tiny."""
    if hypernet:
        return str(hypernet)
    if model is not None:
        raise ValueError("--model needs --hypernet (a hypernetwork trained for that base model)")
    if size in M.PRESETS:
        return released_hypernet(size)
    return str(ROOT / "checkpoints" / (size or "tiny") / "hypernet")


def load_models(size: str | None = "tiny", model: str | None = None, hypernet=None, device="auto", dtype="auto",
                frames: int = 12, video_size: int | None = None, compile: bool = False,
                hypernet_cache=None) -> Models:
    """Base model + hypernetwork, loaded once for any number of videos. `hypernet`: a folder or .safetensors of ours,
    the authors' released .pt, or hf:REPO/FILE (default: the authors' release for 500M / 2.2B, the shipped one for
    tiny); a .pt is converted once into `hypernet_cache` (default: beside it). Raises ValueError (one line)."""
    size = None if model is not None else (size or "tiny")
    spec = hypernet_spec(size, model, hypernet)
    try:  # a hf: hypernetwork is downloaded (or found offline) before the base model costs a load
        local = fetch_hypernet(spec)
    except ValueError as e:
        raise ValueError(f"hypernetwork {e}") from None
    base = load_base(size, model, device, dtype, frames, video_size)
    try:
        hyper = load_hypernet(local, base.vlm.config, device=base.device, cache_dir=hypernet_cache, base=base.meta)
    except FileNotFoundError:
        raise ValueError(f"no hypernetwork at {spec} (train one with train.py, or pass --hypernet)") from None
    except ReleaseError as e:  # its message starts with the file
        raise ValueError(f"hypernetwork {e}") from None
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"hypernetwork {spec}: {str(e).splitlines()[0]}") from None
    hyper = compile_hypernet(hyper.eval().requires_grad_(False), compile)  # opt-in: costs more than one video saves
    release, proc, meta = hyper.source["release"] or {}, base.proc, dict(base.meta)
    if release:  # the authors' weights read what their pipeline fed them (hypernet.RELEASE_RECIPE: 384 px, 1 fps)
        recipe = release.get("recipe") or {}
        proc = data.Processor(meta["base_model_dir"] if model is None else model, max_frames=frames,
                              video_size=video_size or recipe.get("video_size"), sample_fps=recipe.get("sample_fps"))
        meta.update(frames=proc.max_frames, video_size=proc.video_size, frame_side=proc.side,
                    hypernet_release=release["file"], hypernet_release_sha256=release["sha256"],
                    hypernet_trained_on=release["base_model_name_or_path"])
    c = hyper.config
    meta.update(hypernet=spec, hypernet_sha256=sha256_file(hyper.source["weights"]), alpha=c.alpha, rank=c.rank,
                num_layers=c.num_layers, targets=[list(s) for s in c.target_shapes])
    return Models(base.vlm, proc, base.device, meta, hyper)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: time what ran, not what was queued


# ------------------------------------------------------------------------------------------------ internalizing
def encode_segment(m: Models, clip: data.Clip, timings: dict) -> tuple[dict, int]:
    """One decoded segment -> (LoRA {t: (A (1, L, 2r, d_in), B (1, L, 2r, d_out))}, prompt tokens)."""
    t0 = time.perf_counter()
    ids, pixels = m.proc.internalization_inputs(clip)                  # (1, T), (F, 3, S, S)
    t1 = time.perf_counter()
    with torch.no_grad():  # method.md §2: the plain model, no LoRA, no LM head; keep the L states entering layers
        out = m.vlm(ids.to(m.device), pixels.to(m.device), output_hidden_states=True, logits="none")
        hidden = torch.stack(out.hidden_states, dim=1)                 # L x (1, T, D) -> (1, L, T, D)
        sync(m.device)
        t2 = time.perf_counter()
        lora = m.hyper(hidden, torch.ones_like(ids, device=m.device))  # §3: generated rows, then static rows
        sync(m.device)
    t3 = time.perf_counter()
    for key, dt in (("decode", t1 - t0), ("VLM encode", t2 - t1), ("hypernetwork", t3 - t2)):
        timings[key] = timings.get(key, 0.0) + dt
    return lora, ids.shape[1]


def internalize(m: Models, video, start: float | None = None, end: float | None = None, segments: int | None = None,
                segment_seconds: float | None = None, fps: float | None = None, timings: dict | None = None) -> Adapter:
    """A video -> its adapter. `video` is a file path, or the clip's frames as a (N, H, W, 3) uint8 array with their
    `fps`. The span [start, end) s (default: all of it) is cut into `segments` equal parts or parts of
    `segment_seconds`, each internalized on its own and stacked in rank space (method.md §7); one part by default.
    `timings`, if given, collects seconds per phase. Raises data.DecodeError on a bad file or span."""
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    if isinstance(video, (str, Path)):
        path = Path(video)
        source = {"video": path.name, "video_sha256": sha256_file(path)}
        load = lambda s, e: m.proc.load_video(path, start=s, end=e)   # noqa: E731
        length = lambda: m.proc.load_video(path, start=start, num_frames=1).duration   # noqa: E731
    else:
        if fps is None:
            raise ValueError("frames given as an array need their fps")
        frames = np.asarray(video)
        source = {"video": "<array>", "video_sha256": hashlib.sha256(frames.tobytes()).hexdigest()}
        load = lambda s, e: m.proc.clip_from_frames(frames, fps, start=s, end=e)   # noqa: E731
        length = lambda: len(frames) / fps - (start or 0.0)   # noqa: E731
    start = start or 0.0
    end = start + length() if end is None else end   # a one-frame read: data.py counts frames by demuxing only
    if end <= start:
        raise data.DecodeError(f"{source['video']}: empty range [{start}, {end}) s")
    parts, n_frames, tokens = [], [], 0
    for s, e in data.plan_segments(start, end, segments, segment_seconds):
        t1 = time.perf_counter()
        clip = load(s, e)
        timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t1
        lora, T = encode_segment(m, clip, timings)
        seg = {**source, "start": round(s, 6), "end": round(e, 6), "frames": len(clip.frames), "weight": 1.0}
        parts.append(adapter_from_lora(lora, m.hyper.config.rank, {**m.meta, "segments": [seg]}))
        n_frames.append(len(clip.frames))
        tokens = max(tokens, T)
    timings.update(frames=n_frames, tokens=tokens, total=time.perf_counter() - t0)
    return concat_adapters(parts, meta={"created_by": "internalize.py"})


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
    try:
        m = load_models(args.size, args.model, args.hypernet, args.device, args.dtype, args.frames, args.video_size,
                        args.compile, args.hypernet_cache)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    release = (f" (the authors' {m.meta['hypernet_release']}, sha256 {m.meta['hypernet_release_sha256'][:12]})"
               if "hypernet_release" in m.meta else "")
    print(f"device {m.device}, {str(next(m.vlm.parameters()).dtype).replace('torch.', '')}; base "
          f"{m.meta['base_model']} ({m.meta['base_model_dir']}); hypernetwork {m.meta['hypernet']}{release}",
          file=sys.stderr)
    print(f"models loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    save_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.save_dtype]
    for video, out in zip(videos, outs):
        timings = {}
        try:
            adapter = internalize(m, video, args.start, args.end, args.segments, args.segment_seconds, timings=timings)
        except data.DecodeError as e:
            raise SystemExit(f"error: {e}") from None
        save_adapter(out, adapter, save_dtype)
        frames, tokens = timings.pop("frames"), timings.pop("tokens")
        timings.pop("total")
        print(f"{video.name}: {len(frames)} segment(s), frames {'+'.join(map(str, frames))}, up to {tokens} tokens "
              "read | " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()), file=sys.stderr)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, rank {adapter.meta['generated_rank']}"
              f"+{adapter.meta['rank']})")


if __name__ == "__main__":
    main()
