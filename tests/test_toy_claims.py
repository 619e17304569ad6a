"""toy/captions.py, toy/sweep.py, toy/segments.py and their clips in toy/world.py (issue 28): the caption metric
against SQuAD's, clips past the training ranges, the shared-prefix in-context answers against the plain ones, and
one tiny run of each benchmark on the shipped toy checkpoints."""
import json

import pytest
import torch

import data
import model as M
from hypernet import load_hypernet
from toy import captions, fidelity, segments, sweep, world


# ------------------------------------------------------------------------------------------------ captions
def test_token_f1_is_squads():
    # SQuAD: lower case, punctuation and articles dropped, F1 of the bags of words (eval.py's metric).
    assert captions.token_f1("A red circle moves right.", "a red circle moves right") == 1.0
    assert captions.token_f1("A red circle moves left.", "A red circle moves right.") == pytest.approx(0.75)
    # order does not count: the objects listed the other way round are a perfect bag of words
    assert captions.token_f1("A blue square moves up and a red circle moves left.",
                             "A red circle moves left and a blue square moves up.") == 1.0
    # repeated words count once per occurrence (Counter intersection): 6 shared of 9 predicted, 9 wanted
    assert captions.token_f1("A red square moves up and a red square moves up.",
                             "A red square moves up and a yellow circle moves right.") == pytest.approx(2 / 3)
    assert captions.token_f1("", "") == 1.0 and captions.token_f1("", "red") == 0.0
    assert captions.token_f1("green", "red") == 0.0


def test_error_kind_names_what_is_wrong():
    want = "A red circle moves right and a blue square moves up."
    assert captions.error_kind(want, want) == "exact"
    assert captions.error_kind("A blue square moves up and a red circle moves right.", want) == "order"
    assert captions.error_kind("A red circle moves right and a blue square moves down.", want) == "direction"
    assert captions.error_kind("A red circle moves right and a red circle moves right.", want) == "color+shape+direction"
    assert captions.error_kind("A red circle moves right.", want) == "objects"
    assert captions.error_kind("red", want) == "garbled"


