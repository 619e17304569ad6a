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

Spans are real seconds from the clip's timestamps (data.Timeline: a variable-frame-rate file is covered to its
end), and every segment must hold a frame. Each video is checked (decodable, span, segments) before the models load.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
import model as M
from adapter import (SPREAD, Adapter, ArgumentParser, adapter_from_lora, base_facts, check_output, concat_adapters,
                     finite, run_cli, save_adapter, sha256_file, spread_weights)
from hypernet import (HyperNet, ReleaseError, compile_hypernet, fetch_hypernet, is_released_checkpoint, load_hypernet,
                      released_hypernet)

ROOT = Path(__file__).resolve().parent


def note(text: str):
    """A one-line note on stderr: something the user should know, not an error."""
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Base:
    """The frozen base model and what turns videos and text into its inputs; ask.py needs no more."""
    vlm: M.SmolVLM
    proc: data.Processor
    device: torch.device
    meta: dict                 # base-model facts every adapter made or read with it carries (adapter.py)
    folder: Path | None = None   # where the weights came from: for messages, never written into an adapter


@dataclass
class Models(Base):
    hyper: HyperNet = None     # the hypernetwork, checked to fit `vlm` (internalize needs it)


def base_identity(size: str | None, model) -> tuple[str, str | None]:
    """(base_model, base_size) as an adapter records them: no path. The shipped toy folder named with --model is
    still the "tiny" preset; another folder is known by its name only (ask.py then needs --model)."""
    if model is None:
        return M.PRESETS.get(size, size), size
    if Path(model).is_dir() and M.TINY_DIR.is_dir() and Path(model).resolve() == M.TINY_DIR.resolve():
        return "tiny", "tiny"
    return Path(model).resolve().name, None


