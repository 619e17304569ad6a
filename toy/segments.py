"""Composition beyond two segments (issue 28): n-part clips, one adapter per part, composed in rank space.

    python -m toy.segments                          # 2, 3, 4 and 8 parts, 50 held-out clips each
    python -m toy.segments --parts 4 --clips 20     # one point
    python -m toy.segments --quick                  # 2 and 4 parts, 8 clips each

An n-part clip (world.sample_parts) shows object k alone in part k (2-4 s each), min(n, 4) objects of different
colours; with 8 parts each object makes its trip twice (parts k and k + 4). Questions: every colour, shape and
direction question with one right answer in the clip (world.parts_questions). Each part is internalized on its
own, exactly as `internalize.py --segments n` cuts the clip, and the n adapters are composed (adapter.concat_adapters,
what compose.py runs): plainly, each weighted 1/n, each weighted 1/sqrt(n). Beside them: the video in context
(all of the clip, 1 frame a second: up to 32 frames, past the 2-8 the base trained on), the adapter of the whole clip
(the same frames in one pass), and each question asked of the adapter of a part that shows its object, alone (the
ceiling composition works against).
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
from adapter import ArgumentParser, base_facts, run_cli, write_atomic
from hypernet import load_hypernet
from toy import world
from toy.fidelity import compose
from toy.sweep import adapters, ask, clip_of, in_context, sampler

KINDS = ("color", "shape", "direction")
WEIGHTS = {"composed": lambda n: 1.0, "composed 1/n": lambda n: 1 / n, "composed 1/sqrt(n)": lambda n: n ** -0.5}


def run(vlm, hyper, proc, n_parts: int, n_clips: int, first_seed: int = world.SPLITS["heldout"]) -> dict:
    """Every condition on the questions of n_clips n-part clips -> {"kinds": [...], condition: hits array}."""
    facts, alpha = base_facts(vlm), hyper.config.alpha
    hits: dict[str, list] = {"in context": []}
    items, wholes, parts = [], [], []
    for c in range(n_clips):
        spec = world.sample_parts(first_seed + c, n_parts)
        qs = world.parts_questions(spec)
        p = sampler(proc, max(1, round(spec.duration)), spec.duration)   # 1 frame a second, all of the clip
        clip = clip_of(p, spec)
        got, _ = in_context(vlm, p, clip, [q for _, q, _, _ in qs])
        hits["in context"] += [world.score(g, a) for g, (_, _, a, _) in zip(got, qs)]
        wholes.append(clip)
        parts += [clip_of(p, spec, s, e) for s, e in data.plan_segments(0.0, spec.duration, n_parts, None)]
        items += [(c, kind, q, a, shown) for kind, q, a, shown in qs]
    whole = adapters(vlm, hyper, proc, wholes)
    seg = adapters(vlm, hyper, proc, parts)
    per = [seg[c * n_parts:(c + 1) * n_parts] for c in range(n_clips)]
    conditions = {"whole-clip adapter": [(q, whole[c]) for c, _, q, _, _ in items]}
    for name, w in WEIGHTS.items():
        composed = [compose(x, hyper, facts, [w(n_parts)] * n_parts) for x in per]
        conditions[name] = [(q, composed[c]) for c, _, q, _, _ in items]
    conditions["own part's adapter"] = [(q, per[c][shown[0]]) for c, _, q, _, shown in items]
    for name, rows in conditions.items():
        got = ask(vlm, proc, rows, alpha)
        hits[name] = [world.score(g, a) for g, (_, _, _, a, _) in zip(got, items)]
    return {"kinds": [k for _, k, _, _, _ in items], **{n: np.array(v, float) for n, v in hits.items()}}


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(M.TINY_DIR))
    p.add_argument("--hypernet", default=str(M.TINY_DIR.parent / "hypernet"))
    p.add_argument("--parts", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--clips", type=int, default=50, help="held-out n-part clips per point")
    p.add_argument("--quick", action="store_true", help="2 and 4 parts, 8 clips each")
    p.add_argument("--out", default="results/segments")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.parts, args.clips = [2, 4], 8
    if min(args.parts) < 1 or args.clips < 1:
        raise SystemExit("error: --parts and --clips must be >= 1")
    t0 = time.time()
    vlm, proc = M.load_model(args.model, device=args.device), data.Processor(args.model)
    hyper = load_hypernet(args.hypernet, vlm.config, device=args.device).eval()
    results, lines = {}, []
    for n in args.parts:
        r = run(vlm, hyper, proc, n, args.clips)
        names = [k for k in r if k != "kinds"]
        kinds = np.array(r["kinds"])
        results[str(n)] = {name: {"all": float(r[name].mean()), **{k: float(r[name][kinds == k].mean())
                                                                  for k in KINDS if (kinds == k).any()}}
                           for name in names} | {"questions": len(kinds)}
        print(f"{n} parts: " + ", ".join(f"{k} {v['all']:.3f}" for k, v in results[str(n)].items()
                                         if isinstance(v, dict)), flush=True)
    names = [k for k in results[str(args.parts[0])] if k != "questions"]
    lines = ["| segments | questions | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for n, res in results.items():
        lines.append(f"| {n} | {res['questions']} | " + " | ".join(f"{res[x]['all']:.3f}" for x in names) + " |")
    lines += ["", "| segments | kind | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for n, res in results.items():
        for k in KINDS:
            if k in res[names[0]]:
                lines.append(f"| {n} | {k} | " + " | ".join(f"{res[x][k]:.3f}" for x in names) + " |")
    minutes = (time.time() - t0) / 60
    report = (f"n-part held-out clips, {args.clips} per point; {minutes:.1f} min on {torch.get_num_threads()} "
              f"threads ({args.device}).\n\n" + "\n".join(lines) + "\n")
    print(report)
    out = Path(args.out)
    write_atomic(out / "segments.md", report)
    write_atomic(out / "segments.json", json.dumps({"points": results, "minutes": minutes, "args": vars(args)},
                                                  indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)   # one-line errors, 128 + signal after Ctrl-C / SIGTERM