def test_upweight_repeats_rows_of_a_kind_with_new_ids(tmp_path):
    one, two = {"objects": [{}]}, {"objects": [{}, {}]}
    rows = [{"id": "a", "kind": "color", "spec": two}, {"id": "b", "kind": "caption", "spec": two},
            {"id": "c", "kind": "count", "spec": one}, {"id": "d", "kind": "caption", "spec": one}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert captions.upweight(tmp_path / "in.jsonl", tmp_path / "out.jsonl", 3) == (4, 8)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == ["a", "b", "b#2", "b#3", "c", "d", "d#2", "d#3"]
    assert all(r["kind"] == "caption" for r in out[1:4])
    assert captions.upweight(tmp_path / "in.jsonl", tmp_path / "two.jsonl", 2, objects=2) == (4, 5)
    assert [json.loads(x)["id"] for x in (tmp_path / "two.jsonl").read_text().splitlines()] == ["a", "b", "b#2",
                                                                                                "c", "d"]


# ------------------------------------------------------------------------------------------------ clips
def test_rescaled_and_retimed_clips_keep_the_motion():
    spec = world.clip_spec("heldout", 3)
    big = world.rescaled(spec, 1024)
    assert max(big.width, big.height) == 1024 and big.width % 2 == big.height % 2 == 0
    assert abs(big.width / big.height - spec.width / spec.height) < 0.01
    s = 1024 / max(spec.width, spec.height)
    for k, o in enumerate(big.objects):
        x0, y0 = spec.position(k, spec.n_frames - 1)
        x1, y1 = big.position(k, big.n_frames - 1)
        assert abs(x1 - x0 * s) < 1 and abs(y1 - y0 * s) < 1 and o.direction == spec.objects[k].direction
    fast = world.retimed(spec, 128)
    assert fast.duration == pytest.approx(spec.duration, abs=1 / 128) and fast.n_frames > spec.n_frames
    assert fast.position(0, fast.n_frames - 1) == spec.position(0, spec.n_frames - 1)   # the same trip
    assert world.questions(fast) == world.questions(spec) == world.questions(big)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_n_part_clips_show_one_object_per_part_and_ask_only_unambiguous_questions(n):
    spec = world.sample_parts(world.SPLITS["heldout"] + 7, n)
    assert spec == world.sample_parts(world.SPLITS["heldout"] + 7, n)          # deterministic
    assert len(spec.objects) == n and spec.n_frames % n == 0 and 2 <= spec.duration / n <= 4.3
    shown = [i for k in range(n) for i in spec.visible(k)]
    assert shown == list(range(spec.n_frames))                                   # the parts tile the clip
    distinct = list(dict.fromkeys(spec.objects))
    assert len(distinct) == min(n, 4) and len({o.color for o in distinct}) == len(distinct)
    frame = world.render_frame(spec, spec.visible(n - 1)[0])
    assert len({tuple(p) for p in frame.reshape(-1, 3)} - {(0, 0, 0)}) == 1       # one object on screen
    qs = world.parts_questions(spec)
    assert {k for k, *_ in qs} <= {"color", "shape", "direction"} and len(qs) >= len(distinct)
    for kind, prompt, answer, parts in qs:
        named = [o for o in distinct if {o.color, o.shape} & set(prompt.rstrip("?").split())]
        assert len(named) == 1                                                   # the prompt names one object
        o = named[0]
        assert answer == {"color": o.color, "shape": o.shape, "direction": o.direction}[kind]
        assert parts == [k for k in range(n) if spec.objects[k] == o]


# ------------------------------------------------------------------------------------------------ conditions
@pytest.fixture(scope="module")
def shipped():
    vlm = M.load_model(M.TINY_DIR)
    return vlm, data.Processor(M.TINY_DIR), load_hypernet(M.TINY_DIR.parent / "hypernet", vlm.config).eval()


def test_clip_of_is_clip_from_frames_and_segments_partition_the_frames(shipped):
    _, proc, _ = shipped
    spec = world.clip_spec("heldout", 3)
    p = sweep.sampler(proc, 16, spec.duration)
    for span in ((None, None), (1.0, 2.5)):
        a, b = sweep.clip_of(p, spec, *span), p.clip_from_frames(world.render_frames(spec), spec.fps, *span)
        assert a.indices == b.indices and a.total_frames == b.total_frames
        assert all(torch.equal(x, y) for x, y in zip(a.frames, b.frames))
    clip = sweep.clip_of(p, spec)
    assert len(clip.frames) == 16
    runs = sweep.segments_of(clip, 4, strided=False)
    assert [len(s.frames) for s in runs] == [4] * 4 and sum(s.total_frames for s in runs) == clip.total_frames
    assert all(s.indices[0] == 0 for s in runs)                                 # each a clip of its own span
    every = sweep.segments_of(clip, 4, strided=True)
    assert [s.indices for s in every] == [clip.indices[g::4] for g in range(4)]
    assert all(s.total_frames == clip.total_frames for s in every)


def test_in_context_with_a_shared_prefix_answers_as_the_plain_batch_does(shipped):
    vlm, proc, _ = shipped
    spec = world.clip_spec("heldout", 3)
    p = sweep.sampler(proc, 8, spec.duration)
    clip = sweep.clip_of(p, spec)
    qs = [q for _, q, _ in world.questions(spec)]
    got, tokens = sweep.in_context(vlm, p, clip, qs)
    assert got == fidelity.answers(vlm, p, [(q, clip, None) for q in qs], 128.0)
    assert tokens == max(p.question_inputs(q, video=clip)[0].shape[1] for q in qs)


def test_compose_weights_scale_each_segments_update(shipped):
    vlm, proc, hyper = shipped
    spec = world.clip_spec("heldout", 3)
    p = sweep.sampler(proc, 8, spec.duration)
    parts = sweep.adapters(vlm, hyper, proc, sweep.segments_of(sweep.clip_of(p, spec), 2, strided=False))
    facts = fidelity.base_facts(vlm)
    plain, half = sweep.compose(parts, hyper, facts), sweep.compose(parts, hyper, facts, [0.5, 0.5])
    assert plain["down_proj"][0].shape[1] == 3 * hyper.config.rank                # 2 segments + the static part once
    dw = lambda ab: ab[1][0].T @ ab[0][0]  # noqa: E731
    r = hyper.config.rank
    static = parts[0]["down_proj"][1][0, r:].T @ parts[0]["down_proj"][0][0, r:]
    assert torch.allclose(dw(half["down_proj"]) - static, (dw(plain["down_proj"]) - static) / 2, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the benchmarks
def test_frames_sweep_runs_and_reports_every_condition(tmp_path, capsys):
    sweep.main(["frames", "--frames", "4", "16", "--clips", "2", "--out", str(tmp_path), "--plot",
                str(tmp_path / "f.png")])
    out = json.loads((tmp_path / "frames.json").read_text())
    assert set(out["points"]) == {"4", "16"} and (tmp_path / "f.png").stat().st_size > 0
    p16 = out["points"]["16"]
    assert p16["segments"] == 2 and p16["tokens"] > out["points"]["4"]["tokens"]
    conds = {"in context", "adapter", "composed segments", "composed 1/n", "strided 1/n"}
    assert set(p16["summary"]) == conds
    for s in p16["summary"].values():
        assert 0 <= s["qa"] <= 1 and 0 <= s["caption_exact"] <= s["caption_f1"] <= 1
    assert "| frames | prompt tokens | segments |" in capsys.readouterr().out


def test_sizes_sweep_and_segments_run(tmp_path):
    sweep.main(["sizes", "--sizes", "64", "512", "--clips", "2", "--out", str(tmp_path), "--plot",
                str(tmp_path / "s.png")])
    out = json.loads((tmp_path / "sizes.json").read_text())
    assert set(out["points"]["512"]["summary"]) == {"in context", "adapter"}
    segments.main(["--parts", "3", "--clips", "2", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "segments.json").read_text())["points"]["3"]
    assert res["questions"] == 18                                               # 3 distinct objects x 3 kinds x 2
    assert set(res) - {"questions"} == {"in context", "whole-clip adapter", "composed", "composed 1/n",
                                        "composed 1/sqrt(n)", "own part's adapter"}
    assert all(0 <= v["all"] <= 1 for k, v in res.items() if k != "questions")
