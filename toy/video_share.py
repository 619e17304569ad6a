"""How much of the video the hidden states a hypernetwork reads carry, per layer, at image and at text positions.

    python -m toy.video_share                                   # the shipped tiny base
    python -m toy.video_share --model runs/base_br/model --model checkpoints/tiny/base
    python -m toy.video_share --probe data/toy/train/manifest.jsonl   # and a linear probe per layer

For each base model: the frozen VLM reads [video + instruction] for N held-out clips (exactly what internalize.py
feeds the hypernetwork); per layer, the states are averaged over the image tokens, and over the text tokens after
the last image token (the instruction and the template around it). The "video share" of a position group is
sum_d Var_clips(mean state)_d / sum_d (mean over clips of the mean state)_d^2: 0 when the pooled state is the same
for every clip. A perceiver starts out pooling nearly uniformly, so a small share is a weak video signal to learn
from at the start (the plateau recorded in docs/LOG.md).

--probe TRAIN_MANIFEST: is the video there all the same? On the one-object clips, a logistic regression on the state
averaged over *all* tokens (what a perceiver that pools uniformly sees), its features standardised over the training
clips, learns each object attribute from up to --probe-clips training clips and is scored on the held-out ones.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import model as M
from adapter import ArgumentParser, run_cli

GROUPS = ("all tokens", "image tokens", "text after the video")
ATTRIBUTES = ("color", "shape", "direction")


def pooled_states(model_dir: str, paths: list[str]) -> dict[str, torch.Tensor]:
    """{position group: (N clips, L, D)}: each layer's input state averaged over the group's positions."""
    vlm, proc = M.load_model(model_dir), data.Processor(model_dir)
    pooled: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
    for path in paths:
        ids, pixels = proc.internalization_inputs(proc.load_video(path))
        with torch.no_grad():
            states = vlm(ids, pixels, output_hidden_states=True, logits="none").hidden_states
        image = ids[0] == proc.image_token_id
        after = torch.arange(ids.shape[1]) > int(image.nonzero().max())
        for name, where in zip(GROUPS, (torch.ones_like(image), image, after)):
            pooled[name].append(torch.stack([h[0][where].mean(0) for h in states]))  # (L, D)
    return {g: torch.stack(x) for g, x in pooled.items()}


def video_share(model_dir: str, paths: list[str]) -> dict[str, list[float]]:
    pooled = pooled_states(model_dir, paths)
    return {g: (pooled[g].var(0).sum(-1) / pooled[g].mean(0).pow(2).sum(-1)).tolist() for g in GROUPS[1:]}


def linear_probe(x_train, y_train: list, x_test, y_test: list, l2: float = 1e-2) -> float:
    """Held-out accuracy of a multinomial logistic regression (L-BFGS) on features standardised by the training
    set's mean and spread, so that a signal tiny beside a part every sample shares is as readable as a large one."""
    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    a, b = torch.tensor([index[c] for c in y_train]), torch.tensor([index.get(c, -1) for c in y_test])
    mu, sd = x_train.mean(0), x_train.std(0, correction=0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    W = torch.zeros(x_train.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([W, bias], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_train @ W + bias, a) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((x_test @ W + bias).argmax(1) == b).float().mean().item()


def one_object_clips(manifest: str, n: int) -> list[tuple[str, dict]]:
    rows, _ = data.read_manifest(manifest)
    clips = {}
    for r in rows:
        spec = r.get("spec") or {}
        if len(spec.get("objects", [])) == 1 and not spec.get("two_part"):
            clips.setdefault(r["video_path"], spec["objects"][0])
    return list(clips.items())[:n]


def probe(model_dir: str, train_manifest: str, test_manifest: str, n_train: int, n_test: int) -> dict[str, list]:
    """{attribute: held-out accuracy per layer} of linear_probe on the uniformly pooled state (all tokens)."""
    train, test = one_object_clips(train_manifest, n_train), one_object_clips(test_manifest, n_test)
    if not train or not test:
        raise SystemExit("error: --probe needs one-object clips (world.py clips) in both manifests")
    x_train = pooled_states(model_dir, [p for p, _ in train])["all tokens"]
    x_test = pooled_states(model_dir, [p for p, _ in test])["all tokens"]
    return {k: [linear_probe(x_train[:, l], [o[k] for _, o in train], x_test[:, l], [o[k] for _, o in test])
                for l in range(x_train.shape[1])] for k in ATTRIBUTES}


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="base model folder; repeat to compare (default: shipped tiny)")
    p.add_argument("--manifest", default="data/toy/heldout/manifest.jsonl", help="clips to read (world.py clips)")
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--probe", metavar="TRAIN_MANIFEST", help="also fit a linear probe per layer on these clips")
    p.add_argument("--probe-clips", type=int, default=500, help="one-object training clips the probe learns from")
    args = p.parse_args(argv)
    for path in [args.manifest] + ([args.probe] if args.probe else []):
        if not Path(path).is_file():
            raise SystemExit(f"error: {path} not found; write clips first with `python world.py clips ...`")
    rows, _ = data.read_manifest(args.manifest)
    paths = list(dict.fromkeys(r["video_path"] for r in rows))[:args.clips]
    for model_dir in args.model or [str(M.TINY_DIR)]:
        for name, share in video_share(model_dir, paths).items():
            print(f"{model_dir} | {name} | video share per layer: " + " ".join(f"{v:.3f}" for v in share))
        if args.probe:
            for k, acc in probe(model_dir, args.probe, args.manifest, args.probe_clips, 10**9).items():
                print(f"{model_dir} | linear probe, all tokens pooled | {k} accuracy per layer: "
                      + " ".join(f"{v:.2f}" for v in acc))


if __name__ == "__main__":
    run_cli(main)   # one-line errors, 128 + signal after Ctrl-C / SIGTERM
