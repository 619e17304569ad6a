"""world.py: the clips, questions and tokenizer of the toy world against toyworld.md's tables."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from toy import world

N_SPECS = 1500  # sampling is pure Python and cheap: check the ranges over many clips


def _one(color="red", rgb=(220, 40, 40), shape="square", size=10, x=5.0, y=6.0, direction="right", travel=0.5):
    return world.ObjectSpec(color, rgb, shape, size, x, y, direction, travel)


def _clip(*objects, w=40, h=32, fps=4, n_frames=8, two_part=False):
    return world.ClipSpec(w, h, fps, n_frames, tuple(objects), two_part)


@pytest.fixture(scope="module")
def specs():
    return [world.sample_clip(seed) for seed in range(N_SPECS)]


# ---------------------------------------------------------------- sampling


def test_sample_clip_is_deterministic_per_seed():
    a, b = world.sample_clip(123), world.sample_clip(123)
    assert a == b and a.seed == 123
    assert world.sample_clip(124) != a
    np.testing.assert_array_equal(world.render_frames(a), world.render_frames(b))
    assert world.ClipSpec.from_dict(json.loads(json.dumps(a.to_dict()))) == a  # survives the manifest's JSON


def test_forcing_the_kind_of_clip(specs):
    for seed in range(50):
        assert world.sample_clip(seed, two_part=True).two_part
        assert len(world.sample_clip(seed, two_part=False, n_objects=1).objects) == 1
        assert len(world.sample_clip(seed, two_part=False, n_objects=2).objects) == 2


def test_frame_time_and_kind_ranges(specs):
    for s in specs:
        assert 32 <= s.width <= 256 and 32 <= s.height <= 256
        assert s.width % 2 == 0 and s.height % 2 == 0  # yuv420p needs even sides
        assert max(s.width, s.height) <= 2 * min(s.width, s.height)
        assert 4 <= s.fps <= 30 and 2.0 <= s.duration <= 8.0
        assert len(s.objects) == 2 if s.two_part else len(s.objects) in (1, 2)
    # The draws reach the corners of the ranges and mix the kinds of clip.
    ws, hs, fps = [s.width for s in specs], [s.height for s in specs], [s.fps for s in specs]
    assert min(ws) <= 40 and max(ws) >= 248 and min(hs) <= 40 and max(hs) >= 248
    assert {4, 30} <= set(fps)
    aspects = [s.width / s.height for s in specs]
    assert min(aspects) < 0.6 and max(aspects) > 1.7
    durations = [s.duration for s in specs]
    assert min(durations) < 2.3 and max(durations) > 7.7
    two_part = np.mean([s.two_part for s in specs])
    two_obj = np.mean([len(s.objects) == 2 and not s.two_part for s in specs])
    assert 0.15 < two_part < 0.25 and 0.33 < two_obj < 0.47


def test_object_ranges(specs):
    seen = set()
    for s in specs:
        m = min(s.width, s.height)
        for o in s.objects:
            assert 0.15 * m <= o.size <= 0.30 * m
            assert 0.25 <= o.travel <= 0.60
            assert all(abs(c - n) <= 20 for c, n in zip(o.rgb, world.COLORS[o.color]))
            seen |= {o.color, o.shape, o.direction}
        if len(s.objects) == 2:
            a, b = s.objects
            assert a.color != b.color and a.shape != b.shape
    assert seen == {*world.COLORS, *world.SHAPES, *world.DIRECTIONS}


def test_objects_stay_inside_and_move_as_specified(specs):
    for s in specs[:300]:
        for k, o in enumerate(s.objects):
            frames = s.visible(k)
            for i in frames:
                x, y = s.position(k, i)
                assert -1e-9 <= x and x + o.size <= s.width + 1e-9
                assert -1e-9 <= y and y + o.size <= s.height + 1e-9
            (x0, y0), (x1, y1) = s.position(k, frames[0]), s.position(k, frames[-1])
            dx, dy = world.DIRECTIONS[o.direction]
            np.testing.assert_allclose([x1 - x0, y1 - y0], [dx * o.travel * s.width, dy * o.travel * s.height])
        if s.two_part:  # A alone in the first half, B alone in the second, together covering every frame
            a, b = s.visible(0), s.visible(1)
            assert a.start == 0 and a.stop == b.start == s.n_frames // 2 and b.stop == s.n_frames


def test_two_objects_shown_together_start_apart(specs):
    for s in specs:
        if len(s.objects) == 2 and not s.two_part:
            a, b = s.objects
            assert abs((a.x + a.size / 2) - (b.x + b.size / 2)) >= max(a.size, b.size)


# ---------------------------------------------------------------- rendering


def test_rendered_colour_at_each_object_centre(specs):
    for s in specs[:40]:
        frames = world.render_frames(s)
        assert frames.shape == (s.n_frames, s.height, s.width, 3) and frames.dtype == np.uint8
        for k, o in enumerate(s.objects):
            for i in s.visible(k):
                x, y = s.position(k, i)
                if len(s.objects) == 2 and not s.two_part and k == 0 and _covers(s, 1, i, x + o.size / 2, y + o.size / 2):
                    continue  # hidden under the other object (they may overlap briefly)
                cx, cy = int(x + o.size / 2), int(y + o.size / 2)
                assert tuple(frames[i, cy, cx]) == o.rgb
        # Outside every bounding box the background is black.
        for i in range(0, s.n_frames, 7):
            outside = np.ones((s.height, s.width), bool)
            for k, o in enumerate(s.objects):
                if i in s.visible(k):
                    x, y = s.position(k, i)
                    outside[int(y):int(np.ceil(y + o.size)), int(x):int(np.ceil(x + o.size))] = False
            assert frames[i][outside].max(initial=0) == 0


def _covers(s, k, i, px, py):
    x, y = s.position(k, i)
    size = s.objects[k].size
    return x - 1 <= px <= x + size + 1 and y - 1 <= py <= y + size + 1


def test_shapes_are_drawn_as_named():
    area = {}
    for shape in world.SHAPES:
        f = world.render_frame(_clip(_one(shape=shape, size=20, x=10.0, y=6.0, travel=0.0), w=40, h=32), 0)
        lit = f.any(-1)
        rows, cols = np.nonzero(lit)
        assert rows.min() >= 6 and rows.max() < 26 and cols.min() >= 10 and cols.max() < 30  # inside the box
        area[shape] = lit.sum()
        widths = lit.sum(1)[6:26]
        if shape == "triangle":  # apex at the top, base at the bottom
            assert widths[0] <= 2 and widths[-1] >= 18
    assert area["square"] == 400
    assert abs(area["circle"] - np.pi * 100) < 12 and abs(area["triangle"] - 200) < 15


# ---------------------------------------------------------------- writing


def _decode(path):
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(st)]
        return np.stack(frames), st.average_rate, st.frames


@pytest.mark.parametrize("spec", [world.sample_clip(3, two_part=True), _clip(_one(size=12, travel=0.3), w=33, h=41, fps=5, n_frames=11)],
                         ids=["sampled", "odd-size"])
def test_written_clip_decodes_with_pyav(spec, tmp_path):
    path = world.write_clip(spec, tmp_path / "c.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4"]  # the temp file was renamed away
    frames, rate, n = _decode(path)
    w2, h2 = spec.width + spec.width % 2, spec.height + spec.height % 2  # odd sides padded by one black line
    assert frames.shape == (spec.n_frames, h2, w2, 3) and n == spec.n_frames and rate == spec.fps
    o = spec.objects[0]
    x, y = spec.position(0, 0)
    centre = frames[0, int(y + o.size / 2), int(x + o.size / 2)].astype(int)
    assert np.abs(centre - o.rgb).max() <= 12  # H.264 at crf 18 keeps a flat colour close
    if spec.width % 2:
        assert frames[:, :, -1].max() <= 8  # the padding column stays black


# ---------------------------------------------------------------- questions and scoring


def test_questions_for_one_object():
    spec = _clip(_one(color="blue", shape="triangle", direction="up"))
    assert world.questions(spec) == [
        ("color", "What color is the triangle?", "blue"),
        ("shape", "What shape is the blue object?", "triangle"),
        ("direction", "Which way does the triangle move?", "up"),
        ("count", "How many objects are there?", "one"),
        ("caption", "Describe the video.", "A blue triangle moves up."),
    ]


def test_two_objects_are_captioned_left_most_first():
    right = _one(color="yellow", shape="circle", x=25.0, direction="left")
    left = _one(color="green", shape="square", x=2.0, direction="down")
    spec = _clip(right, left)
    qs = world.questions(spec)
    assert qs[-1] == ("caption", "Describe the video.", "A green square moves down and a yellow circle moves left.")
    assert ("count", "How many objects are there?", "two") in qs
    assert ("color", "What color is the circle?", "yellow") in qs and ("shape", "What shape is the green object?",
                                                                        "square") in qs
    assert ("direction", "Which way does the circle move?", "left") in qs
    assert len(qs) == 8


def test_two_part_clip_captions_the_first_shown_first_and_asks_about_each():
    a = _one(color="red", shape="circle", x=25.0, direction="right", travel=0.2)
    b = _one(color="blue", rgb=(50, 90, 230), shape="square", x=0.0, y=20.0, direction="up", travel=0.3)
    spec = _clip(a, b, two_part=True)
    qs = world.questions(spec)
    assert qs[-1][2] == "A red circle moves right and a blue square moves up."
    assert [k for k, _, _ in qs] == ["color", "shape", "direction"] * 2 + ["caption"]  # no count: never together
    frames = world.render_frames(spec)
    lit = lambda part, o: (part == o.rgb).all(-1).any(axis=(1, 2))  # (frames,) is o drawn in each frame
    assert lit(frames[:4], a).all() and not lit(frames[:4], b).any()  # A alone in the first half
    assert lit(frames[4:], b).all() and not lit(frames[4:], a).any()  # B alone in the second


def test_score_rules():
    assert world.score("red", "red") and world.score("Red.", "red") and world.score("  RED, it is red", "red")
    assert world.score("'circle'!", "circle") and world.score("two\n", "two")
    assert not world.score("reddish", "red") and not world.score("the red", "red") and not world.score("", "red")
    assert not world.score("...", "red") and not world.score("blue red", "red")
    cap = "A red circle moves left."
    assert world.score("a red circle moves left", cap) and world.score("A  Red circle moves LEFT!", cap)
    assert not world.score("A red circle moves right.", cap) and not world.score("A", cap)


# ---------------------------------------------------------------- splits and manifests


def test_splits_are_disjoint():
    train = {world.clip_spec("train", i).seed for i in range(200)} | {world.clip_spec("train", world.SPLIT_SIZE - 1).seed}
    held = {world.clip_spec("heldout", i).seed for i in range(200)}
    assert not train & held and len(train) == 201 and len(held) == 200
    assert world.clip_spec("heldout", 0) != world.clip_spec("train", 0)
    with pytest.raises(ValueError):
        world.clip_spec("train", world.SPLIT_SIZE)
    with pytest.raises(ValueError):
        world.clip_spec("test", 0)


def test_write_split_manifest_and_resume(tmp_path):
    out = tmp_path / "held"
    world.main(["clips", "--split", "heldout", "--n", "3", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {"id", "video_path", "prompt", "target_text", "kind"} <= set(rows[0])
    assert len({r["id"] for r in rows}) == len(rows) and {r["clip_id"] for r in rows} == {
        "heldout_00000", "heldout_00001", "heldout_00002"}
    for r in rows:
        spec = world.ClipSpec.from_dict(r["spec"])
        assert spec == world.clip_spec("heldout", r["index"]) and (out / r["video_path"]).is_file()
        assert (r["kind"], r["prompt"], r["target_text"]) in world.questions(spec)
    # Resume: existing clips are kept as they are, a missing one is written again, the manifest is identical.
    mtime = (out / "heldout_00000.mp4").stat().st_mtime_ns
    (out / "heldout_00001.mp4").unlink()
    before = (out / "manifest.jsonl").read_text()
    world.write_split("heldout", 3, out, progress=False)
    assert (out / "heldout_00000.mp4").stat().st_mtime_ns == mtime and (out / "heldout_00001.mp4").is_file()
    assert (out / "manifest.jsonl").read_text() == before
    assert not list(out.glob("*.tmp"))


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    for argv in (["clips", "--n", "0", "--out", str(tmp_path)], ["clips", "--out", str(tmp_path / "f")]):
        with pytest.raises(SystemExit, match="^error: "):
            world.main(argv)


# ---------------------------------------------------------------- tokenizer


def test_toy_tokenizer_is_deterministic_and_encodes_the_world_compactly():
    tok = world.toy_tokenizer()
    assert tok.to_str() == world.toy_tokenizer().to_str()
    # Also across processes, where the Rust trainer's hash maps are seeded differently.
    other = subprocess.run([sys.executable, "-c", "from toy import world; print(world.toy_tokenizer().to_str())"],
                           capture_output=True, text=True, check=True, cwd=Path(world.__file__).parents[1]).stdout
    assert other.strip() == tok.to_str()
    for word in [*world.COLORS, *world.SHAPES, *world.DIRECTIONS, *world.COUNT_WORDS]:
        assert len(tok.encode(" " + word).ids) == 1, word
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<image>") is not None
    assert tok.token_to_id("<end_of_utterance>") == tok.get_vocab_size() - 1
    prompt = "<|im_start|>User: What color is the circle?<end_of_utterance>\nAssistant: red<end_of_utterance>"
    assert tok.decode(tok.encode(prompt).ids, skip_special_tokens=False) == prompt
    for text in world.corpus():
        assert tok.decode(tok.encode(text).ids) == text
