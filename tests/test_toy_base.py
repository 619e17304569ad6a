"""toy/base.py: the stage-1 patch targets and the two-stage training of the toy base VLM, at toy scale."""
from __future__ import annotations

import json
import random
import tomllib

import pytest
import torch
from safetensors.torch import load_file

import data
import model as M
from toy import base as toy_base
from toy import world
from conftest import toy_random_base


def _obj(color="red", shape="square", size=16, x=0.0, y=0.0, direction="right"):
    return world.ObjectSpec(color, world.COLORS[color], shape, size, x, y, direction, 0.25)


def _grid(labels, channel):
    return labels[:, channel].view(8, 8).tolist()


def test_patch_targets_mark_the_patches_an_object_covers():
    # A 16 px square at (16, 8) of a 64 x 64 frame covers patches rows 1-2, columns 2-3 exactly.
    spec = world.ClipSpec(64, 64, 4, 8, (_obj("green", "square", 16, 16.0, 8.0),))
    labels = toy_base.patch_targets(spec, 0, 8)
    covered = {(r, c) for r in range(8) for c in range(8) if _grid(labels, 0)[r][c]}
    assert covered == {(1, 2), (1, 3), (2, 2), (2, 3)}
    assert {labels[r * 8 + c, 0].item() for r, c in covered} == {1 + list(world.COLORS).index("green")}
    assert {labels[r * 8 + c, 1].item() for r, c in covered} == {1 + world.SHAPES.index("square")}
    # It moves right by 0.25 * 64 = 16 px over the clip: two patch columns at the last frame.
    last = toy_base.patch_targets(spec, 7, 8)
    assert {(r, c) for r in range(8) for c in range(8) if _grid(last, 1)[r][c]} == {(1, 4), (1, 5), (2, 4), (2, 5)}


def test_patch_targets_follow_the_squash_to_a_square():
    # A 128 x 64 frame is squashed to 64 x 64: a 16 px square at x = 32 covers patch columns 2 only (16 frame px
    # are 8 encoder px) and rows 0-1 (16 frame px are 16 encoder px).
    spec = world.ClipSpec(128, 64, 4, 8, (_obj("blue", "square", 16, 32.0, 0.0),))
    labels = toy_base.patch_targets(spec, 0, 8)
    assert {(r, c) for r in range(8) for c in range(8) if _grid(labels, 1)[r][c]} == {(0, 2), (1, 2)}


def test_patch_targets_occlusion_thresholds_and_two_part_visibility():
    a, b = _obj("red", "square", 16, 0.0, 0.0), _obj("yellow", "circle", 16, 0.0, 0.0)
    on_top = toy_base.patch_targets(world.ClipSpec(64, 64, 4, 8, (a, b)), 0, 8)
    assert on_top[0, 1].item() == 1 + world.SHAPES.index("circle")  # painted later, wins where both are drawn
    # At (7.5, 4.5) the square covers 3 of patch 0's 64 pixels (under a tenth) and 24 of patch 1's.
    sliver = toy_base.patch_targets(world.ClipSpec(64, 64, 4, 8, (_obj("red", "square", 16, 7.5, 4.5),)), 0, 8)
    assert sliver[0, 1].item() == 0 and sliver[1, 1].item() == 1 + world.SHAPES.index("square")
    two_part = world.ClipSpec(64, 64, 4, 8, (_obj("red", "square", 16, 0.0, 0.0), _obj("blue", "triangle", 16, 32.0, 32.0)),
                          two_part=True)
    first, second = toy_base.patch_targets(two_part, 0, 8), toy_base.patch_targets(two_part, 7, 8)
    assert set(first[:, 1].tolist()) == {0, 1 + world.SHAPES.index("square")}
    assert set(second[:, 1].tolist()) == {0, 1 + world.SHAPES.index("triangle")}


