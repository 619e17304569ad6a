"""The toy world: synthetic clips of coloured shapes in which the whole method trains on a CPU.

Spec: ../shared/design/toyworld.md. This file owns the world itself (the tokenizer of the toy base model,
clips, prompts and answers). Training the toy base model and scoring fidelity live beside it.
"""
from __future__ import annotations

import json
import os
import string
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import av
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

# SmolLM2's 17 control tokens keep ids 0..16 (smolvlm2.md §6); <|im_start|> = 1 starts every chat prompt.
CONTROL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]
# SmolVLM2's 128 added tokens, in the released order (smolvlm2.md §2): they follow the BPE vocabulary.
ADDED_TOKENS = (["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
                + ["<fake_token_around_image>", "<image>"] + [f"<|reserved_special_token_{i}|>" for i in range(88)]
                + ["<end_of_utterance>"])


def build_tokenizer(corpus: list[str], bpe_vocab_size: int = 1024) -> Tokenizer:
    """A small SmolLM2-style byte-level BPE trained on `corpus`, with SmolVLM2's special tokens.

    The pipeline is SmolLM2's (smolvlm2.md §6): no normalizer, Digits(individual) then ByteLevel pre-tokenizer,
    ByteLevel decoder, no post-processor (nothing is prepended). Only the vocabulary is smaller, so the toy
    model's embedding stays small. Ids: control tokens 0..16, then the learned BPE tokens (at most
    `bpe_vocab_size` in all), then the 128 added tokens, laid out as the real vocabulary is (49152 + 128 there).
    Code must therefore read special ids such as `<image>` from the tokenizer, never hard-code 49190.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, special_tokens=CONTROL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    return tok


# ---------------------------------------------------------------- the world's vocabulary (toyworld.md, Clips)

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
COUNT_WORDS = ("one", "two")
COLOR_JITTER = 20  # each RGB channel may move by up to ±20 from the named colour
TWO_PART_P = 0.2  # share of two-part clips when sample_clip is left to choose
# Splits are disjoint seed ranges: clip `index` of a split has seed SPLITS[split] + index.
SPLIT_SIZE = 1_000_000
SPLITS = {"train": 0, "heldout": SPLIT_SIZE}
# Prompt strings are exact; the answer is the word that fills the blank.
PROMPTS = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "direction": "Which way does the {shape} move?",
    "count": "How many objects are there?",
    "caption": "Describe the video.",
}


@dataclass(frozen=True)
class ObjectSpec:
    color: str                    # a key of COLORS
    rgb: tuple[int, int, int]     # the exact fill colour, COLORS[color] jittered per channel
    shape: str                    # a member of SHAPES
    size: int                     # side of the bounding box, px
    x: float                      # top-left corner of the bounding box at the object's first visible frame, px
    y: float
    direction: str                # a key of DIRECTIONS
    travel: float                 # distance covered while visible, as a fraction of the frame's extent on that axis


@dataclass(frozen=True)
class ClipSpec:
    width: int
    height: int
    fps: int
    n_frames: int                 # the clip lasts n_frames / fps seconds
    objects: tuple[ObjectSpec, ...]
    two_part: bool = False        # objects[0] alone in the first half, objects[1] alone in the second
    seed: int | None = None       # the seed sample_clip drew it from, None for hand-built specs

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps

    def visible(self, k: int) -> range:
        """Frame indices in which object k is drawn. A two-part clip splits at n_frames // 2."""
        if not self.two_part:
            return range(self.n_frames)
        half = self.n_frames // 2
        return range(0, half) if k == 0 else range(half, self.n_frames)

    def position(self, k: int, i: int) -> tuple[float, float]:
        """Top-left corner of object k's bounding box at frame i: constant speed over its visible frames."""
        o, frames = self.objects[k], self.visible(k)
        t = (i - frames.start) / max(len(frames) - 1, 1)  # 0 at its first visible frame, 1 at its last
        dx, dy = DIRECTIONS[o.direction]
        return o.x + dx * t * o.travel * self.width, o.y + dy * t * o.travel * self.height

    def to_dict(self) -> dict:  # JSON-ready; from_dict(to_dict()) gives back an equal spec
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClipSpec":
        return cls(**{**d, "objects": tuple(ObjectSpec(**{**o, "rgb": tuple(o["rgb"])}) for o in d["objects"])})


# ---------------------------------------------------------------- sampling


def _sample_frame(rng: np.random.Generator) -> tuple[int, int]:
    """Width and height in 32..256, aspect ratio at most 2:1 either way. Both are drawn even: H.264 in yuv420p
    stores chroma at half resolution and needs even sides (write_clip pads odd hand-built sizes)."""
    w = 2 * int(rng.integers(16, 129))
    lo, hi = max(32, -(-w // 2)), min(256, 2 * w)  # h in [w/2, 2w], clipped to the range
    h = 2 * int(rng.integers(-(-lo // 2), hi // 2 + 1))
    return w, h


def _sample_object(rng, w: int, h: int, color: str, shape: str) -> ObjectSpec:
    """One object whose whole path, from its first to its last visible frame, lies inside the frame."""
    m = min(w, h)  # side in [15 %, 30 %] of m, in integer arithmetic so that 0.15 * 40 cannot round up to 7
    size = int(rng.integers(-(-15 * m // 100), 30 * m // 100 + 1))
    direction = str(rng.choice(list(DIRECTIONS)))
    travel = float(rng.uniform(0.25, 0.60))
    rgb = tuple(int(c + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1)) for c in COLORS[color])
    dx, dy = DIRECTIONS[direction]
    # Along the motion axis the start leaves room for the whole trip; across it any position fits.
    # size <= 0.3 * extent and travel <= 0.6, so size + travel * extent <= 0.9 * extent always leaves room.
    x_room, y_room = w - size - abs(dx) * travel * w, h - size - abs(dy) * travel * h
    x = float(rng.uniform(0, x_room)) + (travel * w if dx < 0 else 0.0)
    y = float(rng.uniform(0, y_room)) + (travel * h if dy < 0 else 0.0)
    return ObjectSpec(color, rgb, shape, size, x, y, direction, travel)


def sample_clip(seed: int | np.random.Generator, two_part: bool | None = None,
                n_objects: int | None = None) -> ClipSpec:
    """Draw a clip anywhere in the spec's ranges. The same seed always gives the same clip.

    two_part / n_objects force a kind of clip; None draws it (two-part with probability TWO_PART_P, else one or
    two objects with equal odds). Two objects differ in both colour and shape, so every question names one
    object unambiguously; shown together, their centres start at least one object size apart horizontally, so
    they never overlap at the first frame and "left-most" (the caption order) is never a close call.
    """
    rng = np.random.default_rng(seed)
    w, h = _sample_frame(rng)
    fps = int(rng.integers(4, 31))
    n_frames = int(rng.integers(2 * fps, 8 * fps + 1))  # 2..8 s
    drawn_two_part, drawn_n = bool(rng.random() < TWO_PART_P), int(rng.integers(1, 3))  # drawn even when forced
    two_part = drawn_two_part if two_part is None else two_part
    n = 2 if two_part else (drawn_n if n_objects is None else n_objects)
    colors, shapes = rng.permutation(list(COLORS))[:n], rng.permutation(list(SHAPES))[:n]
    while True:  # rejection sampling: deterministic because rng is
        objects = [_sample_object(rng, w, h, str(c), str(s)) for c, s in zip(colors, shapes)]
        if n == 1 or two_part:
            break
        a, b = objects
        if abs((a.x + a.size / 2) - (b.x + b.size / 2)) >= max(a.size, b.size):
            break
    return ClipSpec(w, h, fps, n_frames, tuple(objects), two_part,
                    int(seed) if isinstance(seed, (int, np.integer)) else None)


def clip_spec(split: str, index: int, two_part: bool | None = None) -> ClipSpec:
    """Clip `index` of a split: train and heldout draw from disjoint seed ranges, so they never share a clip."""
    if split not in SPLITS or not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"no clip {index} in split {split!r}: splits {sorted(SPLITS)}, indices 0..{SPLIT_SIZE - 1}")
    return sample_clip(SPLITS[split] + index, two_part=two_part)


# ---------------------------------------------------------------- clips past the training ranges (toy/sweep.py, toy/segments.py)


def rescaled(spec: ClipSpec, longest: int) -> ClipSpec:
    """The same clip at another frame size: its longer side `longest` px, the aspect kept (sides even, for H.264),
    objects and their paths scaled with the frame. Frames past the spec's 256 px test what the encoder's resize does."""
    s = longest / max(spec.width, spec.height)
    w, h = (max(2, 2 * round(v * s / 2)) for v in (spec.width, spec.height))
    sx, sy = w / spec.width, h / spec.height
    objects = tuple(replace(o, size=max(1, int(o.size * min(sx, sy))), x=o.x * sx, y=o.y * sy) for o in spec.objects)
    return replace(spec, width=w, height=h, objects=objects)


def retimed(spec: ClipSpec, fps: int) -> ClipSpec:
    """The same motion at another frame rate: the same duration (to a frame), `fps` frames a second. Positions are
    a fraction of each object's visible frames, so every path is the same; only how finely it is cut changes."""
    return replace(spec, fps=fps, n_frames=max(2, round(spec.duration * fps)))


@dataclass(frozen=True)
class PartsSpec(ClipSpec):
    """A clip in len(objects) equal parts, objects[k] alone in part k: frames [k N / n, (k + 1) N / n). The
    two-part clip generalised; an object listed twice makes its trip again in its second part."""

    def visible(self, k: int) -> range:
        n = len(self.objects)
        return range(k * self.n_frames // n, (k + 1) * self.n_frames // n)


def sample_parts(seed: int, n_parts: int) -> PartsSpec:
    """An n-part clip: parts of 2-4 s each (a two-part clip's halves are 1-4 s), min(n, 4) objects of different
    colours (and different shapes while there are at most 3), object k % 4 alone in part k. Same seed, same clip."""
    rng = np.random.default_rng([seed, n_parts])
    w, h = _sample_frame(rng)
    fps = int(rng.integers(4, 31))
    m = min(n_parts, len(COLORS))
    colors = [str(c) for c in rng.permutation(list(COLORS))[:m]]
    shapes = [str(s) for s in rng.permutation(list(SHAPES))] + [str(s) for s in rng.choice(SHAPES, m)]
    objects = [_sample_object(rng, w, h, c, s) for c, s in zip(colors, shapes[:m])]
    part = int(round(float(rng.uniform(2, 4)) * fps))
    return PartsSpec(w, h, fps, n_parts * part, tuple(objects[k % m] for k in range(n_parts)), seed=seed)


def parts_questions(spec: PartsSpec) -> list[tuple[str, str, str, list[int]]]:
    """(kind, prompt, answer, parts that show its object) for every question with one right answer in the clip:
    the shape of each object (colours differ), its colour and direction when no other object has its shape."""
    distinct = list(dict.fromkeys(spec.objects))
    out = []
    for o in distinct:
        shown = [k for k, x in enumerate(spec.objects) if x == o]
        if sum(x.shape == o.shape for x in distinct) == 1:
            out.append(("color", PROMPTS["color"].format(shape=o.shape), o.color, shown))
        out.append(("shape", PROMPTS["shape"].format(color=o.color), o.shape, shown))
        if sum(x.shape == o.shape for x in distinct) == 1:
            out.append(("direction", PROMPTS["direction"].format(shape=o.shape), o.direction, shown))
    return out


# ---------------------------------------------------------------- rendering and writing


def _mask(shape: str, x: float, y: float, s: int, h: int, w: int) -> np.ndarray:
    """(h, w) bool: pixels whose centre lies inside the shape whose bounding box is [x, x+s] x [y, y+s]."""
    px = np.arange(w)[None, :] + 0.5  # (1, w) pixel centres
    py = np.arange(h)[:, None] + 0.5  # (h, 1)
    inside_box = (px >= x) & (px <= x + s) & (py >= y) & (py <= y + s)
    if shape == "square":
        return inside_box
    cx, cy = x + s / 2, y + s / 2
    if shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= (s / 2) ** 2
    # An upright isosceles triangle: apex at the top centre, base along the bottom edge of the box.
    return inside_box & (np.abs(px - cx) <= (py - y) / 2)


def render_frame(spec: ClipSpec, i: int) -> np.ndarray:
    """(H, W, 3) uint8 frame i: black background, objects painted in list order (later ones on top)."""
    frame = np.zeros((spec.height, spec.width, 3), np.uint8)
    for k, o in enumerate(spec.objects):
        if i in spec.visible(k):
            x, y = spec.position(k, i)
            frame[_mask(o.shape, x, y, o.size, spec.height, spec.width)] = o.rgb
    return frame


def render_frames(spec: ClipSpec) -> np.ndarray:
    """(N, H, W, 3) uint8, all frames of the clip."""
    return np.stack([render_frame(spec, i) for i in range(spec.n_frames)])


def write_clip(spec: ClipSpec, path: str | Path, crf: int = 18) -> Path:
    """Write the clip as H.264 mp4 (yuv420p, constant frame rate spec.fps, one frame per spec frame).

    yuv420p needs even sides: an odd width or height (only possible in hand-built specs) is padded by one black
    column / row on the right / bottom, which the black background makes invisible. The file appears
    atomically: it is encoded to `<path>.tmp` and renamed, so an existing mp4 is always complete.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w2, h2 = spec.width + spec.width % 2, spec.height + spec.height % 2
    try:
        with av.open(str(tmp), "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=spec.fps)
            stream.width, stream.height, stream.pix_fmt = w2, h2, "yuv420p"
            # crf 18 keeps colours within a few units; one thread because the machines are shared.
            stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
            for i in range(spec.n_frames):
                rgb = np.zeros((h2, w2, 3), np.uint8)
                rgb[:spec.height, :spec.width] = render_frame(spec, i)
                out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            out.mux(stream.encode())  # flush the encoder's delayed frames
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- questions, answers, scoring


def caption_order(spec: ClipSpec) -> list[ObjectSpec]:
    """Objects in caption order: the one that appears first, or (shown together) the left-most at frame 0."""
    if spec.two_part or len(spec.objects) == 1:
        return list(spec.objects)
    return sorted(spec.objects, key=lambda o: o.x + o.size / 2)


def caption(spec: ClipSpec) -> str:
    parts = [f"{o.color} {o.shape} moves {o.direction}" for o in caption_order(spec)]
    return "A " + " and a ".join(parts) + "."


def questions(spec: ClipSpec) -> list[tuple[str, str, str]]:
    """(kind, prompt, answer) for every question the clip supports, in a fixed order.

    Colour, shape and direction questions are asked about each object (in caption order), naming it by the
    attribute that is not asked. A two-part clip never shows its objects together, so "how many" has no
    single right answer there and is not asked; it gets the per-object questions and the caption.
    """
    out = []
    for o in caption_order(spec):
        out.append(("color", PROMPTS["color"].format(shape=o.shape), o.color))
        out.append(("shape", PROMPTS["shape"].format(color=o.color), o.shape))
        out.append(("direction", PROMPTS["direction"].format(shape=o.shape), o.direction))
    if not spec.two_part:
        out.append(("count", PROMPTS["count"], COUNT_WORDS[len(spec.objects) - 1]))
    out.append(("caption", PROMPTS["caption"], caption(spec)))
    return out


def _words(text: str) -> list[str]:
    return [t for t in (w.strip(string.punctuation).lower() for w in text.split()) if t]


def score(answer_text: str, expected: str) -> bool:
    """True when the answer's first word, lower-cased and stripped of punctuation, equals the expected word.

    For a caption (an expected text of several words) the whole answer must match word for word, under the
    same normalisation; otherwise every caption would pass on its first word, "a".
    """
    got, want = _words(answer_text), _words(expected)
    if len(want) > 1:
        return got == want
    return bool(got) and got[0] == want[0]


# ---------------------------------------------------------------- clip folders with a manifest

TWO_PART_MODES = {"mixed": None, "always": True, "never": False}


def write_split(split: str, n: int, out: str | Path, two_part: str = "mixed", progress: bool = True) -> Path:
    """Write clips 0..n-1 of a split into `out` (mp4s + manifest.jsonl, one row per question); return the manifest.

    Resumable: an existing mp4 is complete (write_clip renames into place) and is not rendered again; the
    manifest is rewritten whole, atomically. Each row carries its clip's spec, so consumers never re-sample.
    `two_part` "always" / "never" change the clips, so those clips get their own file names.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    force = TWO_PART_MODES[two_part]
    rows = []
    for index in tqdm(range(n), desc=f"{split} clips", unit="clip", disable=not progress):
        spec = clip_spec(split, index, two_part=force)
        clip_id = f"{split}_{index:05d}" if force is None else f"{split}_{two_part}_{index:05d}"
        video = out / f"{clip_id}.mp4"
        if not video.exists():
            write_clip(spec, video)
        for j, (kind, prompt, answer) in enumerate(questions(spec)):
            rows.append({"id": f"{clip_id}_q{j}", "video_path": video.name, "prompt": prompt,
                         "target_text": answer, "kind": kind, "clip_id": clip_id, "split": split,
                         "index": index, "spec": spec.to_dict()})
    manifest = out / "manifest.jsonl"
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, manifest)
    return manifest


# ---------------------------------------------------------------- the toy tokenizer

# The number words SmolVLM2's video prompt spells frame counts with, up to the 12 frames method.md uses.
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
INTERNALIZE = "Internalize this video for later captioning."  # method.md §2: the internalization instruction
UNABLE = "Unable to determine."  # method.md §6.2: what an empty teacher output becomes


def corpus() -> list[str]:
    """Every text the toy model reads or writes, in a fixed order, to train the toy BPE on.

    Special tokens (<image>, <end_of_utterance>, ...) are left out: they are added tokens, matched whole.
    """
    # Every question with every answer, and every caption (one object, or two differing in colour and shape).
    qa = [(PROMPTS["color"].format(shape=s), c) for s in SHAPES for c in COLORS]
    qa += [(PROMPTS["shape"].format(color=c), s) for c in COLORS for s in SHAPES]
    qa += [(PROMPTS["direction"].format(shape=s), d) for s in SHAPES for d in DIRECTIONS]
    qa += [(PROMPTS["count"], n) for n in COUNT_WORDS]
    singles = [f"{c} {s} moves {d}" for c in COLORS for s in SHAPES for d in DIRECTIONS]
    qa += [(PROMPTS["caption"], f"A {a}.") for a in singles]
    qa += [(PROMPTS["caption"], f"A {a} and a {b}.") for a in singles for b in singles
           if a.split()[0] != b.split()[0] and a.split()[1] != b.split()[1]]
    texts = [f"User: {p}\nAssistant: {a}\n" for p, a in qa] + [*COLORS, *SHAPES, *DIRECTIONS, *COUNT_WORDS]
    # SmolVLM2's chat and video scaffolding (smolvlm2.md §5.4-5.5), with the special tokens cut out.
    for words, d in zip(NUMBER_WORDS, range(1, 10)):
        stamps = "".join(f"\nFrame from 00:0{k}:" for k in range(d))
        texts.append(f"User: You are provided the following series of {words} frames from a 0:00:0{d} "
                     f"[H:MM:SS] video.\n{stamps}\n\n")
    texts += [f"You are provided the following series of {words} frames" for words in NUMBER_WORDS]
    return texts + [f"User: {INTERNALIZE}\nAssistant: {UNABLE}\n", INTERNALIZE, UNABLE]


def toy_tokenizer() -> Tokenizer:
    """The toy base model's tokenizer: the same corpus always gives the same vocabulary and merges."""
    return build_tokenizer(corpus())


# ---------------------------------------------------------------- the shipped example clip

# examples/clip.mp4: two objects, so every question kind has something to ask about.
EXAMPLE = ClipSpec(width=160, height=120, fps=12, n_frames=48, objects=(
    ObjectSpec("red", COLORS["red"], "square", 28, 20.0, 20.0, "right", 0.45),
    ObjectSpec("blue", COLORS["blue"], "circle", 26, 110.0, 30.0, "down", 0.4),
))


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    from adapter import ArgumentParser   # one-line usage errors, as every command here

    parser = ArgumentParser(description="The toy world: synthetic clips of coloured shapes (toyworld.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    clips = sub.add_parser("clips", help="write N clips of a split as mp4 + manifest.jsonl (resumable)")
    clips.add_argument("--split", choices=sorted(SPLITS), default="train", help="seed range to draw from")
    clips.add_argument("--n", type=int, default=500, help="number of clips (indices 0..n-1)")
    clips.add_argument("--out", required=True, help="output folder, e.g. data/toy/train")
    clips.add_argument("--two-part", choices=sorted(TWO_PART_MODES), default="mixed",
                       help=f"mixed: about {TWO_PART_P * 100:.0f}%% two-part clips; always / never: force it")
    example = sub.add_parser("example", help="write the example clip that ships in examples/")
    example.add_argument("--out", default="examples/clip.mp4")
    args = parser.parse_args(argv)
    if args.command == "example":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_clip(EXAMPLE, args.out)
        print(f"wrote {args.out}: {caption(EXAMPLE)}")
        return
    if not 1 <= args.n <= SPLIT_SIZE:
        raise SystemExit(f"error: --n must be between 1 and {SPLIT_SIZE}, got {args.n}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"error: --out {args.out} exists and is not a folder")
    manifest = write_split(args.split, args.n, args.out, two_part=args.two_part)
    print(f"wrote {manifest} ({sum(1 for _ in manifest.open())} questions, {args.n} clips)")


if __name__ == "__main__":
    from adapter import run_cli   # one-line errors, 128 + signal after Ctrl-C / SIGTERM

    run_cli(main)
