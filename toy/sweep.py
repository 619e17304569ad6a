"""The toy world past its training ranges (issue 28): accuracy against the number of frames and the frame size.

    python -m toy.sweep frames                 # 4 ... 256 frames of the same held-out clips, plot in docs/
    python -m toy.sweep sizes                  # the same clips rendered at 32 ... 1024 px, 8 frames
    python -m toy.sweep frames --quick         # 4, 8, 16 frames on 10 clips: a minute
    python -m toy.sweep frames --device cuda --clips 40 --long-clips 40 --frames 4 8 16 32 64 128 256 1024
                                               # toy/README.md's table (a 1024-frame prompt is ~30k tokens: one
                                               # in-context pass takes about a minute on a 2-core CPU)

The toy pair trained on 2-8 frames (1 fps, clips of 2-8 s) of at most 256 px. A sweep point renders each held-out
clip again, in memory: F frames spread evenly over the same 2-8 s of motion (the clip re-rendered at a frame rate
that has at least F frames, sampled by SmolVLM2's sampler at F / duration frames a second), or the clip scaled to a
longer side of S px. Conditions, on the same questions:
  in context          the base model with all F frames in its prompt (about 29 tokens a frame; the base has 2048
                      positions, so from ~70 frames on its input runs past its position range: reported, not hidden)
  adapter             the adapter of one internalization pass over the same F frames
  composed segments   the F frames cut into n = ceil(F / 8) runs of consecutive frames, each run a clip of its own
                      span internalized alone (internalize.py --segments n), the adapters concatenated in rank
                      space as compose.py does; "composed 1/n" weights each segment 1/n
  strided 1/n         the F frames dealt into n groups of every n-th frame, each an 8-frame view of the whole clip,
                      internalized alone and composed with weights 1/n (frames axis only)
QA kinds are scored as toy/fidelity.py scores them; captions by exact match and by token F1 (captions.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import data
import model as M
from adapter import ArgumentParser, base_facts, run_cli, write_atomic
from hypernet import internalize, load_hypernet
from toy import world
from toy.captions import token_f1
from toy.fidelity import compose

QA_KINDS = ("color", "shape", "direction", "count")
POSITIONS = 2048  # the toy base's max_position_embeddings: RoPE positions it was built for (trained on < 400)


# ------------------------------------------------------------------------------------------------ clips in memory
def sampler(proc: data.Processor, frames: int, seconds: float) -> data.Processor:
    """A copy of `proc` whose sampler takes `frames` frames spread evenly over `seconds` (SmolVLM2's rule at
    frames / seconds frames a second, at most `frames`)."""
    p = copy.copy(proc)
    p.max_frames, p.sample_fps = frames, frames / seconds
    return p


def clip_of(proc: data.Processor, spec: world.ClipSpec, start: float | None = None, end: float | None = None) -> data.Clip:
    """What proc.clip_from_frames(render_frames(spec), spec.fps, start, end) gives, rendering only the sampled
    frames (a 1024-frame clip of 1024-px frames would not fit in memory whole)."""
    lo = 0 if start is None else max(0, math.ceil(start * spec.fps - 1e-9))
    hi = spec.n_frames if end is None else min(spec.n_frames, math.ceil(end * spec.fps - 1e-9))
    idx = data.smolvlm_indices(hi - lo, spec.fps, proc.max_frames, proc.sample_fps)
    pixels = [data.frame_pixels(world.render_frame(spec, lo + i), proc.video_size, proc.side) for i in idx]
    return data.Clip(pixels, idx, [i / spec.fps for i in idx], hi - lo, spec.fps)


def dense(spec: world.ClipSpec, frames: int) -> world.ClipSpec:
    """The clip re-rendered at a frame rate with at least `frames` frames (and never fewer than it had)."""
    return world.retimed(spec, max(spec.fps, math.ceil(frames / spec.duration)))


# ------------------------------------------------------------------------------------------------ conditions
@torch.no_grad()
def in_context(vlm: M.SmolVLM, proc: data.Processor, clip: data.Clip, prompts: list[str],
               max_new_tokens: int = 24) -> tuple[list[str], int]:
    """Greedy answers to each prompt with the clip in context -> (answers, prompt tokens). The video prefix, which
    every prompt shares, runs once into a KV cache; the prompts then continue it side by side (left-padded
    between prefix and question, which the cache's mask skips), so a 1024-frame clip costs one long pass."""
    dev = next(vlm.parameters()).device
    seqs = [proc.question_inputs(q, video=clip) for q in prompts]
    pixels = seqs[0][1].to(dev)
    ids = [s[0][0].tolist() for s in seqs]
    P = 0  # the longest prefix all prompts share, token for token
    while all(len(s) > P + 1 for s in ids) and len({s[P] for s in ids}) == 1:
        P += 1
    rest = [s[P:] for s in ids]
    U = max(map(len, rest))
    one = vlm.new_cache(1, P)
    vlm(torch.tensor([ids[0][:P]], device=dev), pixels, cache=one, logits="none")
    B = len(prompts)
    cache = vlm.new_cache(B, P + U + max_new_tokens)
    cache.k[:, :, :, :P], cache.v[:, :, :, :P] = one.k, one.v   # (L, 1, H, P, hd) broadcast over the batch
    cache.mask[:, :P], cache.length = True, P
    tail, mask = data.pad_batch(rest, proc.pad_id, side="left")
    out = vlm(tail.to(dev), attention_mask=mask.to(dev), cache=cache, logits="last")
    done, tokens = torch.zeros(B, dtype=torch.bool, device=dev), []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1).masked_fill(done, proc.eou_id)
        done |= nxt == proc.eou_id
        tokens.append(nxt)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        out = vlm(nxt[:, None], cache=cache, logits="last")
    answers = []
    for row in torch.stack(tokens, 1).tolist():
        answers.append(proc.decode(row[: row.index(proc.eou_id)] if proc.eou_id in row else row).strip())
    return answers, P + U