def load_base(size: str | None = "tiny", model: str | None = None, device="auto", dtype="auto",
              frames: int = 12, video_size: int | None = None, check=None) -> Base:
    """The base model of a preset size (tiny ships here; 256M, 500M, 2.2B from the HF cache or hub) or of a local
    SmolVLM2 folder. A released size reads 384-px frames (method.md §2); a folder of our own keeps its processor's
    frame size. `check(proc)`, if given, runs before the weights load (cheap input checks against the tokenizer and
    the context). Raises ValueError (one line) when there is nothing loadable there."""
    device = M.pick_device(device)
    dtype = M.pick_dtype(dtype, device)
    size = None if model is not None else (size or "tiny")
    path = M.resolve_model_dir(size, model)
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"no base model at {path} (pass --model DIR or --size)")
    try:
        proc = data.Processor(path, max_frames=frames, video_size=video_size or (384 if size in M.PRESETS else None))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None
    if check is not None:
        check(proc)
    try:
        vlm = M.load_model(path, dtype=dtype, device=device)
    except Exception as e:  # a user's folder: unreadable JSON, a short or foreign safetensors file, wrong shapes
        raise ValueError(f"{path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    ident, size = base_identity(size, model)
    meta = {"base_model": ident, "base_size": size, **base_facts(vlm),
            "frames": proc.max_frames, "video_size": proc.video_size, "frame_side": proc.side}
    return Base(vlm, proc, device, meta, Path(path))


def hypernet_files(size: str | None, hypernet) -> tuple[Path, Path]:
    """(the path given or the shipped default, its weights file)."""
    path = Path(hypernet) if hypernet else ROOT / "checkpoints" / (size or "tiny") / "hypernet"
    return path, path if path.suffix == ".safetensors" else path / "hypernet.safetensors"


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
    tiny); a .pt is converted once into `hypernet_cache` (default: beside it). Raises ValueError (one line) on a
    missing or mismatched one, or when `frames` frames make a prompt past the base model's context; both before the
    base model's weights load."""
    size = None if model is not None else (size or "tiny")
    spec = hypernet_spec(size, model, hypernet)
    try:  # a hf: hypernetwork is downloaded (or found offline) before the base model costs a load
        local = Path(fetch_hypernet(spec))
    except ValueError as e:
        raise ValueError(f"hypernetwork {e}") from None
    weights = local if local.suffix == ".safetensors" else local / "hypernet.safetensors"
    if not is_released_checkpoint(local) and not weights.is_file():
        raise ValueError(f"no hypernetwork at {spec} (train one with train.py, or pass --hypernet)")
    base = load_base(size, model, device, dtype, frames, video_size, check=lambda proc: proc.check_frames(frames))
    try:
        hyper = load_hypernet(local, base.vlm.config, device=base.device, cache_dir=hypernet_cache, base=base.meta)
    except ReleaseError as e:  # its message starts with the file
        raise ValueError(f"hypernetwork {e}") from None
    except Exception as e:  # config and weights that disagree, unknown keys, a corrupt file: one line
        raise ValueError(f"hypernetwork {spec}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    hyper = compile_hypernet(hyper.eval().requires_grad_(False), compile)  # opt-in: costs more than one video saves
    release, proc, meta = hyper.source["release"] or {}, base.proc, dict(base.meta)
    if release:  # the authors' weights read what their pipeline fed them (hypernet.RELEASE_RECIPE: 384 px, 1 fps)
        recipe = release.get("recipe") or {}
        proc = data.Processor(base.folder, max_frames=frames, video_size=video_size or recipe.get("video_size"),
                              sample_fps=recipe.get("sample_fps"))
        meta.update(frames=proc.max_frames, video_size=proc.video_size, frame_side=proc.side,
                    hypernet_release=release["file"], hypernet_release_sha256=release["sha256"],
                    hypernet_trained_on=release["base_model_name_or_path"])
    # The adapter names its hypernetwork without the user's paths: hf:..., relative to the repository, or the name.
    name = spec if spec.startswith("hf:") else Path(spec).resolve()
    name = name if isinstance(name, str) else name.relative_to(ROOT) if name.is_relative_to(ROOT) else name.name
    c = hyper.config
    meta.update(hypernet=str(name), hypernet_sha256=sha256_file(hyper.source["weights"]), alpha=c.alpha, rank=c.rank,
                num_layers=c.num_layers, targets=[list(s) for s in c.target_shapes])
    return Models(base.vlm, proc, base.device, meta, base.folder, hyper)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: time what ran, not what was queued


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class Plan:
    """What one video becomes before anything heavy runs: its source, timeline and segments [(start, end) s]."""
    source: dict               # {"video": file name or "<array>", "video_sha256"}
    timeline: data.Timeline
    parts: list
    video: object              # the path or the frames array


def _span(start, end, length: float, name: str, say) -> tuple[float, float]:
    """[start, end) within the clip: a missing or infinite end is the clip's end, one past it is clamped (noted);
    NaN, a negative start, a start past the end or an empty span are refused."""
    for flag, x in (("--start", start), ("--end", end)):
        if x is not None and math.isnan(x):
            raise ValueError(f"{flag} is not a number")
    start = 0.0 if start is None else float(start)
    if start < 0:
        raise ValueError(f"--start {start:g} is before the clip's start; give a time >= 0 s")
    if start >= length:
        raise ValueError(f"{name}: --start {start:g} is at or past the clip's end ({length:.2f} s)")
    if end is not None and math.isfinite(end) and end > length + 1e-6:
        say(f"note: --end {end:g} is past the end of {name} ({length:.2f} s); internalizing up to {length:.2f} s")
    end = length if end is None or end > length else float(end)
    if end <= start:
        raise ValueError(f"--end {end:g} is not after --start {start:g}")
    return start, end


def _empty(tl: data.Timeline, parts) -> bool:
    return any(a >= b for a, b in (tl.frame_range(s, e) for s, e in parts))


def _most_segments(tl: data.Timeline, start: float, end: float, limit: int) -> int:
    """The most equal segments of [start, end) that all hold a frame (none beyond twice the span / largest gap)."""
    lo, hi = tl.frame_range(start, end)
    gap = float(np.diff([start, *tl.seconds()[lo:hi], end]).max())
    k = max(1, min(limit, hi - lo, math.ceil(2 * (end - start) / max(gap, 1e-9))))
    while k > 1 and _empty(tl, data.plan_segments(start, end, k, None)):
        k -= 1
    return k


def _parts(tl: data.Timeline, start: float, end: float, segments, seconds) -> list[tuple[float, float]]:
    """The segments, each holding at least one frame, or a ValueError that names how many fit."""
    lo, hi = tl.frame_range(start, end)
    if hi <= lo:
        raise ValueError(f"no frame starts in [{start:g}, {end:g}) s; widen the span (--start, --end)")
    n = segments or (max(1, math.ceil((end - start) / seconds - 1e-6)) if seconds else 1)
    # Counted before the list is made: a tiny --segment-seconds on a long video would ask for millions.
    parts = data.plan_segments(start, end, segments, seconds) if n <= hi - lo else None
    if parts is None or _empty(tl, parts):
        what = f"--segments {n}" if segments else f"--segment-seconds {seconds:g} ({n} segments)"
        raise ValueError(f"{what} leaves some segments without a frame ({hi - lo} frames in {end - start:.2f} s); "
                         f"at most {_most_segments(tl, start, end, n)} segments here")
    return parts


def plan(video, start: float | None = None, end: float | None = None, segments: int | None = None,
         segment_seconds: float | None = None, fps: float | None = None, say=note) -> Plan:
    """Check one video and cut its span into segments, decoding nothing (a demux pass for a file). Raises
    data.DecodeError (not a video, no frames) or ValueError (a span or segmentation that cannot work)."""
    if (segments is not None and segments < 1) or (segment_seconds is not None and not segment_seconds > 0):
        raise ValueError("--segments must be >= 1 and --segment-seconds > 0")
    if isinstance(video, (str, Path)):
        tl = data.scan_video(video)
        source = {"video": Path(video).name, "video_sha256": sha256_file(video)}
    else:
        if fps is None or not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"frames given as an array need their fps (a number > 0), got {fps}")
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or not len(video):
            raise ValueError(f"frames must be a non-empty (N, H, W, 3) uint8 array, got {video.dtype} "
                             f"{tuple(video.shape)}")
        tl = data.Timeline.of_frames(len(video), fps)
        source = {"video": "<array>", "video_sha256": hashlib.sha256(video.tobytes()).hexdigest()}
    start, end = _span(start, end, tl.span, source["video"], say)
    return Plan(source, tl, _parts(tl, start, end, segments, segment_seconds), video)


