"""Train the toy world's base VLM from scratch, with the video in context, and save it in the Hugging Face layout.

    python -m toy.world clips --split train --n 1500 --out data/toy/train
    python -m toy.world clips --split heldout --n 300 --out data/toy/heldout
    python -m toy.base --out runs/toy/base                 # the shipped recipe: toy/recipes/base.toml

The model is a SmolVLM2 in miniature (SigLIP tower, pixel-shuffle connector, Llama decoder) and the folder it writes
(config.json, model.safetensors, tokenizer.json, processor configs) is laid out exactly like a released checkpoint:
model.load_model, data.Processor and transformers' SmolVLMForConditionalGeneration all read it, and no pipeline stage
special-cases it.

Two stages, both inside the --minutes budget, as SmolVLM2 itself was built on a pretrained SigLIP tower:
  1. the vision tower alone learns each patch's object colour and shape and the patch's place in the frame
     (pretrain_vision; the heads are thrown away);
  2. the connector and the decoder learn every question kind and the caption from in-context clips. A clip's
     questions are branches after its one video prefix, each seeing the video and itself only, as at inference
     (branches), plus a gist branch: the internalization instruction, then the caption, which sees the instruction
     but not the video, so the base writes the clip into the positions the hypernetwork reads (gist_branch).
     Every answer weighs alike in the loss (answer_weights), and two dense objectives read each object token's
     direction and shape off the decoder's residual stream (motion_targets, shape_targets). The tower stays frozen.
The recipe's reasons are in toy/recipes/base.toml; what was tried on the way is in docs/LOG.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import data
import model as M
from toy import world
from safetensors.torch import load_file
from adapter import run_cli
from train import StopFlag, Stopped, fail, parse_with_recipe, temp_path, umask_modes


MOTION_LAYER = 2  # the dense heads read the residual stream entering decoder layer 2 (of 4)


def toy_config(vocab_size: int, image_token_id: int) -> M.SmolVLMConfig:
    """64 px frames of 8 px patches (8 x 8), pixel-shuffled by 2: 16 tokens per frame; a 2-layer, 96-wide SigLIP
    tower and a 4-layer, 128-wide Llama decoder (1.17M parameters in all)."""
    vision = M.VisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                            patch_size=8, image_size=64)
    text = M.TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=100000.0,
                        rms_norm_eps=1e-5, max_position_embeddings=2048)
    return M.SmolVLMConfig(vision, text, scale_factor=2, image_token_id=image_token_id)


def write_model_dir(out: Path, config: M.SmolVLMConfig, tokenizer, state: dict[str, torch.Tensor], max_frames=12,
                    report: dict | None = None):
    """Everything a released SmolVLM2 folder holds that our loader and transformers read, written atomically (with
    `report` as training.json, so a folder that has one is always complete). It replaces all of `out`."""
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model_files(tmp, config, tokenizer, state, max_frames, report)
        umask_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _write_model_files(tmp: Path, config, tokenizer, state, max_frames, report):
    tmp.mkdir(parents=True)
    tok = lambda t: tokenizer.token_to_id(t)  # noqa: E731
    side = config.vision.image_size
    files = {
        "config.json": config.to_hf_dict(),
        "generation_config.json": {"bos_token_id": tok("<|im_start|>"), "eos_token_id": tok("<end_of_utterance>"),
                                   "pad_token_id": tok("<|im_end|>")},
        "processor_config.json": {"image_seq_len": config.image_seq_len, "processor_class": "SmolVLMProcessor"},
        "preprocessor_config.json": {
            "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
            "do_image_splitting": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "rescale_factor": 1 / 255, "resample": 1, "size": {"longest_edge": side},
            "max_image_size": {"longest_edge": side}, "image_processor_type": "SmolVLMImageProcessor",
            "processor_class": "SmolVLMProcessor",
            "video_sampling": {"fps": 1, "max_frames": max_frames, "video_size": {"longest_edge": side}}},
        "tokenizer_config.json": {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>",
                                  "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                                  "model_max_length": config.text.max_position_embeddings,
                                  "tokenizer_class": "PreTrainedTokenizerFast",
                                  "clean_up_tokenization_spaces": False},
    }
    for name, obj in files.items():
        (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    tokenizer.save(str(tmp / "tokenizer.json"))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, tmp / "model.safetensors",
              metadata={"format": "pt"})
    if report is not None:
        (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n")


def init_weights(vlm: M.SmolVLM, std: float = 0.02):
    """The decoder and connector as transformers initialises them: N(0, std) linears and embeddings, zero biases,
    norms at one. The vision tower as SigLIP initialises its own: LeCun normal (std 1 / sqrt(fan_in)) linears and
    patch embedding, N(0, 1 / sqrt(width)) position embeddings. At std 0.02 the patch embedding's output is a
    fifth of unit scale, the residual branches drown it, and the tower learns shapes far more slowly."""
    for m in vlm.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)
    vision = vlm.model.vision_model
    for m in vision.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
    torch.nn.init.normal_(vision.embeddings.position_embedding.weight, std=vision.embeddings.position_embedding.weight.shape[1] ** -0.5)


_worker_proc: data.Processor | None = None


def _start_worker(proc: data.Processor):
    global _worker_proc
    torch.set_num_threads(1)
    _worker_proc = proc


def _decode(path: str) -> data.Clip:
    return _worker_proc.load_video(path)


def load_examples(manifest, proc: data.Processor, limit: int | None = None, workers: int = 1) -> list[dict]:
    """One example per manifest row: in-context prompt + " answer<end_of_utterance>", labels on the answer only.
    Each clip is decoded once (by `workers` processes in parallel) and its frames shared by all of its questions."""
    rows, _ = data.read_manifest(manifest)
    paths = list(dict.fromkeys(row["video_path"] for row in rows))[:limit]
    desc = f"loading {Path(manifest).parent.name}"
    if workers > 1:  # spawned, not forked: a fork after OpenMP has started can hang the children
        ctx = torch.multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, ctx, initializer=_start_worker, initargs=(proc,)) as pool:
            decoded = list(tqdm(pool.map(_decode, paths, chunksize=8), desc, len(paths), unit="clip", leave=False))
    else:
        decoded = [proc.load_video(path) for path in tqdm(paths, desc, unit="clip", leave=False)]
    clips, out = dict(zip(paths, decoded)), []
    pixels = {path: torch.stack(clip.frames) for path, clip in clips.items()}  # one tensor per clip
    context = {path: proc.internalization_inputs(clip)[0][0].tolist() for path, clip in clips.items()}
    for row in rows:
        if row["video_path"] in clips:
            clip = clips[row["video_path"]]
            head, _ = proc.question_inputs(row["prompt"], video=clip)
            tail = proc.encode(" " + row["target_text"] + "<end_of_utterance>")
            out.append({"head": head[0].tolist(), "tail": tail, "pixels": pixels[row["video_path"]], "row": row,
                        "indices": clip.indices, "context": context[row["video_path"]]})
    return out


def patch_owners(spec: world.ClipSpec, i: int, grid: int) -> torch.Tensor:
    """(grid * grid,) long: the index of the object that covers most of each cell of frame i, -1 for background, as
    the encoder sees it (the frame squashed to a square, row-major cells). A cell is background unless one
    object's visible pixels fill at least a tenth of it; later objects paint over earlier ones, as in
    world.render_frame."""
    h, w = spec.height, spec.width
    cell = ((np.arange(h)[:, None] + 0.5) * grid // h).astype(int) * grid + ((np.arange(w)[None, :] + 0.5) * grid // w)
    area = np.bincount(cell.ravel().astype(int), minlength=grid * grid)
    owner = np.full((h, w), -1)
    for k, o in enumerate(spec.objects):
        if i in spec.visible(k):
            owner[world._mask(o.shape, *spec.position(k, i), o.size, h, w)] = k
    best, owners = np.zeros(grid * grid), torch.full((grid * grid,), -1, dtype=torch.long)
    for k in range(len(spec.objects)):
        cover = np.bincount(cell[owner == k].astype(int), minlength=grid * grid) / area
        take = (cover >= 0.1) & (cover > best)
        best = np.where(take, cover, best)
        owners[torch.from_numpy(take)] = k
    return owners


def patch_targets(spec: world.ClipSpec, i: int, grid: int) -> torch.Tensor:
    """(grid * grid, 2) long: the colour and shape class (0 = background) of the object over each patch of frame i
    (patch_owners)."""
    owners = patch_owners(spec, i, grid)
    classes = torch.tensor([[0, 0]] + [[1 + list(world.COLORS).index(o.color), 1 + world.SHAPES.index(o.shape)]
                                       for o in spec.objects])
    return classes[owners + 1]


def motion_targets(spec: world.ClipSpec, indices, grid: int) -> torch.Tensor:
    """(len(indices), grid * grid) long: for each image token of each sampled frame (a grid x grid cell after the
    pixel shuffle, in the connector's row-major order), the direction class (world.DIRECTIONS order) of the
    object over it, if that object was already on screen in an earlier sampled frame, so the motion is there to
    see; -100 (ignored) for background and for an object's first sampled frame."""
    names = list(world.DIRECTIONS)
    out = torch.full((len(indices), grid * grid), -100, dtype=torch.long)
    seen: set[int] = set()
    for f, i in enumerate(indices):
        owners = patch_owners(spec, i, grid)
        for k in seen:
            out[f][owners == k] = names.index(spec.objects[k].direction)
        seen |= {k for k in range(len(spec.objects)) if i in spec.visible(k)}
    return out


def shape_targets(spec: world.ClipSpec, indices, grid: int) -> torch.Tensor:
    """(len(indices), grid * grid) long: for each image token of each sampled frame (as motion_targets), the shape
    class (world.SHAPES order) of the object over it; -100 (ignored) for background."""
    shapes = torch.tensor([world.SHAPES.index(o.shape) for o in spec.objects] + [-100])
    return torch.stack([shapes[patch_owners(spec, i, grid)] for i in indices])  # owner -1 -> the last entry


def frame_targets(examples: list[dict], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sampled frame of the examples' clips, once each, with patch_targets: (F, 3, S, S), (F, grid^2, 2)."""
    frames, targets, seen = [], [], set()
    for ex in examples:
        if ex["row"]["video_path"] not in seen:
            seen.add(ex["row"]["video_path"])
            spec = world.ClipSpec.from_dict(ex["row"]["spec"])
            frames.append(ex["pixels"])
            targets += [patch_targets(spec, i, grid) for i in ex["indices"]]
    return torch.cat(frames), torch.stack(targets)


def pretrain_vision(vlm: M.SmolVLM, train: list[dict], val: list[dict], steps: int, batch: int, lr: float,
                    rng: random.Random, stop=None) -> float:
    """Stage 1, the toy stand-in for SigLIP's own pretraining: the vision tower learns, per patch, the colour and
    shape of the object over it and the patch's own place in the frame (linear heads on its output, thrown away
    after), on the training clips' frames and their mirror images. Through the answer loss alone a tower trained
    from scratch learns colours but not shapes; and the decoder, which has no absolute positions, can only tell
    where an object is (hence which way it moves) if the object's own tokens say so. Returns the held-out shape
    accuracy on object patches."""
    vision, grid = vlm.model.vision_model, vlm.config.vision.image_size // vlm.config.vision.patch_size
    frames, targets = frame_targets(train, grid)
    n_colors = 1 + len(world.COLORS)
    n_classes = n_colors + 1 + len(world.SHAPES)
    head = torch.nn.Linear(vlm.config.vision.hidden_size, n_classes + 2)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, grid), torch.linspace(-1, 1, grid), indexing="ij")
    where = torch.stack([rows.flatten(), cols.flatten()], -1)  # (grid^2, 2): each patch's row and column

    def loss_and_hits(x, y):
        out = head(vision(x))
        loss = F.cross_entropy(out[..., :n_colors].flatten(0, 1), y[..., 0].flatten()) + \
            F.cross_entropy(out[..., n_colors:n_classes].flatten(0, 1), y[..., 1].flatten()) + \
            F.mse_loss(out[..., n_classes:], where.expand_as(out[..., n_classes:]))
        return loss, (out[..., n_colors:n_classes].argmax(-1) == y[..., 1])[y[..., 1] > 0]

    opt = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    bar = tqdm(range(steps), desc="toy vision", unit="step")
    for _ in bar:
        if stop is not None and stop.set:  # the caller raises Stopped
            return 0.0
        idx = torch.tensor(rng.sample(range(len(frames)), batch))
        x, y = frames[idx], targets[idx]
        if rng.random() < 0.5:  # mirror left-right: upright triangles stay upright; patch columns reverse
            x, y = x.flip(-1), y.view(batch, grid, grid, 2).flip(2).flatten(1, 2)
        loss, _ = loss_and_hits(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        hits = torch.cat([loss_and_hits(x, y)[1] for x, y in zip(*(t.split(256) for t in frame_targets(val, grid)))])
    return hits.float().mean().item()


def branches(examples: list[dict], rng: random.Random) -> dict:
    """All of a clip's questions after one shared prefix (the video), each question + answer a branch that sees the
    prefix and itself only: every answer comes from the video, each exactly as the single-turn prompt asked at
    inference would see it (the same tokens at the same positions), for the cost of one pass over the video.
    "branch" is 0 on the prefix and k on the tokens of branch k; batch_loss turns it into the attention mask.
    A clip whose first example carries a "gist" (gist_branch) gets that branch last."""
    heads = [ex["head"] for ex in examples]
    P = next((i for i in range(min(map(len, heads))) if len({h[i] for h in heads}) > 1), min(map(len, heads)))
    ids, labels, positions, branch = list(heads[0][:P]), [-100] * P, list(range(P)), [0] * P
    parent, blind = [0] * P, [0] * P
    for k, ex in enumerate(rng.sample(examples, len(examples)), 1):
        turn = ex["head"][P:] + ex["tail"]
        ids += turn
        labels += [-100] * (len(ex["head"]) - P) + ex["tail"]
        positions += range(P, P + len(turn))
        branch += [k] * len(turn)
    out = {"pixels": examples[0]["pixels"], **{k: examples[0][k] for k in ("motion", "shape") if k in examples[0]}}
    gist = examples[0].get("gist")
    if gist:  # the internalization instruction (sees the video), then its caption, which sees the instruction only
        k, instr, answer = len(examples) + 1, gist["instruction"][P:], gist["prompt"] + gist["answer"]
        ids += instr + answer
        labels += [-100] * (len(instr) + len(gist["prompt"])) + gist["answer"]
        positions += range(P, P + len(instr) + len(answer))
        branch += [k] * len(instr) + [k + 1] * len(answer)
        parent += [0] * (len(ids) - len(parent) - len(answer)) + [k] * len(answer)
        blind += [0] * (len(ids) - len(blind) - len(answer)) + [gist["sight"]] * len(answer)
        out |= {"parent": parent, "blind": blind}
    return {"ids": ids, "labels": labels, "positions": positions, "branch": branch, **out}


def gist_branch(proc: data.Processor, examples: list[dict]) -> dict | None:
    """The tokens of one clip's gist branch (branches), the internalization instruction exactly as
    internalize.py renders it (method.md §2) followed by "Assistant:" and the clip's caption. The caption tokens see
    the instruction's tokens and, of the shared prefix, only what a text-only prompt also starts with ("sight"), not
    the video: so the base learns to write the whole clip, each object's colour bound to its shape and direction,
    into the instruction's positions, the hidden states the hypernetwork reads (as a gist token compresses a prompt,
    Mu et al. 2023). None for a clip without a caption question."""
    caption = next((ex for ex in examples if ex["row"]["kind"] == "caption"), None)
    if caption is None:
        return None
    instruction = examples[0]["context"]
    text_only = proc.question_inputs(caption["row"]["prompt"])[0][0].tolist()
    sight = next(i for i, (a, b) in enumerate(zip(instruction, text_only)) if a != b)
    return {"instruction": instruction, "prompt": proc.encode("Assistant:"), "answer": caption["tail"], "sight": sight}


def branch_mask(batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, T) may-attend mask and (B, T) positions of right-padded branched examples: causal, and a token of
    branch k sees the prefix and branch k only; padding is seen by nothing but padding. An example without
    branches (one question asked alone) is all prefix: plain causal."""
    seg, _ = data.pad_batch([ex.get("branch", [0] * len(ex["ids"])) for ex in batch], -1, side="right")
    positions, _ = data.pad_batch([ex.get("positions", range(len(ex["ids"]))) for ex in batch], 0, side="right")
    parent, _ = data.pad_batch([ex.get("parent", [0] * len(ex["ids"])) for ex in batch], 0, side="right")
    blind, _ = data.pad_batch([ex.get("blind", [0] * len(ex["ids"])) for ex in batch], 0, side="right")
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # A gist caption token (blind > 0) sees its parent branch and only the first `blind` tokens of the prefix.
    prefix = (seg[:, None, :] == 0) & ((blind[:, :, None] == 0) | (torch.arange(T) < blind[:, :, None]))
    own = (seg[:, None, :] == seg[:, :, None]) | ((parent[:, :, None] > 0) & (seg[:, None, :] == parent[:, :, None]))
    return causal & (prefix | own), positions


def answer_weights(labels: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """(B, T) weights for the per-token answer loss that give every answer (a run of labelled tokens) the same total
    weight, 1 / the number of answers, however many tokens it has: a one-word answer counts as much as a caption.
    n: the number of answers to share the weight among, when `labels` is one part of a larger batch."""
    valid = labels != -100
    start = valid & ~F.pad(valid, (1, 0))[:, :-1]  # the first token of each answer
    span = torch.cumsum(start.flatten(), 0).view_as(labels) * valid  # 1..n on answer tokens, 0 elsewhere
    size = torch.bincount(span.flatten(), minlength=int(start.sum()) + 1).clamp(min=1)
    return valid * (1.0 / size[span]) / max(int(start.sum()) if n is None else n, 1)


def batch_loss(vlm: M.SmolVLM, batch: list[dict], pad_id: int, heads: dict[str, torch.nn.Linear] | None = None,
               chunks: int = 4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher-forced cross-entropy on the answer tokens, averaged over the answers, each answer's tokens averaged
    first (answer_weights): a one-word colour answer weighs as much as a caption (per token, a caption's many tokens
    drowned the one-word answers and one pair of shapes stayed at chance for colour). And, for each dense head
    ("motion": motion_targets, "shape": shape_targets), the cross-entropy of the class it reads off each object
    token's residual stream entering decoder layer MOTION_LAYER, averaged over that head's labelled tokens.

    The batch runs as `chunks` forward passes over examples of similar length (sorted), each padded only to its own
    longest, with logits at the answer positions only: the same losses (every average still over the whole batch)
    in less time than one pass padded to the longest."""
    labels = [torch.tensor(ex["labels"][1:]) for ex in batch]
    n_answers = sum(int((t != -100).sum() - ((t[1:] != -100) & (t[:-1] != -100)).sum()) for t in labels)
    n_dense = {name: sum(int((ex[name] != -100).sum()) for ex in batch) for name in heads or {}}
    order = sorted(range(len(batch)), key=lambda i: len(batch[i]["ids"]))
    answer_loss, dense = 0.0, {name: 0.0 for name in heads or {}}
    for k in range(chunks):
        sub = [batch[i] for i in order[len(order) * k // chunks:len(order) * (k + 1) // chunks]]
        if not sub:
            continue
        ids, mask = data.pad_batch([ex["ids"] for ex in sub], pad_id, side="right")
        targets, _ = data.pad_batch([ex["labels"][1:] + [-100] for ex in sub], -100, side="right")
        positions = None
        if any("branch" in ex for ex in sub):
            mask, positions = branch_mask(sub)
        scored = targets != -100  # the positions whose next token is an answer token
        out = vlm(ids, torch.cat([ex["pixels"] for ex in sub]), mask, output_hidden_states=bool(heads),
                  position_ids=positions, logits=scored)
        ce = F.cross_entropy(out.logits, targets[scored], reduction="none")
        answer_loss = answer_loss + (ce * answer_weights(targets, n_answers)[scored]).sum()
        if heads:
            tokens = out.hidden_states[MOTION_LAYER][ids == vlm.config.image_token_id]  # (frames * tokens, D), prompt order
            for name, head in heads.items():
                dense[name] = dense[name] + F.cross_entropy(
                    head(tokens), torch.cat([ex[name].flatten() for ex in sub]), reduction="sum") / n_dense[name]
    return answer_loss, dense


@torch.no_grad()
def answer(vlm: M.SmolVLM, proc: data.Processor, examples: list[dict], max_new_tokens=24, batch=32) -> list[str]:
    """Greedy answers with the video in context (left-padded batches)."""
    vlm.eval()
    texts = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        ids, mask = data.pad_batch([ex["head"] for ex in chunk], proc.pad_id, side="left")
        out = M.generate(vlm, ids, mask, torch.cat([ex["pixels"] for ex in chunk]),
                         max_new_tokens=max_new_tokens, eos_token_id=proc.eou_id)
        texts += [proc.decode(t).strip() for t in out]
    return texts


def accuracy(vlm, proc, examples) -> dict[str, float]:
    """Per question kind: first word for one-word answers, the whole sentence for captions (world.score)."""
    hits: dict[str, list[bool]] = {}
    for ex, text in zip(examples, answer(vlm, proc, examples)):
        hits.setdefault(ex["row"]["kind"], []).append(world.score(text, ex["row"]["target_text"]))
    acc = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    acc["overall"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return acc


# ------------------------------------------------------------------------------------------------ resuming
# RESUMED: the options that shape what the run computes; resuming with any of them changed would mix two runs.
RESUMED = ("train", "val", "vision_steps", "vision_batch", "vision_lr", "steps", "batch", "chunks", "lr",
           "motion_weight", "shape_weight", "seed")


def save_resume(out: Path, vlm: M.SmolVLM, heads: dict, state: dict, opt=None, sched=None):
    """OUT/resume/: everything a later run needs to continue exactly where this one is (after stage 1, and every
    --save-every stage-2 steps): the weights (model + dense heads), the optimizer and schedule, both random number
    generators and the wall-clock time used. Written to a temp folder and swapped in; OUT's final model replaces
    it all at the end."""
    final = out / "resume"
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        tensors = {**{f"vlm.{k}": v for k, v in vlm.state_dict().items()},
                   **{f"heads.{n}.{k}": v for n, h in heads.items() for k, v in h.state_dict().items()}}
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors")
        if opt is not None:
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "trainer.pt")
        torch.save({"torch_rng": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        umask_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_resume(out: Path, vlm: M.SmolVLM, heads: dict) -> dict:
    """Load OUT/resume/ into vlm and heads; returns its state (stage, step, rng, elapsed, ...)."""
    folder = out / "resume"
    try:
        state = json.loads((folder / "state.json").read_text())
        tensors = load_file(folder / "model.safetensors")
        vlm.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vlm.")}, strict=True)
        for n, h in heads.items():
            h.load_state_dict({k[len(n) + 7:]: v for k, v in tensors.items() if k.startswith(f"heads.{n}.")},
                              strict=True)
        torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True)["torch_rng"])
        if (folder / "trainer.pt").is_file():
            state["trainer"] = torch.load(folder / "trainer.pt", weights_only=True)
    except Exception as e:  # a corrupted or truncated file: say which, in one line
        fail(f"{folder} does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); delete it "
             f"to start over")
    return state


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng(rng: random.Random, saved: list):
    rng.setstate((saved[0], tuple(saved[1]), saved[2]))


def train(args) -> None:
    out = Path(args.out)
    resuming = (out / "resume" / "state.json").is_file()
    # The processor reads the tokenizer and frame geometry from a model folder: the untrained one, written and
    # read back at once (and gone before any training; OUT's final model replaces everything in OUT).
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = world.toy_tokenizer()
    config = toy_config(tokenizer.get_vocab_size(), tokenizer.token_to_id("<image>"))
    vlm = M.SmolVLM(config)
    init_weights(vlm)
    stage = out / "init.tmp"
    try:
        write_model_dir(stage, config, tokenizer, vlm.state_dict())
        proc = data.Processor(stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    train_rows = load_examples(args.train, proc, workers=args.threads)
    val_set = load_examples(args.val, proc, limit=args.val_clips, workers=args.threads)
    by_clip: dict[str, list[dict]] = {}
    for ex in train_rows:
        by_clip.setdefault(ex["row"]["video_path"], []).append(ex)
    train_set = list(by_clip.values())
    if args.batch > len(train_set):
        fail(f"--batch {args.batch} is more clips than {args.train} has ({len(train_set)}); lower --batch")
    if args.vision_steps and args.vision_batch > sum(len(qs[0]["indices"]) for qs in train_set):
        fail(f"--vision-batch {args.vision_batch} is more frames than the training clips have; lower it")
    # Dense objectives on the decoder's residual stream (heads thrown away after): name -> (targets, classes, weight).
    dense = {"motion": (motion_targets, len(world.DIRECTIONS), args.motion_weight),
             "shape": (shape_targets, len(world.SHAPES), args.shape_weight)}
    dense = {name: d for name, d in dense.items() if d[2]}
    grid = config.vision.image_size // config.vision.patch_size // config.scale_factor  # tokens per frame side
    for qs in train_set:
        spec = world.ClipSpec.from_dict(qs[0]["row"]["spec"])
        for name, (targets, _, _) in dense.items():
            t = targets(spec, qs[0]["indices"], grid)
            for ex in qs:
                ex[name] = t
        qs[0]["gist"] = gist_branch(proc, qs)
    heads = {name: torch.nn.Linear(config.text.hidden_size, n) for name, (_, n, _) in dense.items()}
    rng = random.Random(args.seed)
    print(f"{len(train_set)} training clips ({len(train_rows)} questions), {len(val_set)} validation questions; "
          f"{sum(p.numel() for p in vlm.parameters()) / 1e6:.2f}M parameters", file=sys.stderr)
    state = {"stage": 0, "step": 0, "elapsed": 0.0, "patch_acc": None, "args": {k: getattr(args, k) for k in RESUMED}}
    if resuming:
        state = load_resume(out, vlm, heads)
        _set_rng(rng, state["rng"])
        print(f"resumed {out / 'resume'}: stage {state['stage']} done" if state["stage"] == 1 else
              f"resumed {out / 'resume'} at stage-2 step {state['step']}", file=sys.stderr)
    start = time.time() - state["elapsed"]  # --minutes covers loading and both stages, over every resumed run
    with StopFlag("stopping after this step") as stop:
        if args.vision_steps and state["stage"] == 0:
            state["patch_acc"] = pretrain_vision(vlm, train_rows, val_set, args.vision_steps, args.vision_batch,
                                                 args.vision_lr, rng, stop)
            if stop.set:
                raise Stopped(stop.signum, "stage 1 is not saved part-way: a rerun with --resume starts it again")
            print(f"stage 1 ({(time.time() - start) / 60:.1f} min): held-out shape accuracy on object patches "
                  f"{state['patch_acc']:.3f}", file=sys.stderr)
            state.update(stage=1, rng=_rng_state(rng), elapsed=time.time() - start)
            save_resume(out, vlm, heads, state)
        step = stage_two(args, vlm, heads, dense, proc, train_set, rng, state, start, stop)
    minutes = (time.time() - start) / 60
    acc = accuracy(vlm, proc, val_set)
    print(f"trained in {minutes:.1f} min; held-out in-context accuracy: "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), file=sys.stderr)
    report = {"steps": step, "minutes": round(minutes, 2), "heldout_patch_shape_accuracy": state["patch_acc"],
              "heldout_in_context_accuracy": acc, "args": vars(args)}
    write_model_dir(out, config, tokenizer, vlm.state_dict(), report=report)  # replaces OUT/resume too
    print(f"wrote {args.out}", file=sys.stderr)


def stage_two(args, vlm, heads, dense, proc, train_set, rng, state, start, stop) -> int:
    """Stage 2 (the module docstring): connector + decoder on the questions, the tower frozen. Saves OUT/resume every
    --save-every steps and when a signal asks it to stop (then raises Stopped). Returns the steps done."""
    # The tower stays as stage 1 left it (the answer loss's early, noisy gradient would wipe out what it learned).
    vlm.model.vision_model.requires_grad_(not args.vision_steps)
    params = [p for p in vlm.parameters() if p.requires_grad] + [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    if "trainer" in state:
        opt.load_state_dict(state["trainer"]["optimizer"])
        sched.load_state_dict(state["trainer"]["scheduler"])
    out, step = Path(args.out), state["step"]
    bar = tqdm(range(step, args.steps), desc="toy base", unit="step", initial=step, total=args.steps)
    for step in range(step + 1, args.steps + 1):
        vlm.train()
        batch = [branches(qs, rng) for qs in rng.sample(train_set, args.batch)]
        loss, dense_losses = batch_loss(vlm, batch, proc.pad_id, heads, args.chunks)
        opt.zero_grad(set_to_none=True)
        (loss + sum(dense[name][2] * v for name, v in dense_losses.items())).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.1e}",
                        **{name: f"{v.item():.3f}" for name, v in dense_losses.items()})
        state.update(stage=1, step=step, rng=_rng_state(rng), elapsed=time.time() - start)
        if stop.set or step % args.save_every == 0:
            state.pop("trainer", None)
            save_resume(out, vlm, heads, state, opt, sched)
        if stop.set:
            bar.close()
            raise Stopped(stop.signum, f"{out / 'resume'} holds stage-2 step {step}; continue with --resume")
        if args.minutes and time.time() - start > args.minutes * 60:
            print(f"time budget of {args.minutes} min reached at step {step}", file=sys.stderr)
            break
    bar.close()
    return step


RECIPE = Path(__file__).resolve().parent / "recipes" / "base.toml"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(RECIPE), help="TOML file of the options below (default: the shipped "
                                                         "recipe); options given on the command line override it")
    p.add_argument("--train", default="data/toy/train/manifest.jsonl", help="training manifest (toy.world clips)")
    p.add_argument("--val", default="data/toy/heldout/manifest.jsonl", help="held-out manifest for the final score")
    p.add_argument("--val-clips", type=int, default=100, help="held-out clips scored at the end")
    p.add_argument("--out", default="runs/toy/base", help="model folder to write (the shipped one is only "
                                                          "replaced by toy/reproduce.sh, from a finished run)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (OUT/resume/)")
    p.add_argument("--save-every", type=int, default=200, help="stage 2: save OUT/resume every N steps")
    g = p.add_argument_group("recipe (defaults from --recipe)")
    g.add_argument("--vision-steps", type=int, help="stage 1: vision tower pretraining steps")
    g.add_argument("--vision-batch", type=int, help="stage 1: frames per step")
    g.add_argument("--vision-lr", type=float, help="stage 1: learning rate")
    g.add_argument("--steps", type=int, help="stage 2: steps (sets the cosine schedule)")
    g.add_argument("--batch", type=int, help="stage 2: clips per step, each with all of its questions")
    g.add_argument("--chunks", type=int, help="stage 2: forward passes per step, over clips of similar length")
    g.add_argument("--lr", type=float, help="stage 2: learning rate")
    g.add_argument("--minutes", type=float, help="stop stage 2 early at this wall-clock budget, counted from the "
                                                 "start (loading included, over resumed runs too; the final score "
                                                 "comes after); 0: none")
    g.add_argument("--motion-weight", type=float, help="stage 2: weight of the dense motion loss (0: off)")
    g.add_argument("--shape-weight", type=float, help="stage 2: weight of the dense shape loss (0: off)")
    g.add_argument("--seed", type=int, help="init, data order")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads; on a busy machine 1 avoids OpenMP threads waiting on each other")
    args = parse_with_recipe(p, argv)
    unset = [a.option_strings[0] for a in g._group_actions if getattr(args, a.dest) is None]
    if unset:
        fail(f"recipe {args.recipe} sets no {', '.join(unset)}")
    check_args(args)
    torch.set_num_threads(args.threads)
    out, fresh = Path(args.out), not Path(args.out).exists()
    try:
        train(args)
    finally:  # a run that failed before saving anything leaves no empty folder behind
        if fresh and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def check_args(args):
    """Refuse, before any work, numbers that would train nothing and a run folder that is not this run's."""
    for name in ("steps", "batch", "chunks", "vision_batch", "val_clips", "threads", "save_every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("vision_steps", "minutes", "motion_weight", "shape_weight"):
        if not getattr(args, name) >= 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("lr", "vision_lr"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            fail(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    for f in (args.train, args.val):
        if not Path(f).is_file():
            fail(f"{f} not found; write clips first with `python -m toy.world clips ...`")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder")
    if (out / "training.json").is_file():
        fail(f"{out} already holds a trained base; choose another --out (or delete it to train again)")
    saved = out / "resume" / "state.json"
    if saved.is_file() and not args.resume:
        fail(f"{out} holds an interrupted run; pass --resume to continue it, or choose another --out")
    if args.resume:
        if not saved.is_file():
            fail(f"nothing to resume in {out} (no resume/state.json)")
        try:
            before = json.loads(saved.read_text())["args"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{saved} does not read ({type(e).__name__}); delete {out / 'resume'} to start over")
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {before.get(k)})" for k in RESUMED
                   if before.get(k) != getattr(args, k)]
        if changed:
            fail(f"--resume continues the run as it was, and {', '.join(changed)} would change it")


if __name__ == "__main__":
    run_cli(main)