def adapters(vlm, hyper, proc, clips: list[data.Clip], max_tokens: int = 8192) -> list[dict]:
    """One adapter per clip, {target: (A (L, 2r, d_in), B (L, 2r, d_out))}; clips batched up to max_tokens."""
    out, i = [], 0
    while i < len(clips):
        inputs = [proc.internalization_inputs(clips[i])]
        while i + len(inputs) < len(clips) and (len(inputs) + 1) * max(x[0].shape[1] for x in inputs) <= max_tokens:
            inputs.append(proc.internalization_inputs(clips[i + len(inputs)]))
        ids, mask = data.pad_batch([x[0][0] for x in inputs], proc.pad_id, side="left")
        dev = next(vlm.parameters()).device
        with torch.no_grad():
            lora = internalize(vlm, hyper, ids.to(dev), mask.to(dev) if len(inputs) > 1 else None,
                               torch.cat([x[1] for x in inputs]).to(dev))
        out += [{t: (A[b].cpu(), B[b].cpu()) for t, (A, B) in lora.items()} for b in range(ids.shape[0])]
        i += len(inputs)
    return out


def ask(vlm, proc, items: list[tuple[str, dict | None]], alpha: float, batch: int = 64) -> list[str]:
    """Greedy answers to (prompt, adapter or None) with zero visual tokens; each row its own adapter."""
    texts = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        ids, mask = data.pad_batch([proc.question_inputs(q)[0][0] for q, _ in chunk], proc.pad_id, side="left")
        lora = None
        if chunk[0][1] is not None:  # adapters of different ranks (composed ones) are zero-padded to the largest
            R = max(a[t][0].shape[1] for _, a in chunk for t in a)
            pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, R - x.shape[1]))  # noqa: E731
            lora = {t: (torch.stack([pad(a[t][0]) for _, a in chunk]), torch.stack([pad(a[t][1]) for _, a in chunk]))
                    for t in chunk[0][1]}
        dev = next(vlm.parameters()).device
        lora = None if lora is None else {t: (a.to(dev), b.to(dev)) for t, (a, b) in lora.items()}
        new = M.generate(vlm, ids.to(dev), mask.to(dev), None, lora, alpha, max_new_tokens=24,
                         eos_token_id=proc.eou_id)
        texts += [proc.decode(t).strip() for t in new]
    return texts


def grade(kind: str, answer: str, expected: str) -> tuple[float, float]:
    """(exact, token F1): a QA answer by its first word (world.score), for which both are the same; a caption word
    for word, and by SQuAD's token F1."""
    hit = float(world.score(answer, expected))
    return (hit, token_f1(answer, expected)) if kind == "caption" else (hit, hit)


# ------------------------------------------------------------------------------------------------ one sweep point
def heldout_specs(n: int, offset: int = 0) -> list[world.ClipSpec]:
    """The first n held-out clips that are not two-part (one or two objects shown together): the clips the
    fidelity table's QA questions come from, drawn by the same seeds."""
    out, i = [], offset
    while len(out) < n:
        spec = world.clip_spec("heldout", i)
        i += 1
        if not spec.two_part:
            out.append(spec)
    return out