# ------------------------------------------------------------------------------------------------ internalizing
def encode_segment(m: Models, clip: data.Clip, timings: dict) -> tuple[dict, int]:
    """One decoded segment -> (LoRA {t: (A (1, L, 2r, d_in), B (1, L, 2r, d_out))}, prompt tokens)."""
    t0 = time.perf_counter()
    ids, pixels = m.proc.internalization_inputs(clip)                  # (1, T), (F, 3, S, S)
    m.proc.check_length(ids.shape[1], 0, f"the internalization prompt of {len(clip.frames)} frames")
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


def looks_like_toy_world(pixels: torch.Tensor) -> bool:
    """Whether frames (F, 3, S, S) in [-1, 1] look like the toy world's: at least 80 % of pixels either dark (every
    channel < 0.2) or a vivid colour (brightest channel >= 0.4, saturation (max - min) / max >= 0.6). Toy clips
    score >= 0.97 (black background, four saturated colours); natural video, with its greys, skin, sky and
    pastels, scores far lower. A dark natural scene can pass: this is a cheap hint, not a classifier."""
    x = (pixels.float() + 1) / 2
    hi, lo = x.max(1).values, x.min(1).values                          # (F, S, S)
    return float(((hi < 0.2) | ((hi >= 0.4) & (hi - lo >= 0.6 * hi))).float().mean()) >= 0.8


def _memory_check(m: Models, n_parts: int):
    """A composed adapter holds r rows per segment (and twice that while composing): refuse one that would not fit."""
    per = sum(m.hyper.config.num_layers * 2 * m.hyper.config.rank * (i + o) * 4 for _, i, o in m.meta["targets"])
    need = 2 * (n_parts + 1) * per
    try:
        free = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return
    if need > free / 2:
        raise ValueError(f"{n_parts} segments make a {need / 2**30:.1f} GB adapter and this machine has "
                         f"{free / 2**30:.1f} GB free; use at most {max(1, int(free / 2 / (2 * per)) - 1)} segments")


def internalize(m: Models, video, start: float | None = None, end: float | None = None, segments: int | None = None,
                segment_seconds: float | None = None, fps: float | None = None, timings: dict | None = None,
                say=note, planned: Plan | None = None, segment_weights: str = "1") -> Adapter:
    """A video -> its adapter. `video` is a file path, or the clip's frames as a (N, H, W, 3) uint8 array with their
    `fps`. The span [start, end) s (default: all of it) is cut into `segments` equal parts or parts of
    `segment_seconds`, each internalized on its own and stacked in rank space (method.md §7); one part by default.
    `segment_weights` scales every part's update: "1" (plain, the paper's), "1/n" or "1/sqrt(n)" (adapter.SPREAD).
    `timings`, if given, collects seconds per phase; `say` receives one-line notes and hints (default: stderr).
    Raises data.DecodeError on a bad file, ValueError on a span, segmentation or prompt that cannot work."""
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    p = planned or plan(video, start, end, segments, segment_seconds, fps, say)
    _memory_check(m, len(p.parts))
    if isinstance(p.video, np.ndarray):
        load = lambda s, e: m.proc.clip_from_frames(p.video, p.timeline.fps, start=s, end=e)   # noqa: E731
    else:
        load = lambda s, e: m.proc.load_video(p.video, start=s, end=e, timeline=p.timeline)   # noqa: E731
    parts, n_frames, tokens, sparse = [], [], 0, 0.0
    for s, e in p.parts:
        t1 = time.perf_counter()
        clip = load(s, e)
        timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t1
        if not parts and m.meta.get("base_size") == "tiny" and not looks_like_toy_world(torch.stack(clip.frames)):
            say(f"note: {p.source['video']} does not look like the toy world; the shipped tiny base only knows "
                "coloured shapes on black, so expect answers about shapes")
        if clip.total_frames > len(clip.frames):   # the sampler left frames out: more segments would read them
            sparse = max(sparse, (e - s) / len(clip.frames))
        lora, T = encode_segment(m, clip, timings)
        seg = {**p.source, "start": round(s, 6), "end": round(e, 6), "frames": len(clip.frames), "weight": 1.0}
        parts.append(adapter_from_lora(lora, m.hyper.config.rank, {**m.meta, "segments": [seg]}))
        n_frames.append(len(clip.frames))
        tokens = max(tokens, T)
    window = m.proc.max_frames / m.proc.sample_fps   # seconds a segment can cover at the sampler's own rate
    if sparse > 2 / m.proc.sample_fps and (p.parts[-1][1] - p.parts[0][0]) > window:
        n = math.ceil((p.parts[-1][1] - p.parts[0][0]) / window)
        say(f"hint: {p.source['video']} was read as one frame per {sparse:.0f} s; --segments {n} (or "
            f"--segment-seconds {window:g}) reads it at {m.proc.sample_fps:g} frame/s")
    timings.update(frames=n_frames, tokens=tokens, total=time.perf_counter() - t0)
    weights = spread_weights(segment_weights, len(parts)) if len(parts) > 1 else None
    return concat_adapters(parts, weights, meta={"created_by": "internalize.py"})


