"""The toy world's fidelity benchmark (toyworld.md): does an adapter answer as well as the video in context?

    python -m toy.fidelity                          # shipped tiny base + hypernet, 200 held-out clips
    python -m toy.fidelity --ablation runs/toy-captions/best   # adds the caption-only hypernetwork

Conditions, on the same questions: (1) in context: the base model sees the video; (2) adapter: zero visual
tokens, the clip's generated LoRA; controls: (3) text only, no adapter; (4) the adapter of a *different* clip.
Reports accuracy per question kind, the paired adapter - in-context difference with a 95 % bootstrap CI, and the
non-inferiority / equivalence verdicts at delta = 0.05. Then composition: two-part clips, each half internalized
on its own, the two adapters composed in rank space, questions about either object, per kind; beside it, each
question asked of the adapter of the half that shows its object, alone (the ceiling composition works against).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import data
import model as M
from adapter import ArgumentParser, adapter_from_lora, base_facts, concat_adapters, run_cli
from eval import paired_bootstrap, verdicts
from hypernet import internalize, load_hypernet
from toy import world
from toy.captions import token_f1

CHANCE = {"color": 1 / 4, "shape": 1 / 3, "direction": 1 / 4, "count": 1 / 2}
QA_KINDS = tuple(CHANCE)


def clips_of(manifest: Path, n: int, proc: data.Processor) -> list[dict]:
    """The first n clips of a manifest, decoded once, with their questions."""
    rows, _ = data.read_manifest(manifest)
    clips: dict[str, dict] = {}
    for row in rows:
        if row["clip_id"] not in clips:
            if len(clips) == n:
                break
            spec = world.ClipSpec.from_dict(row["spec"])
            clips[row["clip_id"]] = {"path": row["video_path"], "spec": spec, "questions": [],
                                     "clip": proc.load_video(row["video_path"])}
        clips[row["clip_id"]]["questions"].append((row["kind"], row["prompt"], row["target_text"]))
    return list(clips.values())


def adapters(vlm, hyper, proc, videos: list, batch: int = 16) -> list[dict]:
    """One adapter per video (a Clip): {target: (A (L, 2r, d_in), B (L, 2r, d_out))}."""
    out = []
    for i in range(0, len(videos), batch):
        inputs = [proc.internalization_inputs(v) for v in videos[i:i + batch]]
        ids, mask = data.pad_batch([x[0][0] for x in inputs], proc.pad_id, side="left")
        with torch.no_grad():
            lora = internalize(vlm, hyper, ids, mask, torch.cat([x[1] for x in inputs]))
        out += [{t: (A[b], B[b]) for t, (A, B) in lora.items()} for b in range(ids.shape[0])]
    return out


def answers(vlm, proc, items: list[tuple], alpha: float, batch: int = 64) -> list[str]:
    """items: (question, Clip or None for zero visual tokens, adapter or None). Greedy, left-padded batches."""
    texts = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        inputs = [proc.question_inputs(q, video=clip) for q, clip, _ in chunk]
        ids, mask = data.pad_batch([x[0][0] for x in inputs], proc.pad_id, side="left")
        pixels = [x[1] for x in inputs if x[1] is not None]
        lora = None
        if chunk[0][2] is not None:  # stack each question's own adapter along the batch axis
            lora = {t: (torch.stack([a[t][0] for *_, a in chunk]), torch.stack([a[t][1] for *_, a in chunk]))
                    for t in chunk[0][2]}
        new = M.generate(vlm, ids, mask, torch.cat(pixels) if pixels else None, lora, alpha,
                         max_new_tokens=24, eos_token_id=proc.eou_id)
        texts += [proc.decode(t).strip() for t in new]
    return texts


def compose(parts: list[dict], hyper, facts: dict, weights=None) -> dict:
    """adapter.concat_adapters, the code compose.py runs: generated ranks side by side (each segment's A times its
    weight, with `weights`), the static part once."""
    meta = {**facts, "hypernet_sha256": "benchmark", "alpha": hyper.config.alpha, "targets": list(hyper.config.targets)}
    ads = [adapter_from_lora({t: (a[None], b[None]) for t, (a, b) in p.items()}, hyper.config.rank,
                        {**meta, "segments": [{"video": f"part{i}", "video_sha256": "", "start": i, "end": i + 1}]})
           for i, p in enumerate(parts)]
    return concat_adapters(ads, weights).ab


def score(conditions: dict[str, list[tuple]], expected: list[str], vlm, proc, alpha) -> dict[str, np.ndarray]:
    return {name: np.array([world.score(a, e) for a, e in zip(answers(vlm, proc, items, alpha), expected)])
            for name, items in conditions.items()}


def fidelity(vlm, hyper, proc, clips, delta: float, ablation=None) -> tuple[str, dict]:
    own = adapters(vlm, hyper, proc, [c["clip"] for c in clips])
    qs = [(kind, q, a, i) for i, c in enumerate(clips) for kind, q, a in c["questions"]]
    other = lambda i: own[(i + 1) % len(own)]  # noqa: E731  the next clip's adapter: a different video
    conditions = {"in context": [(q, clips[i]["clip"], None) for _, q, _, i in qs],
                  "adapter": [(q, None, own[i]) for _, q, _, i in qs],
                  "text only": [(q, None, None) for _, q, _, i in qs],
                  "other clip's adapter": [(q, None, other(i)) for _, q, _, i in qs]}
    if ablation is not None:
        abl = adapters(vlm, ablation, proc, [c["clip"] for c in clips])
        conditions["caption-only hypernet"] = [(q, None, abl[i]) for _, q, _, i in qs]
    texts = {name: answers(vlm, proc, items, hyper.config.alpha) for name, items in conditions.items()}
    hits = {name: np.array([world.score(a, e) for a, (_, _, e, _) in zip(t, qs)]) for name, t in texts.items()}
    kinds = np.array([k for k, *_ in qs])
    qa = np.isin(kinds, QA_KINDS)
    names = list(conditions)
    lines = [f"| kind | questions | {' | '.join(names)} | chance |", "|---" * (len(names) + 3) + "|"]
    for kind in (*QA_KINDS, "caption"):
        sel = kinds == kind
        cells = " | ".join(f"{hits[n][sel].mean():.3f}" for n in names)
        lines.append(f"| {kind} | {sel.sum()} | {cells} | {CHANCE.get(kind, 0):.2f} |")
    f1 = {n: np.mean([token_f1(t, qs[i][2]) for i, t in enumerate(texts[n]) if kinds[i] == "caption"])
          for n in names}  # SQuAD's token F1, the paper's caption metric (toy/captions.py)
    lines.append(f"| caption (token F1) | {(kinds == 'caption').sum()} | "
                 + " | ".join(f"{f1[n]:.3f}" for n in names) + " | 0.00 |")
    lines.append(f"| **overall (QA kinds)** | {qa.sum()} | "
                 + " | ".join(f"**{hits[n][qa].mean():.3f}**" for n in names) + " | |")
    d, lo, hi = paired_bootstrap(hits["adapter"][qa], hits["in context"][qa])   # eval.py's statistics
    v = verdicts(lo, hi, delta)
    verdict = {"delta": d, "ci": [lo, hi], "non_inferior": v["NI"], "equivalent": v["Eq"]}
    lines.append(f"\nadapter - in context (QA kinds): {d:+.3f}, 95 % CI [{lo:+.3f}, {hi:+.3f}]; "
                 f"non-inferior at delta={delta}: {'yes' if verdict['non_inferior'] else 'NO'}; "
                 f"equivalent: {'yes' if verdict['equivalent'] else 'NO'}")
    result = {n: {k: float(hits[n][kinds == k].mean()) for k in (*QA_KINDS, "caption")} | {
        "caption_token_f1": float(f1[n]), "overall": float(hits[n][qa].mean())} for n in names}
    ranges, by = by_range([clips[i]["spec"] for (_, _, _, i), keep in zip(qs, qa) if keep],
                          {n: hits[n][qa] for n in ("in context", "adapter")})
    lines.append(f"\nQA kinds by where the clip lies in the spec's ranges:\n\n{ranges}")
    return "\n".join(lines), {"accuracy": result, "verdict": verdict, "questions": int(len(qs)), "by_range": by}


# The spec's ranges (toyworld.md), each cut in bins [lo, hi), the last one [lo, hi], (n, n) for exactly n: answers
# must hold anywhere in them, not only at the generator's defaults.
RANGES = {"shorter side (px)": (lambda s: min(s.width, s.height), [(32, 96), (96, 160), (160, 256)]),
          "aspect (long:short)": (lambda s: max(s.width, s.height) / min(s.width, s.height),
                                  [(1, 1.25), (1.25, 1.6), (1.6, 2)]),
          "fps": (lambda s: s.fps, [(4, 10), (10, 20), (20, 30)]),
          "duration (s)": (lambda s: s.duration, [(2, 4), (4, 6), (6, 8)]),
          "objects": (lambda s: len(s.objects), [(1, 1), (2, 2)])}


def by_range(specs: list[world.ClipSpec], hits: dict[str, np.ndarray]) -> tuple[str, dict]:
    """Accuracy per bin of each spec range; specs and each condition's hits: one per question."""
    names = list(hits)
    lines = [f"| clips by | bin | questions | {' | '.join(names)} |", "|---" * (len(names) + 3) + "|"]
    result: dict[str, dict] = {}
    for label, (value, bins) in RANGES.items():
        v = np.array([value(s) for s in specs])
        for j, (lo, hi) in enumerate(bins):
            sel = (v >= lo) & ((v < hi) | ((j == len(bins) - 1 or lo == hi) & (v <= hi)))
            if not sel.any():
                continue
            shown = f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"
            cells = {n: float(hits[n][sel].mean()) for n in names}
            result.setdefault(label, {})[shown] = {"questions": int(sel.sum())} | cells
            lines.append(f"| {label} | {shown} | {sel.sum()} | " + " | ".join(f"{c:.3f}" for c in cells.values()) + " |")
    return "\n".join(lines), result


