"""Captions scored the paper's way (issue 28): token F1 beside exact match, in context vs adapter, and which words
the adapter gets wrong.

    python -m toy.captions                        # shipped pair, the 200 held-out clips toy/fidelity.py scores
    python -m toy.captions --hypernet runs/x/best --clips 100
    python -m toy.captions upweight runs/toy/teacher.jsonl runs/toy/teacher_cap3.jsonl --times 3

The paper scores captions by an LLM judge and by SQuAD-style token F1 (method.md §9.1). Token F1 here is eval.py's,
the metric the real benchmarks are scored with: answer and reference lower-cased, punctuation and the articles
a / an / the removed, then the F1 of the two bags of words. Beside it: exact match as toy/fidelity.py counts it, the
paired difference adapter - in context with eval.py's 95 % bootstrap CI on both, and a breakdown of every caption
by what is wrong in it (a colour, a shape, a direction, the objects' order, the number of objects).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import data
from adapter import ArgumentParser, run_cli, write_atomic
import eval as eval_metrics
import model as M
from hypernet import load_hypernet
from toy import world


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of one answer against one reference (eval.token_f1, the project's metric)."""
    return eval_metrics.token_f1(prediction, [reference])


# The caption grammar: "A {c} {s} moves {d}." or "A {c1} {s1} moves {d1} and a {c2} {s2} moves {d2}."
_TRIPLE = re.compile(r"(\w+) (\w+) moves (\w+)")


def triples(caption: str) -> list[tuple[str, str, str]]:
    return _TRIPLE.findall(" ".join(world._words(caption)))


def error_kind(got: str, want: str) -> str:
    """What is wrong in a caption: 'exact', 'order' (the right objects, listed the other way round), 'objects'
    (a different number of them), 'garbled' (not the caption grammar), else the attributes that differ in caption
    order, e.g. 'direction' or 'color+shape'."""
    if world.score(got, want):
        return "exact"
    g, w = triples(got), triples(want)
    if not g:
        return "garbled"
    if len(g) != len(w):
        return "objects"
    if sorted(g) == sorted(w):
        return "order"
    wrong = {name for a, b in zip(g, w) for name, x, y in zip(("color", "shape", "direction"), a, b) if x != y}
    return "+".join(n for n in ("color", "shape", "direction") if n in wrong)


def caption_report(rows: list[dict], names: list[str], delta: float = 0.05) -> tuple[str, dict]:
    """rows: {"objects": n, "want": caption, name: answer for each condition}. Exact match and token F1 per
    condition (and per number of objects), paired CIs of the last condition minus the first, error kinds."""
    exact = {n: np.array([world.score(r[n], r["want"]) for r in rows], float) for n in names}
    f1 = {n: np.array([token_f1(r[n], r["want"]) for r in rows]) for n in names}
    objs = np.array([r["objects"] for r in rows])
    lines = ["| captions | clips | " + " | ".join(f"{n}: exact / token F1" for n in names) + " |",
             "|---" * (len(names) + 2) + "|"]
    for label, sel in (("one object", objs == 1), ("two objects", objs == 2), ("**all**", objs > 0)):
        if sel.any():
            lines.append(f"| {label} | {sel.sum()} | " + " | ".join(
                f"{exact[n][sel].mean():.3f} / {f1[n][sel].mean():.3f}" for n in names) + " |")
    base, new = names[0], names[-1]
    verdicts = {}
    for metric, vals in (("exact", exact), ("token F1", f1)):
        d, lo, hi = eval_metrics.paired_bootstrap(vals[new], vals[base])
        verdicts[metric] = {"delta": d, "ci": [lo, hi], "non_inferior": lo > -delta,
                            "equivalent": -delta < lo and hi < delta}
        lines.append(f"\n{new} - {base}, captions, {metric}: {d:+.3f}, 95 % CI [{lo:+.3f}, {hi:+.3f}]; non-inferior "
                     f"at delta={delta}: {'yes' if lo > -delta else 'NO'}; "
                     f"equivalent: {'yes' if -delta < lo and hi < delta else 'NO'}")
    kinds = {n: Counter(error_kind(r[n], r["want"]) for r in rows) for n in names}
    order = sorted({k for c in kinds.values() for k in c}, key=lambda k: (k != "exact", -sum(c[k] for c in kinds.values())))
    lines += ["", "| what is wrong | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(str(kinds[n][k]) for n in names) + " |" for k in order]
    result = {n: {"exact": float(exact[n].mean()), "token_f1": float(f1[n].mean()), "errors": dict(kinds[n])}
              for n in names}
    return "\n".join(lines), {"by_condition": result, "verdicts": verdicts, "clips": len(rows)}


def upweight(src: Path, dst: Path, times: int, kind: str = "caption", objects: int | None = None) -> tuple[int, int]:
    """Copy a training manifest with every row of `kind` written `times` times (the copies' ids get "#2", "#3",
    ... so that caches and the composition hash tell them apart): the rows of that kind weigh `times` as much in
    every epoch, with no change to train.py. `objects`: only rows of clips with that many objects. Returns (rows
    in, rows out)."""
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()]
    out = []
    for ln in lines:
        out.append(ln)
        row = json.loads(ln)
        if row.get("kind") == kind and (objects is None or len(row["spec"]["objects"]) == objects):
            out += [json.dumps({**row, "id": f"{row['id']}#{k}"}) for k in range(2, times + 1)]
    write_atomic(dst, "".join(x + "\n" for x in out))   # never a half-written manifest
    return len(lines), len(out)