def segments_of(clip: data.Clip, n: int, strided: bool) -> list[data.Clip]:
    """The clip's sampled frames in n groups, each a clip of its own: consecutive runs (contiguous segments: a span
    cut out of the video, indices restarting at 0, as internalize.py --segments cuts one), or every n-th frame
    (strided: each group an evenly spread view of the whole clip, as the 1-fps sampler of a short clip gives)."""
    groups = [list(range(g, len(clip.frames), n)) for g in range(n)] if strided else \
        [g.tolist() for g in np.array_split(np.arange(len(clip.frames)), n)]
    out = []
    for k, g in enumerate(groups):
        idx = [clip.indices[i] for i in g]
        if strided:
            lo, hi = 0, clip.total_frames
        else:  # the span runs to the next segment's first frame
            lo = idx[0]
            hi = clip.indices[groups[k + 1][0]] if k + 1 < n else clip.total_frames
        out.append(data.Clip([clip.frames[i] for i in g], [i - lo for i in idx], [(i - lo) / clip.fps for i in idx],
                             hi - lo, clip.fps))
    return out


def point(vlm, hyper, proc, specs, frames: int, segment_frames: int = 8, size: int | None = None) -> dict:
    """Every condition on every question of `specs` at `frames` frames (and, with `size`, that longer side) ->
    {"rows": [(kind, {condition: (exact, f1)})], "tokens": longest in-context prompt, "seconds": ...}."""
    t0 = time.time()
    facts, alpha = base_facts(vlm), hyper.config.alpha
    rows, tokens, items, whole, n_seg = [], 0, [], [], 1
    groups = {"contiguous": [], "strided": []}
    for c, spec0 in enumerate(specs):
        spec = dense(world.rescaled(spec0, size) if size else spec0, frames)
        qs = world.questions(spec)
        p = sampler(proc, frames, spec.duration)
        clip = clip_of(p, spec)
        answers, T = in_context(vlm, p, clip, [q for _, q, _ in qs])
        tokens = max(tokens, T)
        whole.append(clip)
        n_seg = max(1, math.ceil(len(clip.frames) / segment_frames)) if segment_frames else 1
        for kind, g in groups.items():
            g.append(segments_of(clip, n_seg, kind == "strided") if n_seg > 1 else [])
        for (kind, q, want), got in zip(qs, answers):
            rows.append((kind, {"in context": grade(kind, got, want)}))
            items.append((c, kind, q, want))
    own = adapters(vlm, hyper, proc, whole)
    conditions = {"adapter": own}
    if segment_frames:  # one segment is the adapter itself; the columns stay so that tables line up
        per = {}
        for kind, g in groups.items():
            flat = adapters(vlm, hyper, proc, [x for segs in g for x in segs])
            per[kind], i = [], 0
            for segs in g:
                per[kind].append(flat[i:i + len(segs)])
                i += len(segs)
        one = lambda x, c, w: compose(x, hyper, facts, [w] * len(x)) if len(x) > 1 else own[c]  # noqa: E731
        conditions["composed segments"] = [one(x, c, 1.0) for c, x in enumerate(per["contiguous"])]
        conditions["composed 1/n"] = [one(x, c, 1 / max(len(x), 1)) for c, x in enumerate(per["contiguous"])]
        conditions["strided 1/n"] = [one(x, c, 1 / max(len(x), 1)) for c, x in enumerate(per["strided"])]
    for name, ads in conditions.items():
        got = ask(vlm, proc, [(q, ads[c]) for c, _, q, _ in items], alpha)
        for (c, kind, q, want), a, (_, r) in zip(items, got, rows):
            r[name] = grade(kind, a, want)
    return {"rows": rows, "tokens": tokens, "segments": n_seg, "seconds": time.time() - t0}


def summarise(res: dict) -> dict:
    """Per condition: QA accuracy (the four kinds), caption exact match and caption token F1."""
    out = {}
    for name in res["rows"][0][1]:
        qa = [r[name][0] for k, r in res["rows"] if k in QA_KINDS]
        cap = [r[name] for k, r in res["rows"] if k == "caption"]
        out[name] = {"qa": float(np.mean(qa)), "caption_exact": float(np.mean([x[0] for x in cap])),
                     "caption_f1": float(np.mean([x[1] for x in cap])), "questions": len(qa)}
        for kind in QA_KINDS:
            hits = [r[name][0] for k, r in res["rows"] if k == kind]
            out[name][kind] = float(np.mean(hits)) if hits else None
    return out


# ------------------------------------------------------------------------------------------------ report
def table(points: dict, axis: str) -> str:
    names = list(next(iter(points.values()))["summary"])
    lines = [f"| {axis} | prompt tokens | segments | " + " | ".join(f"{n}: QA / caption F1" for n in names) + " |",
             "|---" * (len(names) + 3) + "|"]
    for key, p in points.items():
        over = " (past 2048)" if p["tokens"] > POSITIONS else ""
        cells = " | ".join(f"{p['summary'][n]['qa']:.3f} / {p['summary'][n]['caption_f1']:.3f}" for n in names)
        lines.append(f"| {key} | {p['tokens']}{over} | {p['segments']} | {cells} |")
    return "\n".join(lines)


