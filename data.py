"""Video in: decode with PyAV, sample frames, make pixels and build SmolVLM2 prompts exactly as the reference does.

Spec: ../shared/design/smolvlm2.md §2, §5.4-5.5, §6 and method.md §2, §5, §6.1-6.2. transformers is the oracle the
tests compare against; nothing here imports it. Four parts, top to bottom: decoding, frame sampling, pixels, and
prompts/tokens (the `Processor`), then the JSONL manifest dataset used for training.
"""
from __future__ import annotations

import bisect, hashlib, json, math, os, sys, zlib
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import torch
from tokenizers import Tokenizer

INSTRUCTION = "Internalize this video for later captioning."  # method.md §2: the fixed internalization instruction
MAX_VIDEO_SIZE = 4096   # px, the longest frame edge before the encoder's square: past it only memory grows


class DecodeError(RuntimeError):
    """The file is missing, is not a media file, has no video stream, or its frames cannot be decoded."""


# ----------------------------------------------------------------------------------------------------------- decoding
@dataclass
class Clip:
    frames: list            # F sampled frames, upright: (H, W, 3) uint8 arrays, or whatever `frame_fn` made of them
    indices: list[int]      # frame numbers within the clip, presentation order (what the sampler chose)
    pts: list[float]        # true presentation times in seconds from the clip's first frame (VFR-safe)
    total_frames: int       # frames in the clip (= the container's nb_frames when it stores one)
    fps: float              # the stream's average frame rate, as transformers' PyAV reader takes it (Timeline.fps)
    span: float | None = None   # real seconds the clip covers, from its timestamps (None: total_frames / fps)
    source: str | None = None   # the file's name ("<array>" for frames given in memory): what an answer is about
    duration: float = field(init=False)

    def __post_init__(self):
        self.duration = self.total_frames / self.fps   # SmolVLM2's definition (§5.5), not the container's
        if self.span is None:
            self.span = self.duration

    @property
    def timestamps(self) -> list[float]:
        # What SmolVLM2 prints in "Frame from MM:SS:": frame index / average fps, as in training. On a
        # variable-frame-rate clip this drifts from `pts`; we keep the reference's number for prompt parity.
        return [k / self.fps for k in self.indices]


@dataclass
class Timeline:
    """Where every frame of a video stream lies, from its packets alone (scan_video)."""
    pts: list[int]          # presentation time of each frame, stream ticks, ascending
    keys: list[int]         # those of the keyframes
    tb: float               # seconds per tick
    fps: float              # the average frame rate the sampler and the prompt use (see scan_video)
    span: float             # real seconds from the first frame's start to the last frame's end

    def seconds(self) -> list[float]:
        """Each frame's start, seconds from the first frame."""
        return [(p - self.pts[0]) * self.tb for p in self.pts]

    @classmethod
    def of_frames(cls, n: int, fps: float) -> "Timeline":
        """Frames in memory, frame i shown at i / fps: one tick per frame."""
        return cls(list(range(n)), list(range(n)), 1 / fps, fps, n / fps)

    def frame_range(self, start: float | None, end: float | None) -> tuple[int, int]:
        """Frames [lo, hi) that start in [start, end) seconds. Ticks are integers: the 1e-6 only absorbs float
        noise in seconds -> ticks (2.0 s * 8 fps must be frame 16, not 17)."""
        t0 = self.pts[0]
        lo = 0 if start is None else bisect.bisect_left(self.pts, t0 + start / self.tb - 1e-6)
        hi = len(self.pts) if end is None else bisect.bisect_left(self.pts, t0 + end / self.tb - 1e-6)
        return lo, hi


