"""How much of the video the hidden states a hypernetwork reads carry, per layer, at image and at text positions.

    python benchmarks/video_share.py                                   # the shipped tiny base
    python benchmarks/video_share.py --model runs/base_br/model --model checkpoints/tiny/base

For each base model: the frozen VLM reads [video + instruction] for N held-out clips (exactly what internalize.py
feeds the hypernetwork); per layer, the states are averaged over the image tokens, and over the text tokens after
the last image token (the instruction and the template around it). The "video share" of a position group is
sum_d Var_clips(mean state)_d / sum_d (mean over clips of the mean state)_d^2: 0 when the pooled state is the same
for every clip. A perceiver starts out pooling nearly uniformly, so a small share is a weak video signal to learn
from at the start (the plateau of README "The adapter").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import model as M  # noqa: E402


def video_share(model_dir: str, paths: list[str]) -> dict[str, list[float]]:
    vlm, proc = M.load_model(model_dir), data.Processor(model_dir)
    pooled: dict[str, list[torch.Tensor]] = {"image tokens": [], "text after the video": []}
    for path in paths:
        ids, pixels = proc.internalization_inputs(proc.load_video(path))
        with torch.no_grad():
            states = vlm(ids, pixels, output_hidden_states=True, logits="none").hidden_states
        image = ids[0] == proc.image_token_id
        after = torch.arange(ids.shape[1]) > int(image.nonzero().max())
        for name, where in (("image tokens", image), ("text after the video", after)):
            pooled[name].append(torch.stack([h[0][where].mean(0) for h in states]))  # (L, D)
    out = {}
    for name, per_clip in pooled.items():
        x = torch.stack(per_clip)  # (N, L, D)
        out[name] = (x.var(0).sum(-1) / x.mean(0).pow(2).sum(-1)).tolist()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="base model folder; repeat to compare (default: shipped tiny)")
    p.add_argument("--manifest", default="data/toy/heldout/manifest.jsonl", help="clips to read (toyworld.py clips)")
    p.add_argument("--clips", type=int, default=40)
    args = p.parse_args(argv)
    if not Path(args.manifest).is_file():
        raise SystemExit(f"error: {args.manifest} not found; write clips first with `python toyworld.py clips ...`")
    rows, _ = data.read_manifest(args.manifest)
    paths = list(dict.fromkeys(r["video_path"] for r in rows))[:args.clips]
    for model_dir in args.model or [str(M.TINY_DIR)]:
        for name, share in video_share(model_dir, paths).items():
            print(f"{model_dir} | {name} | video share per layer: " + " ".join(f"{v:.3f}" for v in share))


if __name__ == "__main__":
    main()