def _cells(row, grid=4):
    return {(j // grid, j % grid): v for j, v in enumerate(row.tolist()) if v != -100}


def test_motion_targets_label_an_objects_tokens_once_its_motion_is_on_screen():
    # A 16 px square at (16, 16) moving right by 16 px over 8 frames; 16 px token cells (8 px patches, shuffle 2).
    spec = world.ClipSpec(64, 64, 4, 8, (_obj("green", "square", 16, 16.0, 16.0, "right"),))
    right = list(world.DIRECTIONS).index("right")
    motion = toy_base.motion_targets(spec, [0, 3, 7], 4)
    assert motion.shape == (3, 16)
    assert _cells(motion[0]) == {}  # the first frame shows no motion yet
    assert _cells(motion[1]) == {(1, 1): right, (1, 2): right}  # x = 22.9: over cells 1 (57 %) and 2 (43 %)
    assert _cells(motion[2]) == {(1, 2): right}  # x = 32: cell 2 exactly


def test_motion_targets_start_each_part_of_a_two_part_clip_at_its_own_first_frame():
    a, b = _obj("red", "square", 16, 0.0, 0.0, "down"), _obj("blue", "circle", 16, 32.0, 32.0, "left")
    spec = world.ClipSpec(64, 64, 4, 8, (a, b), two_part=True)  # a in frames 0-3, b in frames 4-7
    motion = toy_base.motion_targets(spec, [0, 2, 4, 6], 4)
    down, left = list(world.DIRECTIONS).index("down"), list(world.DIRECTIONS).index("left")
    assert _cells(motion[0]) == {} and _cells(motion[2]) == {}  # each object's first sampled frame
    assert set(_cells(motion[1]).values()) == {down}
    assert set(_cells(motion[3]).values()) == {left}


def test_shape_targets_label_every_token_an_object_covers_with_its_shape():
    a, b = _obj("red", "triangle", 16, 0.0, 0.0, "right"), _obj("blue", "circle", 16, 48.0, 48.0, "left")
    spec = world.ClipSpec(64, 64, 4, 8, (a, b))
    shape = toy_base.shape_targets(spec, [0, 7], 4)
    tri, circ = world.SHAPES.index("triangle"), world.SHAPES.index("circle")
    assert shape.shape == (2, 16)
    owners = toy_base.patch_owners(spec, 0, 4)
    assert _cells(shape[0]) == {(j // 4, j % 4): [tri, circ][k] for j, k in enumerate(owners.tolist()) if k >= 0}
    assert set(_cells(shape[0]).values()) == {tri, circ} and (0, 0) in _cells(shape[0])  # from the first frame on


def test_the_dense_losses_read_the_residual_stream_after_motion_layer_layers(tmp_path):
    # Their gradient reaches the image features and the layers before the tap, and none after it.
    vlm, config, tok = toy_random_base()
    image = config.image_token_id
    ids = [tok.token_to_id("<|im_start|>")] + [image] * 32 + tok.encode(" What").ids
    ex = {"ids": ids, "labels": [-100] * len(ids), "pixels": torch.randn(2, 3, 64, 64),
          "motion": torch.randint(0, 4, (2, 16)), "shape": torch.randint(0, 3, (2, 16)).masked_fill_(
              torch.arange(16) % 3 == 0, -100)}
    heads = {"motion": torch.nn.Linear(config.text.hidden_size, 4), "shape": torch.nn.Linear(config.text.hidden_size, 3)}
    answer, dense = toy_base.batch_loss(vlm, [ex, ex], tok.token_to_id("<|im_end|>"), heads)
    assert set(dense) == {"motion", "shape"} and all(torch.isfinite(v) and v.item() > 0 for v in dense.values())
    # Each head's loss is the CE of its own classes on its labelled tokens (background -100 ignored).
    with torch.no_grad():
        h = vlm(torch.tensor([ex["ids"]] * 2), torch.cat([ex["pixels"]] * 2), output_hidden_states=True).hidden_states[2]
        tokens = h[torch.tensor([ex["ids"]] * 2) == image]
        want = torch.nn.functional.cross_entropy(heads["shape"](tokens), torch.cat([ex["shape"].flatten()] * 2))
    assert dense["shape"].item() == pytest.approx(want.item(), rel=1e-5)
    dense["motion"].backward()
    layers = vlm.model.text_model.layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[1].parameters())
    assert all(p.grad is None for p in (*layers[2].parameters(), *layers[3].parameters()))
    assert vlm.model.connector.modality_projection.proj.weight.grad.abs().sum() > 0
    assert toy_base.batch_loss(vlm, [ex], 0)[1] == {}  # no heads: no dense losses


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return (world.write_split("train", 6, root / "train", progress=False),
            world.write_split("heldout", 2, root / "heldout", progress=False))


def test_load_examples_decodes_in_parallel_to_the_same_examples(clips, tmp_path):
    tok = world.toy_tokenizer()
    config = toy_base.toy_config(tok.get_vocab_size(), tok.token_to_id("<image>"))
    toy_base.write_model_dir(tmp_path / "m", config, tok, M.SmolVLM(config).state_dict())
    proc = data.Processor(tmp_path / "m")
    one, two = (toy_base.load_examples(clips[0], proc, workers=w) for w in (1, 2))
    assert len(one) == len(two) == sum(1 for _ in open(clips[0]))
    for a, b in zip(one, two):
        assert a["head"] == b["head"] and a["tail"] == b["tail"] and a["indices"] == b["indices"]
        assert torch.equal(a["pixels"], b["pixels"])
    assert {ex["row"]["clip_id"] for ex in toy_base.load_examples(clips[0], proc, limit=2)} == \
        {"train_00000", "train_00001"}
    clip = [ex for ex in one if ex["row"]["clip_id"] == "train_00000"]
    assert all(ex["pixels"] is clip[0]["pixels"] for ex in clip)  # one tensor per clip, shared by its questions


def test_branched_questions_train_the_plain_mean_of_each_answer_asked_alone(clips, tmp_path):
    """Two clips' questions, each clip's as branches after its one video prefix, give the loss of all of their
    questions asked one at a time, as at inference: the plain mean over the questions of each answer's own mean token
    loss, so a one-word answer weighs what the caption does."""
    vlm, _, _ = toy_random_base(tmp_path / "m")
    proc = data.Processor(tmp_path / "m")
    examples = toy_base.load_examples(clips[0], proc, limit=2)
    by_clip = [[ex for ex in examples if ex["row"]["clip_id"] == c] for c in ("train_00000", "train_00001")]
    branched = [toy_base.branches(qs, random.Random(0)) for qs in by_clip]
    assert all(len(qs) > 2 for qs in by_clip) and len(branched[0]["ids"]) != len(branched[1]["ids"])  # padded
    assert [sum(1 for x in b["labels"] if x != -100) for b in branched] == \
        [sum(len(ex["tail"]) for ex in qs) for qs in by_clip]
    alone = [{"ids": ex["head"] + ex["tail"], "labels": [-100] * len(ex["head"]) + ex["tail"], "pixels": ex["pixels"]}
             for qs in by_clip for ex in qs]
    assert len({len(ex["tail"]) for qs in by_clip for ex in qs}) > 1  # answers of different lengths
    with torch.no_grad():
        got, _ = toy_base.batch_loss(vlm, branched, proc.pad_id)
        each = [toy_base.batch_loss(vlm, [a], proc.pad_id)[0].item() for a in alone]
        batched, _ = toy_base.batch_loss(vlm, alone, proc.pad_id)
    assert got.item() == pytest.approx(sum(each) / len(each), rel=1e-5)
    assert batched.item() == pytest.approx(got.item(), rel=1e-5)
    labels = torch.tensor([[-100, 5, 6, -100, 7], [8, -100, -100, 9, 9]])
    assert toy_base.answer_weights(labels, n=8).tolist()[0] == [0, 1 / 16, 1 / 16, 0, 1 / 8]  # one part of 8 answers
    assert toy_base.answer_weights(labels).tolist() == [[0, 1 / 8, 1 / 8, 0, 1 / 4], [1 / 4, 0, 0, 1 / 8, 1 / 8]]


def test_a_batch_in_length_sorted_chunks_has_the_same_losses(clips, tmp_path):
    """--chunks: the step's batch runs as forward passes over clips of similar length, each padded to its own
    longest; every loss (per answer, per token, each dense head) and its gradient equal the one-pass batch's."""
    vlm, config, _ = toy_random_base(tmp_path / "m")
    proc = data.Processor(tmp_path / "m")
    examples = toy_base.load_examples(clips[0], proc, limit=3)
    by_clip = {}
    for ex in examples:
        by_clip.setdefault(ex["row"]["clip_id"], []).append(ex)
    grid = config.vision.image_size // config.vision.patch_size // config.scale_factor
    for qs in by_clip.values():
        spec = world.ClipSpec.from_dict(qs[0]["row"]["spec"])
        for ex in qs:
            ex["motion"] = toy_base.motion_targets(spec, qs[0]["indices"], grid)
            ex["shape"] = toy_base.shape_targets(spec, qs[0]["indices"], grid)
    batch = [toy_base.branches(qs, random.Random(i)) for i, qs in enumerate(by_clip.values())]
    assert len({len(ex["ids"]) for ex in batch}) == 3  # different lengths: the chunks pad differently
    heads = {"motion": torch.nn.Linear(config.text.hidden_size, len(world.DIRECTIONS)),
             "shape": torch.nn.Linear(config.text.hidden_size, len(world.SHAPES))}
    results = []
    for chunks in (1, 2, 3):
        vlm.zero_grad()
        answer, dense = toy_base.batch_loss(vlm, batch, proc.pad_id, heads, chunks=chunks)
        (answer + sum(dense.values())).backward()
        results.append((answer.item(), {k: v.item() for k, v in dense.items()},
                        vlm.model.text_model.layers[0].mlp.down_proj.weight.grad.clone()))
    for answer, dense, grad in results[1:]:
        assert answer == pytest.approx(results[0][0], rel=1e-5)
        assert dense == pytest.approx(results[0][1], rel=1e-5)
        torch.testing.assert_close(grad, results[0][2], atol=1e-6, rtol=1e-4)


def _train(clips, out, steps, *extra):
    threads = torch.get_num_threads()  # --threads sets the process-wide count: give the rest of the suite its own back
    try:
        _main(clips, out, steps, *extra)
    finally:
        torch.set_num_threads(threads)
    return load_file(out / "model.safetensors")


def _main(clips, out, steps, *extra):
    toy_base.main(["--train", str(clips[0]), "--val", str(clips[1]), "--out", str(out), "--steps", str(steps),
                   "--batch", "2", "--vision-steps", "3", "--vision-batch", "4", "--val-clips", "2",
                   "--minutes", "0", "--threads", "1", "--save-every", "1", *extra])


def test_two_stage_training_writes_a_loadable_model_and_stage_2_leaves_the_tower_alone(clips, tmp_path):
    one, three = _train(clips, tmp_path / "one", 1), _train(clips, tmp_path / "three", 3)
    vision = [k for k in one if ".vision_model." in k]
    text = [k for k in one if ".text_model." in k or ".connector." in k]
    assert vision and text
    assert all((one[k] == three[k]).all() for k in vision)       # same stage 1, then frozen
    assert any((one[k] != three[k]).any() for k in text)          # stage 2 trained the rest
    assert M.load_model(tmp_path / "three").config.image_seq_len == 16  # default pixel shuffle 2: 16 tokens
    report = json.loads((tmp_path / "three" / "training.json").read_text())
    assert report["steps"] == 3 and 0.0 <= report["heldout_patch_shape_accuracy"] <= 1.0
    assert set(report["heldout_in_context_accuracy"]) >= {"color", "shape", "count", "overall"}


def test_defaults_come_from_the_shipped_recipe_and_a_bad_recipe_is_a_one_line_error(clips, tmp_path):
    threads = torch.get_num_threads()
    try:
        toy_base.main(["--train", str(clips[0]), "--val", str(clips[1]), "--out", str(tmp_path / "m"), "--steps",
                       "2", "--batch", "2", "--vision-steps", "2", "--vision-batch", "4", "--val-clips", "2",
                       "--minutes", "0", "--threads", "1"])
        assert M.load_model(tmp_path / "m").config.text.num_hidden_layers == 4
        args = json.loads((tmp_path / "m" / "training.json").read_text())["args"]
        recipe = tomllib.loads(toy_base.RECIPE.read_text())
        assert args["motion_weight"] == recipe["motion_weight"] == 1.0 and args["lr"] == recipe["lr"]
        assert args["steps"] == 2 and recipe["steps"] == 2400  # the command line overrides the recipe
        for text, match in (("lr = 'fast'\n", "lr = 'fast' is not a valid --lr"), ("chat = 'packed'\n", "unknown option"),
                            ("steps = \n", "recipe"), ("seed = 0\n", "sets no --vision-steps")):
            (tmp_path / "bad.toml").write_text(text)
            with pytest.raises(SystemExit) as e:
                toy_base.main(["--train", str(clips[0]), "--val", str(clips[1]), "--out", str(tmp_path / "x"),
                               "--recipe", str(tmp_path / "bad.toml")])
            assert str(e.value).startswith("error: ") and match in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "x").exists()
    finally:
        torch.set_num_threads(threads)


def test_gist_branch_is_the_internalization_prompt_and_its_caption_sees_no_video(clips, tmp_path):
    """The gist is one more branch per clip: the instruction exactly as internalize.py renders it after the video (the
    positions the hypernetwork reads), then "Assistant:" and the caption, whose tokens see the instruction and the
    text a text-only prompt also starts with, never the video; the question branches compute what they did without
    it."""
    vlm, _, _ = toy_random_base(tmp_path / "m")
    proc = data.Processor(tmp_path / "m")
    qs = [ex for ex in toy_base.load_examples(clips[0], proc, limit=1)]
    plain = toy_base.branches(qs, random.Random(0))
    qs[0]["gist"] = toy_base.gist_branch(proc, qs)
    gist = toy_base.branches(qs, random.Random(0))
    context = proc.internalization_inputs(qs[0]["row"]["video_path"])[0][0].tolist()
    seg, n = torch.tensor(gist["branch"]), len(plain["ids"])
    instr, caption = (seg == len(qs) + 1).nonzero().flatten(), (seg == len(qs) + 2).nonzero().flatten()
    P = int((seg == 0).sum())
    assert gist["ids"][:n] == plain["ids"] and gist["labels"][:n] == plain["labels"]
    assert gist["ids"][:P] + [gist["ids"][i] for i in instr] == context          # what the hypernetwork reads
    assert [gist["positions"][i] for i in instr] == list(range(P, len(context)))
    caption_row = next(ex for ex in qs if ex["row"]["kind"] == "caption")
    assert [gist["labels"][i] for i in caption if gist["labels"][i] != -100] == caption_row["tail"]
    mask, _ = toy_base.branch_mask([gist])
    sight = qs[0]["gist"]["sight"]
    assert proc.decode(context[:sight]).strip() == "User:" and context[:sight] == proc.question_inputs("x")[0][0][:sight].tolist()
    for j, i in enumerate(caption.tolist()):
        assert mask[0, i].nonzero().flatten().tolist() == list(range(sight)) + instr.tolist() + caption[:j + 1].tolist()
    assert (mask[0, instr[-1]].nonzero().flatten() == torch.arange(instr[-1] + 1)[(seg[:instr[-1] + 1] == 0) |
                                                                                   (seg[:instr[-1] + 1] == seg[instr[-1]])]).all()
    pixels = torch.cat([qs[0]["pixels"]])
    with torch.no_grad():
        a = vlm(torch.tensor([plain["ids"]]), pixels, toy_base.branch_mask([plain])[0],
                position_ids=torch.tensor([plain["positions"]])).logits
        b = vlm(torch.tensor([gist["ids"]]), pixels, mask, position_ids=torch.tensor([gist["positions"]])).logits
    assert torch.allclose(a[0], b[0, :n], atol=1e-5)


def test_the_toy_base_resumes_exactly_after_sigterm_and_refuses_what_would_train_nothing(clips, tmp_path, monkeypatch):
    """A signal in stage 2 saves OUT/resume at the end of the step and exits 143; --resume continues to the very
    weights of an uninterrupted run. A batch larger than the clips, a rerun over an interrupted run without
    --resume, and --resume with other recipe flags are one-line errors that leave every file as it was."""
    import hashlib, os, signal
    full = _train(clips, tmp_path / "full", 4)
    calls, real = [], toy_base.batch_loss

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # during stage-2 step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(toy_base, "batch_loss", signalled)
    with pytest.raises(toy_base.Stopped) as e:  # as a script, adapter.run_cli exits 128 + signal on it
        _train(clips, tmp_path / "cut", 4)
    assert e.value.signum == signal.SIGTERM
    assert json.loads((tmp_path / "cut" / "resume" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(toy_base, "batch_loss", real)
    snapshot = lambda: {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    before = snapshot()
    for extra, match in ((["--batch", "99"], "more clips"), ([], "pass --resume"), (["--resume", "--lr", "0.1"], "--lr"),
                         (["--steps", "0"], "--steps must be at least 1")):
        with pytest.raises(SystemExit) as e:
            _main(clips, tmp_path / ("cut" if "more clips" not in match else "new"), 4, *extra)
        assert str(e.value).startswith("error: ") and match in str(e.value) and "\n" not in str(e.value), e.value
    assert snapshot() == before and not (tmp_path / "new").exists()
    cut = _train(clips, tmp_path / "cut", 4, "--resume")
    assert set(cut) == set(full) and all(torch.equal(cut[k], full[k]) for k in full)
    assert not (tmp_path / "cut" / "resume").exists() and not list(tmp_path.glob("**/*.tmp"))


def test_reproduce_sh_never_ships_an_interrupted_run_and_keys_the_hypernetwork_by_its_base(tmp_path):
    """toy/reproduce.sh with every command faked (a `python` on PATH that writes what the real one would, or is
    stopped at one stage): a stage that exits 143 stops the script before checkpoints/tiny is touched; a full run
    ships base and hypernetwork together; a rebuilt base gets its own teacher targets and hypernetwork folder."""
    import os, shutil, subprocess
    from pathlib import Path
    repo = tmp_path / "repo"
    (repo / "toy").mkdir(parents=True)
    shutil.copy(Path(toy_base.__file__).parent / "reproduce.sh", repo / "toy" / "reproduce.sh")
    for part in ("base", "hypernet"):
        (repo / "checkpoints" / "tiny" / part).mkdir(parents=True)
        (repo / "checkpoints" / "tiny" / part / "shipped.txt").write_text("the shipped pair\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(r'''#!/usr/bin/env bash
# A stand-in for each stage: writes what it would write; $STOP names a stage that is stopped by SIGTERM.
echo "$*" >> calls.log
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
case "$*" in
  *toy.base*) stage=base ;; *"train.py teacher"*) stage=teacher ;; *train.py*) stage=hypernet ;; *) stage=other ;;
esac
if [ "$stage" = base ]; then mkdir -p "$out"; echo "$BASE" > "$out/model.safetensors"; echo '{}' > "$out/config.json"; fi
if [ "$stage" = teacher ]; then mkdir -p "$(dirname "$out")"; echo rows > "$out"; fi
if [ "$stage" = hypernet ]; then mkdir -p "$out/best" "$out/latest"; echo w > "$out/best/hypernet.safetensors"; echo '{}' > "$out/best/hypernet.json"; fi
[ "$stage" = "$STOP" ] && exit 143
[ "$stage" = base ] && echo '{}' > "$out/training.json"
exit 0
''')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BASE": "one"}
    shipped = lambda: {str(p.relative_to(repo)): p.read_text() for p in (repo / "checkpoints").rglob("*") if p.is_file()}
    before = shipped()
    for stop in ("base", "teacher", "hypernet"):
        r = subprocess.run(["bash", "toy/reproduce.sh"], cwd=repo, env={**env, "STOP": stop}, capture_output=True)
        assert r.returncode == 143 and shipped() == before, (stop, r.stderr)
    r = subprocess.run(["bash", "toy/reproduce.sh"], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert shipped() == {"checkpoints/tiny/base/model.safetensors": "one\n", "checkpoints/tiny/base/config.json": "{}\n",
                         "checkpoints/tiny/base/training.json": "{}\n", "checkpoints/tiny/hypernet/hypernet.json": "{}\n",
                         "checkpoints/tiny/hypernet/hypernet.safetensors": "w\n"}
    first = sorted(p.name for p in (repo / "runs" / "toy").glob("base-*"))
    shutil.rmtree(repo / "runs" / "toy" / "base")  # a new base: its teacher and hypernetwork are made anew
    r = subprocess.run(["bash", "toy/reproduce.sh"], cwd=repo, env={**env, "BASE": "two"}, capture_output=True)
    keyed = sorted(p.name for p in (repo / "runs" / "toy").glob("base-*"))
    assert r.returncode == 0 and len(first) == 1 and len(keyed) == 2 and first[0] in keyed
    assert not list((repo / "checkpoints").glob("*.tmp"))