def main(argv=None):
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["upweight"]:
        p = ArgumentParser(prog="python -m toy.captions upweight", description=upweight.__doc__)
        p.add_argument("src", type=Path)
        p.add_argument("dst", type=Path)
        p.add_argument("--times", type=int, default=3)
        p.add_argument("--kind", default="caption")
        p.add_argument("--objects", type=int, default=None, help="only rows of clips with this many objects")
        a = p.parse_args(argv[1:])
        if not a.src.is_file() or a.times < 1:
            raise SystemExit(f"error: {a.src} is not a file" if not a.src.is_file() else "error: --times must be >= 1")
        if a.dst.resolve() == a.src.resolve():
            raise SystemExit(f"error: {a.dst} is the manifest it copies; write the weighted copy elsewhere")
        n_in, n_out = upweight(a.src, a.dst, a.times, a.kind, a.objects)
        which = f" of {a.objects}-object clips" if a.objects else ""
        print(f"wrote {a.dst}: {n_in} rows -> {n_out} ({a.kind} rows{which} x{a.times})")
        return
    from toy import fidelity
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(M.TINY_DIR))
    p.add_argument("--hypernet", default=str(M.TINY_DIR.parent / "hypernet"))
    p.add_argument("--clips", type=int, default=200, help="held-out clips (the ones toy/fidelity.py scores)")
    p.add_argument("--data", default="data/toy")
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--out", default="results/captions")
    args = p.parse_args(argv)
    t0 = time.time()
    vlm, proc = M.load_model(args.model), data.Processor(args.model)
    hyper = load_hypernet(args.hypernet, vlm.config).eval()
    clips = fidelity.clips_of(fidelity.ensure_clips(Path(args.data) / "heldout", args.clips, "mixed"), args.clips, proc)
    own = fidelity.adapters(vlm, hyper, proc, [c["clip"] for c in clips])
    caps = [(i, q, a) for i, c in enumerate(clips) for kind, q, a in c["questions"] if kind == "caption"]
    got_ctx = fidelity.answers(vlm, proc, [(q, clips[i]["clip"], None) for i, q, _ in caps], hyper.config.alpha)
    got_ad = fidelity.answers(vlm, proc, [(q, None, own[i]) for i, q, _ in caps], hyper.config.alpha)
    rows = [{"objects": len(clips[i]["spec"].objects), "want": a, "in context": x, "adapter": y}
            for (i, _, a), x, y in zip(caps, got_ctx, got_ad)]
    report, result = caption_report(rows, ["in context", "adapter"], args.delta)
    minutes = (time.time() - t0) / 60
    text = f"{len(rows)} held-out clips' captions; {minutes:.1f} min on {torch.get_num_threads()} threads.\n\n{report}\n"
    print(text)
    out = Path(args.out)
    write_atomic(out / "captions.md", text)
    write_atomic(out / "captions.json", json.dumps(result | {"minutes": minutes, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)   # one-line errors, 128 + signal after Ctrl-C / SIGTERM