def subject(spec: world.ClipSpec, prompt: str) -> int:
    """The object a colour / shape / direction question is about: the one whose shape or colour it names (the two
    objects of a clip differ in both)."""
    words = set(prompt.rstrip("?").split())
    (k,) = [k for k, o in enumerate(spec.objects) if {o.shape, o.color} & words]
    return k


def composition(vlm, hyper, proc, clips) -> tuple[str, dict]:
    """Two-part clips: adapters of the two halves, composed; vs the whole clip's adapter and the video in context.
    The last column asks each question of the adapter of the half that shows its object, alone: what composition
    could reach if composing cost nothing."""
    halves = []
    for c in clips:
        mid = c["spec"].duration / 2
        halves += [proc.load_video(c["path"], end=mid), proc.load_video(c["path"], start=mid)]
    parts = adapters(vlm, hyper, proc, halves)
    facts = base_facts(vlm)
    composed = [compose([parts[2 * i], parts[2 * i + 1]], hyper, facts) for i in range(len(clips))]
    whole = adapters(vlm, hyper, proc, [c["clip"] for c in clips])
    qs = [(kind, q, a, i) for i, c in enumerate(clips) for kind, q, a in c["questions"] if kind in QA_KINDS]
    conditions = {"in context": [(q, clips[i]["clip"], None) for _, q, _, i in qs],
                  "whole-clip adapter": [(q, None, whole[i]) for _, q, _, i in qs],
                  "composed halves": [(q, None, composed[i]) for _, q, _, i in qs],
                  "own half's adapter": [(q, None, parts[2 * i + subject(clips[i]["spec"], q)])
                                         for _, q, _, i in qs]}
    hits = score(conditions, [a for _, _, a, _ in qs], vlm, proc, hyper.config.alpha)
    kinds = np.array([k for k, *_ in qs])
    lines = ["| two-part clips | questions | " + " | ".join(conditions) + " |", "|---" * (len(conditions) + 2) + "|"]
    for kind in ("color", "shape", "direction"):
        sel = kinds == kind
        lines.append(f"| {kind} | {sel.sum()} | " + " | ".join(f"{hits[n][sel].mean():.3f}" for n in conditions) + " |")
    lines.append(f"| **either object, all three kinds** | {len(qs)} | "
                 + " | ".join(f"**{hits[n].mean():.3f}**" for n in conditions) + " |")
    result = {n: float(v.mean()) for n, v in hits.items()}
    return "\n".join(lines), result | {"per_kind": {n: {k: float(hits[n][kinds == k].mean())
                                                          for k in ("color", "shape", "direction")} for n in hits}}