# ------------------------------------------------------------------------------------------------ CLI
def output_paths(videos: list[Path], out: str | None) -> list[Path]:
    """One video: -o FILE (default adapter.safetensors) or -o DIR/. Several: -o DIR (default .), <stem>.adapter.*"""
    if len(videos) == 1 and not (out and (out.endswith(("/", "\\")) or Path(out).is_dir())):
        return [Path(out or "adapter.safetensors")]
    folder = Path(out or ".")
    if folder.suffix == ".safetensors" or folder.exists() and not folder.is_dir():
        raise ValueError(f"{len(videos)} videos need -o to be a folder, not the file {folder}")
    paths = [folder / f"{v.stem}.adapter.safetensors" for v in videos]
    if len(set(paths)) != len(paths):
        raise ValueError("two videos have the same file stem; internalize them in separate calls")
    return paths


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", help="video file(s); several in one call reuse the loaded models")
    p.add_argument("-o", "--out", help="output file (one video; default adapter.safetensors) or folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing file that is not an adapter")
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
    seg.add_argument("--segment-seconds", type=finite, default=None, help="cut the span into S-second segments")
    p.add_argument("--segment-weights", choices=list(SPREAD), default="1",
                   help="scale each segment's update when composing: 1 (plain, the paper's), 1/n or 1/sqrt(n) "
                        "(the toy world composes 4+ segments best with 1/sqrt(n), toy/README.md)")
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
    if args.video_size is not None and not 1 <= args.video_size <= data.MAX_VIDEO_SIZE:
        p.error(f"--video-size must be between 1 and {data.MAX_VIDEO_SIZE} px (released models read 384)")
    return args


def main(argv=None):
    args = parse_args(argv)
    videos = [Path(v) for v in args.videos]
    outs = output_paths(videos, args.out)
    base_dir = args.model or (M.TINY_DIR if args.size in (None, "tiny") else None)   # a hub cache is not ours
    inputs = [*videos, *([base_dir] if base_dir else []), *hypernet_files(args.size, args.hypernet)]
    for out in outs:   # before any work: never overwrite an input or a file we did not write
        check_output(out, inputs, args.force)
    try:   # every video checked (decodable, span, segments) before the models load
        plans = [plan(v, args.start, args.end, args.segments, args.segment_seconds) for v in videos]
    except data.DecodeError as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.perf_counter()
    m = load_models(args.size, args.model, args.hypernet, args.device, args.dtype, args.frames, args.video_size,
                    args.compile, args.hypernet_cache)
    release = (f" (the authors' {m.meta['hypernet_release']}, sha256 {m.meta['hypernet_release_sha256'][:12]})"
               if "hypernet_release" in m.meta else "")
    print(f"device {m.device}, {str(next(m.vlm.parameters()).dtype).replace('torch.', '')}; base "
          f"{m.meta['base_model']} ({m.folder}); hypernetwork {m.meta['hypernet']}{release}", file=sys.stderr)
    print(f"models loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    save_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.save_dtype]
    for video, out, p in zip(videos, outs, plans):
        timings = {}
        try:
            adapter = internalize(m, video, timings=timings, planned=p, segment_weights=args.segment_weights)
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
    run_cli(main)