def plot(points: dict, axis: str, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [int(k) for k in points]
    names = list(next(iter(points.values()))["summary"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for n in names:
        a.plot(xs, [points[k]["summary"][n]["qa"] for k in points], "o-", label=n)
        b.plot(xs, [points[k]["summary"][n]["caption_f1"] for k in points], "o-", label=n)
    for ax, what in ((a, "QA accuracy (colour, shape, direction, count)"), (b, "caption token F1")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(axis)
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3)
    if axis == "frames":
        past = [x for x, k in zip(xs, points) if points[k]["tokens"] > POSITIONS]
        for ax in (a, b):
            if past:
                ax.axvspan(min(past) / 1.3, max(xs) * 1.3, color="grey", alpha=0.12, label="prompt past 2048 positions")
            ax.axvspan(2, 8, color="green", alpha=0.08, label="trained (2-8 frames)")
    a.legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("axis", choices=["frames", "sizes"])
    p.add_argument("--model", default=str(M.TINY_DIR))
    p.add_argument("--hypernet", default=str(M.TINY_DIR.parent / "hypernet"))
    p.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts (sizes: the one frame count)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024], help="longer sides, px")
    p.add_argument("--clips", type=int, default=20, help="held-out clips per point")
    p.add_argument("--long-clips", type=int, default=10, help="clips per point from 256 frames on (each costs a "
                                                               "pass over ~6k-25k tokens on a CPU)")
    p.add_argument("--segment-frames", type=int, default=8, help="frames per composed segment (frames axis)")
    p.add_argument("--quick", action="store_true", help="4, 8, 16 frames (or 64, 256, 1024 px) on 10 clips")
    p.add_argument("--out", default="results/sweep")
    p.add_argument("--plot", default=None, help="PNG to draw (default OUT/<axis>.png)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.long_clips = 10, 10
        args.frames = args.frames or ([4, 8, 16] if args.axis == "frames" else [8])
        args.sizes = [64, 256, 1024]
    frames = args.frames or ([4, 8, 16, 32, 64, 128, 256] if args.axis == "frames" else [8])
    if min(frames) < 1 or args.clips < 1:
        raise SystemExit("error: --frames and --clips must be >= 1")
    t0 = time.time()
    device = torch.device(args.device)
    vlm = M.load_model(args.model, device=device)
    proc = data.Processor(args.model)
    hyper = load_hypernet(args.hypernet, vlm.config, device=device).eval()
    points = {}
    keys = frames if args.axis == "frames" else args.sizes
    for key in keys:
        F = key if args.axis == "frames" else frames[0]
        n = args.clips if F < 256 else min(args.clips, args.long_clips)
        res = point(vlm, hyper, proc, heldout_specs(n), F, args.segment_frames if args.axis == "frames" else 0,
                    size=None if args.axis == "frames" else key)
        points[str(key)] = {"clips": n, "tokens": res["tokens"], "segments": res["segments"],
                            "seconds": res["seconds"], "summary": summarise(res)}
        print(f"{args.axis} {key}: {n} clips, {res['tokens']} tokens, {res['seconds']:.0f} s: "
              + ", ".join(f"{k} {v['qa']:.3f}/{v['caption_f1']:.3f}" for k, v in points[str(key)]["summary"].items()),
              flush=True)
    minutes = (time.time() - t0) / 60
    axis = "frames" if args.axis == "frames" else "longer side (px)"
    counts = ", ".join(f"{k}: {v['clips']}" for k, v in points.items())
    report = (f"{axis} sweep: held-out clips per point {counts}; "
              f"{minutes:.1f} min on {torch.get_num_threads()} threads ({device}).\n\n{table(points, axis)}\n")
    print(report)
    out = Path(args.out)
    write_atomic(out / f"{args.axis}.md", report)
    write_atomic(out / f"{args.axis}.json", json.dumps({"points": points, "minutes": minutes, "args": vars(args)},
                                                      indent=2) + "\n")
    title = ("toy pair: accuracy against frames (trained on 2-8)" if args.axis == "frames"
             else f"toy pair: accuracy against frame size ({frames[0]} frames; trained on 32-256 px)")
    plot(points, axis, Path(args.plot or out / f"{args.axis}.png"), title)


if __name__ == "__main__":
    run_cli(main)   # one-line errors, 128 + signal after Ctrl-C / SIGTERM