def ensure_clips(out: Path, n: int, two_part: str) -> Path:
    manifest = out / "manifest.jsonl"
    if not manifest.exists() or sum(1 for _ in manifest.open()) < n:
        world.write_split("heldout", n, out, two_part=two_part, progress=False)
    return manifest


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(M.TINY_DIR), help="base model folder (default: the shipped tiny one)")
    p.add_argument("--hypernet", default=str(M.TINY_DIR.parent / "hypernet"))
    p.add_argument("--ablation", help="a second hypernetwork (e.g. trained on captions only) to score beside it")
    p.add_argument("--clips", type=int, default=200, help="held-out clips (toyworld seeds never used in training)")
    p.add_argument("--two-part-clips", type=int, default=100)
    p.add_argument("--data", default="data/toy", help="where held-out clips are written / reused")
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--out", default="results/fidelity", help="folder for fidelity.md and fidelity.json")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    t0 = time.time()
    vlm, proc = M.load_model(args.model), data.Processor(args.model)
    hyper = load_hypernet(args.hypernet, vlm.config).eval()
    ablation = load_hypernet(args.ablation, vlm.config).eval() if args.ablation else None
    clips = clips_of(ensure_clips(Path(args.data) / "heldout", args.clips, "mixed"), args.clips, proc)
    two = clips_of(ensure_clips(Path(args.data) / "heldout_two_part", args.two_part_clips, "always"),
                   args.two_part_clips, proc)
    table, result = fidelity(vlm, hyper, proc, clips, args.delta, ablation)
    comp_table, result["composition"] = composition(vlm, hyper, proc, two)
    minutes = (time.time() - t0) / 60
    report = (f"{len(clips)} held-out clips, {result['questions']} questions; {len(two)} two-part clips. "
              f"{minutes:.1f} min on {torch.get_num_threads()} CPU threads.\n\n{table}\n\n{comp_table}\n")
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.md").write_text(report)
    (out / "fidelity.json").write_text(json.dumps(result | {"minutes": minutes}, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)   # one-line errors, 128 + signal after Ctrl-C / SIGTERM