def _upright(frame: av.VideoFrame, stream) -> np.ndarray:
    """RGB array of `frame` turned the way a player shows it. PyAV reads the display matrix (counter-clockwise
    degrees); old muxers wrote a clockwise "rotate" tag instead. transformers' reader ignores both."""
    rgb = frame.to_ndarray(format="rgb24")                      # (H, W, 3) uint8, as stored
    angle = frame.rotation or -int(float(stream.metadata.get("rotate", 0)))
    k = round(angle / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb   # np.rot90 turns counter-clockwise


def _scan(container, stream, path) -> Timeline:
    """Presentation times (stream ticks) of every frame and of every keyframe, from the packets alone: demuxing
    reads the file but decodes nothing, so it is cheap, and it gives an exact frame count and index -> time map
    even for variable frame rate or containers without a frame count (Matroska/WebM report 0).

    The frame rate: the stream's average rate, as transformers' reader takes it, wherever that reader works (the
    container stores a frame count: MP4, MOV) or the rate agrees with the timestamps within 10 %. Otherwise (a
    Matroska/WebM file whose nominal rate is a header value the frames do not keep) frames / real span, so that the
    sampler spreads its frames over the whole clip rather than over a fraction of it."""
    pts, keys = [], []
    for packet in container.demux(stream):
        t = packet.pts if packet.pts is not None else packet.dts
        if t is None or packet.size == 0:
            continue                                            # the empty flush packet at end of stream
        pts.append(t)
        if packet.is_keyframe:
            keys.append(t)
    if not pts:
        raise DecodeError(f"{path}: the video stream has no frames")
    pts, keys, tb = sorted(pts), sorted(keys), float(stream.time_base)
    nominal = float(stream.average_rate or stream.guessed_rate or 0)
    steps = np.diff(pts)
    step = float(np.median(steps)) * tb if len(pts) > 1 else (1 / nominal if nominal else 1.0)   # last frame's
    span = (pts[-1] - pts[0]) * tb + step
    real = len(pts) / span
    honest = nominal > 0 and (stream.frames > 0 or abs(nominal / real - 1) <= 0.1)
    return Timeline(pts, keys, tb, nominal if honest else real, span)


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise DecodeError(f"{path}: " + ("not a regular file" if path.exists() else "no such file"))
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise DecodeError(f"{path}: not a readable media file ({str(e).splitlines()[0] if str(e) else e})") from None
    if not container.streams.video:
        container.close()
        raise DecodeError(f"{path}: no video stream")
    return container


def scan_video(path) -> Timeline:
    """The frame timeline of a video file (demuxing only; decodes nothing). Raises DecodeError."""
    with _open(path) as container:
        try:
            return _scan(container, container.streams.video[0], path)
        except av.FFmpegError as e:
            raise DecodeError(f"{path}: reading failed ({e})") from None


def _fetch(container, stream, targets: list[int], keys: list[int], frame_fn) -> list:
    """Decode just the frames whose pts are `targets` (ascending). Before each target we seek to the keyframe at
    or before it, but only when a keyframe lies past the decoder's position (otherwise decoding on is cheaper).
    Only the current frame and the kept results are ever in memory."""
    out, frames, pos = [], None, None
    for target in targets:
        if frames is None or bisect.bisect_right(keys, target) > bisect.bisect_right(keys, pos):
            container.seek(target, stream=stream, backward=True)   # lands on a keyframe <= target
            frames, pos = container.decode(stream), None
        for frame in frames:
            if frame.pts is None:
                continue
            if pos is None and frame.pts > target:               # imprecise seek: restart from the top
                container.seek(keys[0] if keys else 0, stream=stream, backward=True)
                frames = container.decode(stream)
                pos = -math.inf
                continue
            pos = frame.pts
            if frame.pts >= target:
                out.append(frame_fn(_upright(frame, stream)))
                break
        else:
            raise DecodeError(f"stream ended before the frame at pts {target}")
    return out


def decode_video(path, num_frames: int | None = None, max_frames: int = 64, sample_fps: float = 1.0,
                 start: float | None = None, end: float | None = None, frame_fn=None,
                 timeline: Timeline | None = None) -> Clip:
    """Decode the sampled frames of `path`, or of its [start, end) second range, which then behaves exactly like
    a clip cut out of the video (indices and timestamps restart at 0), as the authors' ffmpeg-cut clips did.
    Sampling is SmolVLM2's rule (`max_frames`, `sample_fps`) unless `num_frames` asks for N uniform frames.
    `timeline`: the file's scan_video, when the caller has it (segments of one file scan it once)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            tl = timeline or _scan(container, stream, path)
            lo, hi = tl.frame_range(start, end)
            if hi <= lo:
                raise DecodeError(f"{path}: no frames in [{start or 0:g}, {end if end is not None else tl.span:g}) s "
                                  f"(the clip is {tl.span:.2f} s long)")
            total = hi - lo
            idx = uniform_indices(total, num_frames) if num_frames else smolvlm_indices(total, tl.fps, max_frames,
                                                                                         sample_fps)
            frames = _fetch(container, stream, [tl.pts[lo + i] for i in idx], tl.keys, frame_fn or (lambda a: a))
        except av.FFmpegError as e:
            raise DecodeError(f"{path}: decoding failed ({e})") from None
    seconds = tl.seconds()
    last = tl.span if hi == len(tl.pts) else seconds[hi]         # where the clip's last frame ends
    return Clip(frames, idx, [(tl.pts[lo + i] - tl.pts[lo]) * tl.tb for i in idx], total, tl.fps,
                span=last - seconds[lo], source=Path(path).name)


# ------------------------------------------------------------------------------------------------------ sampling
def smolvlm_indices(total: int, fps: float, max_frames: int = 64, sample_fps: float = 1.0, skip_secs: float = 1.0):
    """SmolVLM2's sampler (SmolVLMVideoProcessor.sample_frames, §5.5): about `sample_fps` frames a second, at most
    `max_frames`; videos long enough to be capped lose `skip_secs` at each end; evenly spaced, truncated, unique."""
    duration = total / fps
    n = max(1, min(int(round(sample_fps * duration)), max_frames))   # Python round: banker's, as the reference
    lo, hi = 0, total - 1
    if skip_secs > 0 and duration - 2 * skip_secs > max_frames * sample_fps:
        lo, hi = int(skip_secs * fps), int(total - skip_secs * fps)
    lo, hi = max(0, lo), min(hi, total - 1)
    if lo >= hi:
        lo, hi = 0, total - 1
    return np.unique(np.linspace(lo, hi, n, dtype=int)).tolist()


def uniform_indices(total: int, n: int) -> list[int]:
    """N frames spread evenly, starting at frame 0 (transformers' default_sample_indices_fn); all if n >= total."""
    n = min(n, total)
    return (np.arange(n) * total // n).tolist()


# -------------------------------------------------------------------------------------------------------- pixels
# The reference (transformers 4.50, what SmolVLM2 was trained with) resizes with PIL LANCZOS on uint8. We
# reproduce Pillow's resampler in torch exactly: its filter taps, its 22-bit fixed-point coefficients, the
# horizontal-then-vertical order and the uint8 rounding after each pass (Pillow's libImaging/Resample.c).
_PRECISION = 22


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


@lru_cache(maxsize=64)
def _lanczos_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and fixed-point weights, both (n_out, K), of Pillow's LANCZOS (a = 3) resize."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)                                    # downscaling widens the filter
    support = 3.0 * fscale
    k = int(math.ceil(support)) * 2 + 1
    idx, wts = torch.zeros(n_out, k, dtype=torch.long), torch.zeros(n_out, k, dtype=torch.long)
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = [_sinc(v) * _sinc(v / 3) if -3.0 <= v < 3.0 else 0.0
             for v in ((x - center + 0.5) * (1.0 / fscale) for x in range(lo, hi))]
        total = sum(w)
        w = [v / total for v in w] if total != 0.0 else w
        idx[o, : hi - lo] = torch.arange(lo, hi)
        wts[o, : hi - lo] = torch.tensor([int((0.5 if v >= 0 else -0.5) + v * (1 << _PRECISION)) for v in w])
    return idx, wts


@lru_cache(maxsize=64)
def _lanczos_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The taps as a dense (n_in, n_out) float64 matrix of integer fixed-point weights."""
    idx, wts = _lanczos_taps(n_in, n_out)
    m = torch.zeros(n_in, n_out, dtype=torch.float64)
    m.index_put_((idx, torch.arange(n_out)[:, None].expand_as(idx)), wts.double(), accumulate=True)
    return m


def _resample_last(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """Resize the last axis of integer pixels x (..., n_in) -> (..., n_out), rounding to uint8 values like Pillow.

    One float64 matmul instead of a loop over taps, and still exact: every product (<= 255 * 2^22) and every sum
    is an integer far below 2^53, so float64 holds it exactly and floor(acc / 2^22) equals Pillow's `>>`."""
    acc = x.double() @ _lanczos_matrix(x.shape[-1], n_out) + float(1 << (_PRECISION - 1))
    return torch.floor(acc * (1.0 / (1 << _PRECISION))).clamp_(0, 255).long()  # floor, as Pillow's clip8


def lanczos_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) integer pixels -> (3, height, width), bit-identical to PIL `Image.resize(..., LANCZOS)`."""
    if width != x.shape[2]:
        x = _resample_last(x, width)                            # Pillow: horizontal pass first
    if height != x.shape[1]:
        x = _resample_last(x.transpose(1, 2), height).transpose(1, 2)
    return x


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """SmolVLM2's step 1: longest edge -> `longest` (up or down), the other side truncated then made even."""
    if width >= height:
        h, w = int(longest / (width / height)), longest
        h += h % 2
    else:
        h, w = longest, int(longest * (width / height))
        w += w % 2
    return max(h, 1), max(w, 1)


def frame_pixels(rgb: np.ndarray, video_size: int, side: int) -> torch.Tensor:
    """One upright (H, W, 3) uint8 frame -> (3, side, side) float32 in [-1, 1]. Never tiled: the longest edge goes
    to `video_size`, then the frame is squashed to the encoder's square (§5.5), then x/255 in float64 -> float32
    and (x - 0.5) / 0.5, which is exactly the reference's arithmetic."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).long()          # (3, H, W)
    x = lanczos_resize(x, *longest_edge_size(x.shape[1], x.shape[2], video_size))
    x = lanczos_resize(x, side, side)                          # (3, S, S)
    return ((x.double() * (1 / 255)).float() - 0.5) / 0.5


# ------------------------------------------------------------------------------------------------- prompts, tokens
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English cardinal as num2words writes it (British "and", comma between groups): 64 -> "sixty-four",
    101 -> "one hundred and one", 1100 -> "one thousand, one hundred". The video intro spells the frame count."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words covers 0..999999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    big, rest, unit = (n // 100, n % 100, " hundred") if n < 1000 else (n // 1000, n % 1000, " thousand")
    head = number_words(big) + unit
    return head if rest == 0 else head + (" and " if rest < 100 else ", ") + number_words(rest)


def video_prompt(clip: Clip, image_seq_len: int) -> str:
    """The text that replaces a <video> item (§5.5): an intro with the frame count in words and the duration, then
    per frame "\\nFrame from MM:SS:" and the frame's image block, then a blank line."""
    frame = "<fake_token_around_image><global-img>" + "<image>" * image_seq_len + "<fake_token_around_image>"
    text = (f"You are provided the following series of {number_words(len(clip.frames))} frames "
            f"from a {timedelta(seconds=int(clip.duration))} [H:MM:SS] video.\n")
    for t in clip.timestamps:
        text += f"\nFrame from {int(t // 60):02d}:{int(t % 60):02d}:" + frame
    return text + "\n\n"


def render_chat(messages: list[dict], add_generation_prompt: bool = False, video_text: str = "<video>") -> str:
    """SmolVLM2's chat template (§5.4) in Python. messages: [{"role", "content": [{"type": "text"|"image"|"video",
    "text"?}]}]. A video item becomes `video_text` (the expanded block), an image item "<image>"."""
    out = "<|im_start|>"                                         # once, at the very start: no BOS is added
    for m in messages:
        items = m["content"]
        out += m["role"].capitalize() + (":" if items[0]["type"] == "image" else ": ")
        for it in items:
            out += {"text": it.get("text", ""), "image": "<image>", "video": video_text}.get(it["type"], "")
        out += "<end_of_utterance>\n"
    return out + ("Assistant:" if add_generation_prompt else "")  # no trailing space: the answer starts with one


def load_tokenizer(model_dir) -> Tokenizer:
    """The checkpoint's own byte-level BPE (tokenizer.json) through `tokenizers`; it adds no special tokens."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json in the model directory")
    return Tokenizer.from_file(str(path))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class Processor:
    """Everything a stage needs to turn videos and text into model inputs, configured from a model directory:
    config.json (tokens per frame, frame side), preprocessor_config.json (video sampling; optional), tokenizer.json.
    `max_frames` / `video_size` override the processor config (the method uses 12 frames at 384 px)."""

    def __init__(self, model_dir, max_frames: int | None = None, video_size: int | None = None,
                 sample_fps: float | None = None):
        model_dir = Path(model_dir)
        cfg, pre = _read_json(model_dir / "config.json"), _read_json(model_dir / "preprocessor_config.json")
        vis = cfg.get("vision_config", {})                      # absent keys take transformers' defaults (§1.4)
        image_size, patch, s = vis.get("image_size", 224), vis.get("patch_size", 32), cfg.get("scale_factor", 2)
        self.image_seq_len = (image_size // patch) ** 2 // s ** 2
        stored = _read_json(model_dir / "processor_config.json").get("image_seq_len", self.image_seq_len)
        if stored != self.image_seq_len:
            raise ValueError(f"{model_dir}: processor_config image_seq_len {stored} != {self.image_seq_len} from config")
        self.side = pre.get("max_image_size", {}).get("longest_edge", image_size)   # the encoder's square frame
        sampling = pre.get("video_sampling", {})
        self.max_frames = max_frames or sampling.get("max_frames", 64)
        self.sample_fps = sample_fps or sampling.get("fps", 1)
        self.video_size = video_size or sampling.get("video_size", {}).get("longest_edge", self.side)
        # Bounds that keep a typo from exhausting memory: frames are resized to `video_size` before the encoder's
        # square, so a huge size only costs RAM; a frame count is bounded by the context (check_fits).
        if not (isinstance(self.video_size, int) and 1 <= self.video_size <= MAX_VIDEO_SIZE):
            raise ValueError(f"video size {self.video_size} is outside 1..{MAX_VIDEO_SIZE} px (frames end up "
                             f"{self.side} px square; released models read 384)")
        if not (isinstance(self.max_frames, int) and 1 <= self.max_frames):
            raise ValueError(f"max frames must be an integer >= 1, got {self.max_frames}")
        self.context = cfg.get("text_config", {}).get("max_position_embeddings", 2048)   # TextConfig's default
        self.tokenizer = load_tokenizer(model_dir)
        pad = _read_json(model_dir / "tokenizer_config.json").get("pad_token", "<|im_end|>")
        self.image_token_id, self.eou_id, self.pad_id = (self._id(t) for t in ("<image>", "<end_of_utterance>", pad))

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token!r} token")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def video_prompt_length(self, n_frames: int, text: str = INSTRUCTION, add_generation_prompt: bool = False) -> int:
        """Tokens of a [video of n_frames, text] turn, counted without decoding anything (timestamps as for a 1-fps
        clip; a real clip's differ by a token or two): the check before any heavy work."""
        clip = Clip([None] * n_frames, list(range(n_frames)), [float(k) for k in range(n_frames)], n_frames, 1.0)
        msg = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
        return len(self.encode(render_chat(msg, add_generation_prompt, video_prompt(clip, self.image_seq_len))))

    def check_frames(self, n_frames: int, text: str = INSTRUCTION, new_tokens: int = 0, flag: str = "--frames"):
        """ValueError if a video of n_frames (with `text`, and `new_tokens` to generate) is past the context."""
        if n_frames <= 10_000 and self.video_prompt_length(n_frames, text) + new_tokens <= self.context:
            return
        fits = lambda n: self.video_prompt_length(n, text) + new_tokens <= self.context   # noqa: E731
        per = self.video_prompt_length(2, text) - self.video_prompt_length(1, text)
        most = max(0, min(n_frames, (self.context - new_tokens - self.video_prompt_length(1, text)) // per + 1))
        while most > 0 and not fits(most):
            most -= 1
        raise ValueError(f"{flag} {n_frames}: a prompt of that many frames ({per} tokens each) is past the base "
                         f"model's context of {self.context} tokens; at most {most} frames fit"
                         + (f" with {new_tokens} new tokens" if new_tokens else ""))

    def check_length(self, n_tokens: int, new_tokens: int, what: str = "the question"):
        """ValueError naming the limit if a prompt of n_tokens plus new_tokens to generate is past the context."""
        if n_tokens + new_tokens > self.context:
            raise ValueError(f"{what} is {n_tokens} tokens; with {new_tokens} new tokens that is past the base model's "
                             f"context of {self.context} tokens (shorten it, or lower --max-new-tokens)")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def load_video(self, path, start=None, end=None, num_frames=None, timeline: Timeline | None = None) -> Clip:
        """Decode and sample; each frame becomes (3, S, S) pixels as soon as it is decoded, so a 4K frame is held
        once, briefly. Raises DecodeError."""
        return decode_video(path, num_frames, self.max_frames, self.sample_fps, start, end,
                            frame_fn=lambda rgb: frame_pixels(rgb, self.video_size, self.side), timeline=timeline)

    def clip_from_frames(self, frames: np.ndarray, fps: float, start=None, end=None) -> Clip:
        """Frames already in memory, (N, H, W, 3) uint8 RGB, upright, frame i shown at i / fps -> the Clip that
        load_video makes of a file holding them: the same [start, end) span rule, sampler and pixels."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
            raise DecodeError(f"frames must be a non-empty (N, H, W, 3) uint8 array, got {frames.dtype} "
                              f"{tuple(frames.shape)}")
        if not (fps > 0 and math.isfinite(fps)):
            raise DecodeError(f"frames need a positive fps, got {fps}")
        lo, hi = Timeline.of_frames(len(frames), fps).frame_range(start, end)
        if hi <= lo:
            raise DecodeError(f"no frames in [{start or 0:g}, {end if end is not None else len(frames) / fps:g}) s "
                              f"(the frames cover {len(frames) / fps:.2f} s)")
        idx = smolvlm_indices(hi - lo, fps, self.max_frames, self.sample_fps)
        pixels = [frame_pixels(np.ascontiguousarray(frames[lo + i]), self.video_size, self.side) for i in idx]
        return Clip(pixels, idx, [i / fps for i in idx], hi - lo, fps, span=(hi - lo) / fps, source="<array>")

    def _video_inputs(self, video, text: str, add_generation_prompt: bool):
        clip = video if isinstance(video, Clip) else self.load_video(video)
        msg = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
        ids = self.encode(render_chat(msg, add_generation_prompt, video_prompt(clip, self.image_seq_len)))
        return torch.tensor([ids]), torch.stack(clip.frames)    # (1, T) long, (F, 3, S, S) float32

    def internalization_inputs(self, video, instruction: str = INSTRUCTION):
        """method.md §2: one user turn [video, instruction], no generation prompt -> (ids (1, T), pixels (F, 3, S, S)).
        `video` is a path or a Clip from `load_video` (use the latter for start/end segments)."""
        return self._video_inputs(video, instruction, add_generation_prompt=False)

    def question_inputs(self, question: str, video=None):
        """A question with the video in context (the base model / teacher), or text-only with zero visual tokens
        when `video` is None (the adapter) -> (ids (1, T), pixels (F, 3, S, S) or None)."""
        if video is not None:
            return self._video_inputs(video, question, add_generation_prompt=True)
        msg = [{"role": "user", "content": [{"type": "text", "text": question}]}]
        return torch.tensor([self.encode(render_chat(msg, add_generation_prompt=True))]), None

    def training_pair(self, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """method.md §6.2: text-only [user: prompt][assistant: answer] -> (ids (U,), labels (U,)), labels -100 on the
        prompt and the generation prompt. The answer part is " answer<end_of_utterance>", tokenised on its own so
        the label boundary is exact (the pre-tokenizer splits there anyway, so ids equal the whole-string ones)."""
        msg = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        head = self.encode(render_chat(msg, add_generation_prompt=True))
        tail = self.encode(" " + answer + "<end_of_utterance>")
        return torch.tensor(head + tail), torch.tensor([-100] * len(head) + tail)


def pad_batch(seqs: list, pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, T) and mask (B, T). Left padding for prompts that are continued (generation, the
    internalization read-out: every sequence ends at the last column), right padding for teacher forcing."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, cols], mask[b, cols] = torch.as_tensor(s), 1
    return ids, mask


# ------------------------------------------------------------------------------------------------------ datasets
def _warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_row(row, need_target: bool) -> str | None:
    """Why a parsed manifest line is not a usable row, or None. Every field is checked for its type: a str() of
    a null target would train the model to say "None"."""
    if not isinstance(row, dict):
        return "not a JSON object"
    for key in ("video_path", "prompt") + (("target_text",) if need_target else ()):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return f"{key} is not a non-empty string"
    if not need_target and not isinstance(row.get("target_text", ""), str):
        return "target_text is not a string"
    if "id" in row and (not isinstance(row["id"], str) or not row["id"]):
        return f"id {row['id']!r} is not a non-empty string"
    start, end = row.get("start"), row.get("end")
    for key, value in (("start", start), ("end", end)):
        if value is not None and not (_number(value) and value >= 0):
            return f"{key} {value!r} is not a number of seconds >= 0"
    if start is not None and end is not None and end <= start:
        return f"end {end} is not after start {start}"
    return None


def read_manifest(path, data_root=None, need_target: bool = True) -> tuple[list[dict], int]:
    """Rows of a JSONL manifest ({"id", "video_path", "prompt", "target_text", optional "start"/"end" seconds, ...},
    the Frames2LoRA fields), with `video_path` resolved against `data_root`, else $V2L_DATA_ROOT, else the
    manifest's folder. A line that is not UTF-8, not JSON, or whose fields have the wrong type is skipped, and so is
    a row whose id an earlier row already has (ids key every cache, so one row must never get another's targets);
    the first few are named in a warning and all are counted. `need_target=False` reads a raw manifest, whose rows
    need no target yet (train.py teacher writes them). Returns (rows, number of skipped lines)."""
    path = Path(path)
    root = Path(data_root or os.environ.get("V2L_DATA_ROOT") or path.parent)
    rows, seen, skipped = [], set(), []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(f"{path}:{n}: malformed manifest line skipped (not UTF-8)")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append(f"{path}:{n}: malformed manifest line skipped (not JSON: {e.msg})")
            continue
        why = _check_row(row, need_target)
        if why is None and row.setdefault("id", f"{path.stem}:{n}") in seen:
            why = f"id {row['id']!r} repeats an earlier row's"
        if why is not None:
            skipped.append(f"{path}:{n}: malformed manifest line skipped ({why})")
            continue
        seen.add(row["id"])
        row["video_path"] = str(root / row["video_path"])       # an absolute path stays as it is
        rows.append(row)
    for msg in skipped[:3]:
        _warn(msg)
    if len(skipped) > 3:
        _warn(f"{path}: {len(skipped) - 3} more malformed lines skipped ({len(skipped)} in all)")
    return rows, len(skipped)


# ------------------------------------------------------------------------------------------- manifests from videos
# method.md §6.1: three kinds of span, each with its prompts; a SHA-256 hash of the row id picks a row's prompt, and
# the training mixture is 60 % scene / 30 % adjacent / 10 % full rows, the largest set that keeps those ratios.
SPAN_PROMPTS = {
    "scene": ("Describe what is happening in this scene.", "Write a short summary of this scene."),
    "adjacent": ("Summarize this video segment.", "Describe the sequence of events in this segment."),
    "full": ("Summarize this video in 1-3 sentences.",),
}
SPAN_MIX = {"scene": 0.6, "adjacent": 0.3, "full": 0.1}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"}


def sha_int(text: str) -> int:
    """A stable number from a string (SHA-256, first 8 bytes): the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def video_seconds(path) -> float:
    """A video's length in seconds from its container, decoding nothing (raises DecodeError)."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise DecodeError(f"{path}: no video stream")
            s = c.streams.video[0]
            if s.duration and s.time_base:
                return float(s.duration * s.time_base)
            if c.duration:
                return c.duration / av.time_base
            pts, _ = _scan(c, s)                                # Matroska/WebM may store no duration at all
            return float((pts[-1] - pts[0]) * s.time_base) if len(pts) > 1 else 0.0
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise DecodeError(f"{path}: not a readable video ({e})") from None


def _seconds(stamp) -> float:
    """FineVideo's "HH:MM:SS.mmm" (or a number) -> seconds."""
    if _number(stamp):
        return float(stamp)
    h, m, s = str(stamp).split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def finevideo_scenes(meta: dict) -> tuple[list[tuple[float, float, list[str], str]], str]:
    """A FineVideo video's JSON (the dataset's `json` column) -> ([(start, end, activity descriptions, fallback
    text)] per scene, the video's description). Scenes with unreadable or empty times are left out."""
    content = meta.get("content_metadata") or {}
    scenes = []
    for sc in content.get("scenes") or []:
        try:
            t = sc["timestamps"]
            start, end = _seconds(t["start_timestamp"]), _seconds(t["end_timestamp"])
        except (KeyError, TypeError, ValueError):
            continue
        if end > start:
            acts = [a["description"] for a in sc.get("activities") or []
                    if isinstance(a, dict) and isinstance(a.get("description"), str)]
            mood = sc.get("mood")
            mood = mood.get("description") if isinstance(mood, dict) else mood
            fallback = sc.get("title") if isinstance(sc.get("title"), str) else mood if isinstance(mood, str) else ""
            scenes.append((start, end, acts, fallback))
    description = content.get("description")
    return scenes, description if isinstance(description, str) else ""


def _fixed_scenes(seconds: float, span: float) -> list[tuple[float, float, list[str], str]]:
    """Without scene cuts: the video cut into equal spans of about `span` seconds, none of them the whole video."""
    n = max(1, round(seconds / span))
    edges = [seconds * i / n for i in range(n + 1)]
    return [(a, b, [], "") for a, b in zip(edges[:-1], edges[1:])] if n > 1 else []


def video_rows(path: Path, video_id: str, seconds: float, span: float, meta: dict | None) -> list[dict]:
    """Every candidate row of one video (method.md §6.1): each scene; each run of 2 or 3 consecutive scenes (a hash
    of the id picks 2 or 3); the whole video. Scenes come from FineVideo's metadata when there is some, else from
    `_fixed_scenes`. target_text is the original target (first 2 activities / first 4 / the description) where the
    metadata has one, else ""; the teacher replaces it either way (§6.2)."""
    scenes, description = finevideo_scenes(meta) if meta else ([], "")
    scenes = scenes or _fixed_scenes(seconds, span)
    rows = []

    def add(kind, key, target, start=None, end=None):
        rid = f"{video_id}#{key}"
        prompts = SPAN_PROMPTS[kind]
        rows.append({"id": rid, "video_id": video_id, "video_path": str(path), "span": kind,
                     **({"start": round(start, 3), "end": round(end, 3)} if start is not None else {}),
                     "prompt": prompts[sha_int(rid) % len(prompts)], "target_text": target})

    for k, (a, b, acts, fallback) in enumerate(scenes):
        add("scene", f"scene{k}", " ".join(acts[:2]) or fallback, a, b)
    for k in range(len(scenes) - 1):
        n = 3 if k + 3 <= len(scenes) and sha_int(f"{video_id}#adjacent{k}") % 2 else 2
        group = scenes[k:k + n]
        if len(group) < len(scenes) or meta:   # a group that is the whole video would repeat the full row
            add("adjacent", f"adjacent{k}+{n}", " ".join([x for g in group for x in g[2]][:4]), group[0][0],
                group[-1][1])
    add("full", "full", description)
    return rows


def mixture(rows: list[dict], mix: dict = SPAN_MIX) -> list[dict]:
    """The largest set of rows, without repeats, whose span kinds keep the ratios of `mix` (kinds without any row
    drop out and the rest keep their ratios); which rows is decided by a hash of their ids."""
    pools = {k: sorted((r for r in rows if r["span"] == k), key=lambda r: sha_int(r["id"])) for k in mix}
    share = {k: f for k, f in mix.items() if pools[k]}
    if not share:
        return []
    total = sum(share.values())
    n = min(len(pools[k]) * total / f for k, f in share.items())
    return [r for k, f in share.items() for r in pools[k][:min(len(pools[k]), round(n * f / total))]]


def split_by_video(rows: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Train/validation rows, split by video so no validation video is ever trained on: the videos whose hash
    comes first go to validation (at least one when there are two or more videos, never all). Validation rows are
    ordered by hash, so any first N of them mix the span kinds."""
    videos = sorted({r.get("video_id", r["video_path"]) for r in rows}, key=lambda v: sha_int(f"split:{v}"))
    n_val = 0 if len(videos) < 2 else min(len(videos) - 1, max(1, round(val_fraction * len(videos))))
    held = set(videos[:n_val])
    val = sorted((r for r in rows if r.get("video_id", r["video_path"]) in held), key=lambda r: sha_int(r["id"]))
    return [r for r in rows if r.get("video_id", r["video_path"]) not in held], val


def manifest_from_videos(folder, span: float = 30.0, out_dir=None) -> tuple[list[dict], dict]:
    """Rows for every video under `folder` (recursively; hidden files skipped), mixed as method.md §6.1 mixes them.
    A FineVideo JSON beside a video (same name, .json) gives its scenes and original targets. video_path is
    relative to `out_dir` (where the manifest will be written) when given. Returns (rows, counts)."""
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    rows, counts = [], {"videos": len(paths), "unreadable": 0, "with_metadata": 0}
    for p in paths:
        try:
            seconds = video_seconds(p)
        except DecodeError as e:
            _warn(f"video skipped: {e}")
            counts["unreadable"] += 1
            continue
        meta = None
        sidecar = p.with_suffix(".json")
        if sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_bytes().decode("utf-8"))
                counts["with_metadata"] += isinstance(meta, dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                _warn(f"{sidecar}: not a JSON file; {p.name} gets fixed-length spans")
        where = os.path.relpath(p.resolve(), Path(out_dir).resolve()) if out_dir else p
        rows += video_rows(where, p.relative_to(folder).as_posix(), seconds, span,
                           meta if isinstance(meta, dict) else None)
    mixed = mixture(rows)
    counts.update({k: sum(r["span"] == k for r in rows) for k in SPAN_MIX})
    counts.update({f"{k}_kept": sum(r["span"] == k for r in mixed) for k in SPAN_MIX})
    keep = {r["id"] for r in mixed}
    return [r for r in rows if r["id"] in keep], counts


def plan_segments(start: float, end: float, n: int | None, seconds: float | None) -> list[tuple[float, float]]:
    """[start, end) cut into n equal parts, or into parts of `seconds` (the last one shorter); non-overlapping."""
    if seconds:
        n_parts = max(1, math.ceil((end - start) / seconds - 1e-6))  # no sliver from float rounding
        edges = [start + i * seconds for i in range(n_parts)] + [end]
    else:
        n = n or 1
        edges = [start + (end - start) * i / n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


class VideoTextDataset(torch.utils.data.Dataset):
    """One item per manifest row: the video's internalization inputs plus the text-only training pair. Rows whose
    video is missing are dropped up front; one that fails to decode yields None, which `collate` drops; both are
    counted (`summary()`; with DataLoader workers, decode failures are counted in the batch's "skipped").

    `cache_mb` > 0 keeps each video's processed inputs in memory, up to that many MB (per DataLoader worker), so a
    clip asked about in several rows, or seen again next epoch, is decoded once. Worth it when the frames are
    small or the set fits in RAM (the toy world: decoding was half of a training step); off by default.

    Two more views of the same clip, for training's options beyond the paper's recipe:
    - teacher_view (its KL term): the teacher's input, [user: video, prompt] + generation prompt + the answer, so
      its logits on the answer line up with the student's;
    - compose_prob > 0 (composition training): that fraction of rows, chosen by a hash of (seed, row id), read
      their clip as two halves, each decoded and internalized on its own exactly as `internalize.py --segments 2`
      does; the two adapters are composed in rank space and the composed adapter answers the row. compose_where (a
      manifest field, dotted into nested objects, e.g. spec.two_part) limits that to rows where the field is true:
      videos whose halves show different things. An index may come as (row index, composable): train.py's sampler
      says False before --compose-from.
    """

    def __init__(self, manifest, processor: Processor, data_root=None, cache_mb: float = 0, limit: int | None = None,
                 teacher_view: bool = False, compose_prob: float = 0.0, seed: int = 0, compose_where: str | None = None):
        self.manifest, self.proc = Path(manifest), processor
        rows, self.malformed = read_manifest(manifest, data_root)   # malformed, mistyped and repeated-id lines
        self.rows = [r for r in rows if Path(r["video_path"]).is_file()][:limit]
        self.missing, self.undecodable = len(rows) - len(self.rows), 0
        self.cache: dict[str, tuple] = {}
        self.cache_left = int(cache_mb * 2**20)
        self.teacher_view, self.compose_prob, self.seed = teacher_view, compose_prob, seed
        self.compose_where = compose_where.split(".") if compose_where else None

    def __len__(self):
        return len(self.rows)

    @staticmethod
    def video_key(row: dict) -> str:
        """What a row's clip is: its file, and its [start, end) span when it has one (every cache keys on this)."""
        start, end = row.get("start"), row.get("end")
        return row["video_path"] if start is None and end is None else f"{row['video_path']}#{start!r}-{end!r}"

    def __getitem__(self, key):
        i, self.composable = key if isinstance(key, tuple) else (key, True)
        row = self.rows[i]
        clip_key = self.video_key(row)
        if clip_key in self.cache:
            return self.item(row, *self.cache[clip_key])
        try:
            span = {k: row[k] for k in ("start", "end") if row.get(k) is not None}
            clip = self.proc.load_video(row["video_path"], **span)
        except DecodeError as e:
            self.undecodable += 1
            _warn(f"row {row['id']} skipped: {e}")
            return None
        ctx_ids, pixels = self.proc.internalization_inputs(clip)
        size = sum(getattr(f, "nbytes", 0) for f in clip.frames) + sum(t.numel() * t.element_size()
                                                                         for t in (ctx_ids, pixels))
        if size <= self.cache_left:
            self.cache[clip_key], self.cache_left = (clip, ctx_ids, pixels), self.cache_left - size
        return self.item(row, clip, ctx_ids, pixels)

    def item(self, row: dict, clip: Clip, ctx_ids: torch.Tensor, pixels: torch.Tensor) -> dict | None:
        """One decoded row -> the tensors `collate` pads."""
        ids, labels = self.proc.training_pair(row["prompt"], row["target_text"])
        out = {"id": row["id"], "pixel_values": pixels, "ctx_ids": ctx_ids[0], "ids": ids, "labels": labels,
               "ctx_keys": [self.video_key(row)]}  # what the VLM encodes, by name (train.py's HiddenCache)
        if self.teacher_view:  # the same decoded clip, as the teacher saw it: video in context, then the answer
            head, _ = self.proc.question_inputs(row["prompt"], video=clip)
            tail = labels[labels != -100]
            out["t_ids"] = torch.cat([head[0], tail])
            out["t_labels"] = torch.cat([torch.full_like(head[0], -100), tail])
        if self.compose_prob > 0 and getattr(self, "composable", True) and self.composed(row):
            try:
                t0 = row.get("start") or 0.0  # the halves of the row's own span, in the file's seconds
                spans = plan_segments(t0, t0 + clip.duration, 2, None)
                out["segments"] = [self.segment_inputs(row["video_path"], s, e) for s, e in spans]
                out["ctx_keys"] = [f"{row['video_path']}#{s!r}-{e!r}" for s, e in spans]
            except DecodeError as e:
                self.undecodable += 1
                _warn(f"row {row['id']} skipped: {e}")
                return None
        return out

    def composed(self, row: dict) -> bool:
        """Whether this row trains a composed adapter: fixed per (seed, row id), so a resumed run agrees."""
        if self.compose_where:
            value = row
            for key in self.compose_where:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not True:
                return False
        return zlib.crc32(f"{self.seed}:{row['id']}".encode()) < self.compose_prob * 2**32

    def segment_inputs(self, path: str, start: float, end: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(ctx_ids (T,), pixels (F, 3, S, S)) of one segment, as internalize.encode_segment reads it."""
        key = f"{path}#{start!r}-{end!r}"
        if key not in self.cache:
            ids, pixels = self.proc.internalization_inputs(self.proc.load_video(path, start=start, end=end))
            size = sum(t.numel() * t.element_size() for t in (ids, pixels))
            if size > self.cache_left:
                return ids[0], pixels
            self.cache[key], self.cache_left = (ids[0], pixels), self.cache_left - size
        return self.cache[key]

    def summary(self) -> str:
        usable = len(self.rows) - self.undecodable
        return (f"{self.manifest.name}: {usable} usable rows; skipped {self.malformed} malformed lines, "
                f"{self.missing} missing videos, {self.undecodable} undecodable videos")

    def collate(self, items: list) -> dict | None:
        """Pad a batch. Internalization ids are LEFT-padded (B, T) with a mask, so every sequence ends at the same
        position; training ids are RIGHT-padded (B, U) with labels -100 on padding. pixel_values (sum F, 3, S, S)
        holds every sample's frames in order, `n_frames` (B,) says how many each has. None if nothing decoded.
        With composed rows, ctx_* hold every segment as its own video and `owner` (N,) the row each belongs to."""
        kept = [x for x in items if x is not None]
        if not kept:
            return None
        ctx_ids, ctx_mask = pad_batch([x["ctx_ids"] for x in kept], self.proc.pad_id, "left")
        ids, mask = pad_batch([x["ids"] for x in kept], self.proc.pad_id, "right")
        labels, _ = pad_batch([x["labels"] for x in kept], -100, "right")
        out = {"row_ids": [x["id"] for x in kept], "skipped": len(items) - len(kept),
               "pixel_values": torch.cat([x["pixel_values"] for x in kept]),
               "n_frames": torch.tensor([len(x["pixel_values"]) for x in kept]),
               "ctx_ids": ctx_ids, "ctx_mask": ctx_mask, "input_ids": ids, "attention_mask": mask, "labels": labels,
               "ctx_keys": [k for x in kept for k in x["ctx_keys"]]}  # one per sequence the VLM encodes, in order
        if self.teacher_view:
            out["t_ids"], out["t_mask"] = pad_batch([x["t_ids"] for x in kept], self.proc.pad_id, "right")
            out["t_labels"], _ = pad_batch([x["t_labels"] for x in kept], -100, "right")
        if any("segments" in x for x in kept):
            # pixel_values keeps the whole clips (the teacher view reads them).
            segs = [(i, *s) for i, x in enumerate(kept) for s in x.get("segments", [(x["ctx_ids"], x["pixel_values"])])]
            out["ctx_ids"], out["ctx_mask"] = pad_batch([s[1] for s in segs], self.proc.pad_id, "left")
            out["ctx_pixels"] = torch.cat([s[2] for s in segs])
            out["owner"] = torch.tensor([s[0] for s in segs])
            out["composed"] = sum("segments" in x for x in kept)
        return out
