"""Ask questions about an internalized video: the answer comes from the adapter alone, zero visual tokens.

    python ask.py adapter.safetensors "What happens after the dog jumps?"
    python ask.py adapter.safetensors "Q1" "Q2" --timing       # loaded once, any number of questions
    python ask.py a.safetensors b.safetensors adapters/ "Q"    # several adapters (or a folder): one base load
    python ask.py adapter.safetensors - < questions.txt        # one question per line; no question: a prompt
    python ask.py --video clip.mp4 "Q"                         # baseline: the video in context, no adapter
    python ask.py --no-adapter "Q"                             # the base model from the text alone

Spec: ../shared/design/method.md §5. The prompt is the text-only chat turn
`<|im_start|>User: {q}<end_of_utterance>\\nAssistant:`; the adapter's A and B (adapter.py) go to every forward as
the `lora` argument, y = W x + alpha B^T (A x). Decoding is greedy with 128 new tokens unless told otherwise.

The base model: --model DIR or --size if given, else the shipped tiny base when the adapters were made on it.
An adapter made on a released size names it, but loading (perhaps downloading) that model is the user's call:
pass --size, or --trust-adapter-base. Loading checks that every adapter really belongs to the base (adapter.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import data
import model as M
from adapter import Adapter, ArgumentParser, check_base, finite, is_ours, load_adapter, run_cli
from internalize import Base, load_base, looks_like_toy_world, note

MAX_LINE = 1 << 20   # bytes: a longer stdin "question" is not one (every released context is far shorter)


# ------------------------------------------------------------------------------------------------ answering
def answer(base: Base, question: str, adapter: Adapter | None = None, video=None, max_new_tokens: int = 128,
           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stream=None) -> dict:
    """One answer from the base model (internalize.Base or Models): with `adapter` the LoRA carries the video and the
    prompt is text only (method.md §5); with `video` (a path, or a Clip from base.proc.load_video, decoded once for
    many questions) the video is in context, the paper's baseline; with neither, the text alone. Greedy unless
    temperature > 0. `stream(text)` receives each new piece of the answer as soon as it decodes cleanly.
    Raises ValueError (one line) for settings out of range or a prompt past the model's context."""
    proc = base.proc
    if adapter is not None and video is not None:
        raise ValueError("an answer comes from the adapter or from the video in context, not both")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0) or not (0 < top_p <= 1):
        raise ValueError(f"--temperature must be a number >= 0 and --top-p in (0, 1], got {temperature}, {top_p}")
    ids, pixels = proc.question_inputs(question, video)                 # (1, T), (F, 3, S, S) | None
    proc.check_length(ids.shape[1], max_new_tokens, "the question" + (" with its video" if video is not None else ""))
    ids = ids.to(base.device)
    pixels = pixels.to(base.device) if pixels is not None else None
    lora = adapter.lora(base.device) if adapter is not None else None
    gen = torch.Generator(base.device).manual_seed(seed) if seed is not None else None
    tokens, shown, stamps = [], [""], []

    def on_token(nxt):  # nxt (1,): called once per new token, after it is computed
        tokens.append(int(nxt[0]))                                       # int() waits for the GPU
        stamps.append(time.perf_counter())
        text = proc.decode(tokens)
        if stream is not None and not text.endswith("\ufffd"):          # never print half a UTF-8 character
            stream(text[len(shown[0]):])
            shown[0] = text

    t0 = time.perf_counter()
    out = M.generate(base.vlm, ids, pixel_values=pixels, lora=lora, lora_alpha=adapter.alpha if adapter else 128.0,
                     max_new_tokens=max_new_tokens, eos_token_id=proc.eou_id, temperature=temperature, top_p=top_p,
                     generator=gen, on_token=on_token)[0]
    t1 = time.perf_counter()
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    return {"question": question, "answer": proc.decode(out).strip(),
            "mode": "adapter" if adapter is not None else "video" if video is not None else "text",
            **source(adapter, video), "input_tokens": ids.shape[1],
            "visual_tokens": int((ids == proc.image_token_id).sum()), "new_tokens": len(out),
            "ttft_s": stamps[0] - t0 if stamps else None, "tokens_per_s": rate, "total_s": t1 - t0}


def source(adapter: Adapter | None, video) -> dict:
    """What an answer is about: the adapter file and the video span it holds, or the video in context."""
    if adapter is not None:
        m = adapter.meta
        out = {"adapter": str(adapter.path) if adapter.path else None, "video": m["video"], "start": m["start"],
               "end": m["end"]}
        if m["video"] is None:   # composed from several videos: each segment's source
            out["segments"] = [{"video": s["video"], "start": s["start"], "end": s["end"]} for s in m["segments"]]
        return out
    if isinstance(video, data.Clip):
        return {"adapter": None, "video": video.source, "start": 0.0, "end": round(video.span, 6)}
    return {"adapter": None, "video": Path(video).name if video is not None else None, "start": None, "end": None}


# ------------------------------------------------------------------------------------------------ inputs
def split_inputs(args) -> tuple[list[Path], list[str]]:
    """Leading positionals that are *.safetensors files or folders are adapters; the rest are questions. With
    --video / --no-adapter no adapter is needed (one given still names the base model to compare on)."""
    pos, adapters = list(args.inputs), []
    while pos and (pos[0].endswith(".safetensors") or _is_dir(pos[0])):
        adapters.append(Path(pos.pop(0)))
    if not adapters and args.video is None and not args.no_adapter:
        raise ValueError("give an adapter file (or --video CLIP / --no-adapter)")
    return adapters, pos


def _is_dir(text: str) -> bool:
    try:
        return Path(text).is_dir()
    except (OSError, ValueError):   # a long question is no path (ENAMETOOLONG), nor one with a NUL
        return False


def adapter_files(paths: list[Path]) -> list[Path]:
    """Files as given; a folder: the adapters in it, in name order (other .safetensors files skipped, noted)."""
    out = []
    for p in paths:
        if not p.is_dir():
            out.append(p)
            continue
        found = sorted(p.glob("*.safetensors"))
        mine = [f for f in found if is_ours(f) and not (f.parent / "adapter_config.json").is_file()]
        for f in sorted(set(found) - set(mine)):
            note(f"note: skipped {f} (not a Video2LoRA adapter)")
        if not mine:
            raise ValueError(f"{p}: no Video2LoRA adapters in this folder")
        out += mine
    return out


def stdin_questions():
    """stdin, one question per line, as UTF-8 text. Binary junk or a line past MAX_LINE is a one-line ValueError."""
    buf = getattr(sys.stdin, "buffer", None)
    lines = iter(lambda: buf.readline(MAX_LINE + 1), b"") if buf is not None else (x.encode() for x in sys.stdin)
    for n, raw in enumerate(lines, 1):
        if len(raw) > MAX_LINE:
            raise ValueError(f"stdin line {n} is over {MAX_LINE >> 20} MB: give one question per line")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"stdin line {n} is not UTF-8 text (binary input?); give one question per line") from None
        if "\x00" in line:
            raise ValueError(f"stdin line {n} holds NUL bytes: binary input, not a question")
        if line.strip():
            yield line.strip()


def questions(given: list[str]):
    """Arguments in order; "-" reads stdin, one question per line; none: an interactive prompt on a terminal,
    else stdin lines. Yields (question, interactive)."""
    if not given:
        given = ["-"] if not sys.stdin.isatty() else []
        if not given:
            while True:
                try:
                    q = input("> ").strip()
                except EOFError:
                    print(file=sys.stderr)
                    return
                if q in ("", "exit", "quit"):
                    return
                yield q, True
    for q in given:
        if q == "-":
            yield from ((line, False) for line in stdin_questions())
        else:
            yield q, False


def resolve_base(args, adapters: list[Adapter]) -> tuple[str | None, str | None]:
    """(size, model folder) to load. --model / --size decide; else the shipped tiny base, which the adapters may
    select; a released size they name only with the user's consent (--size or --trust-adapter-base)."""
    first = adapters[0] if adapters else None
    for a in adapters[1:]:
        if (a.meta["base_config_sha256"], a.meta["base_weights_sha256"]) != \
                (first.meta["base_config_sha256"], first.meta["base_weights_sha256"]):
            raise ValueError(f"{first.path} and {a.path} were made on different base models ({first.meta['base_model']}"
                             f" vs {a.meta['base_model']}); ask them in separate calls")
    if args.model:
        return None, args.model
    wanted = first.meta["base_size"] if first else None
    if args.size:
        if wanted and wanted != args.size:
            raise ValueError(f"{first.path} was made on the {wanted} base model, not --size {args.size}")
        return args.size, None
    if first is None or wanted == "tiny":
        return "tiny", None
    if wanted is None:
        raise ValueError(f"{first.path} was made on a local base model ({first.meta['base_model']!r}); pass "
                         "--model DIR (its folder)")
    if not args.trust_adapter_base:
        raise ValueError(f"{first.path} was made on {M.PRESETS[wanted]}; to load it (from the Hugging Face cache, "
                         f"or downloaded) pass --size {wanted} or --trust-adapter-base")
    return wanted, None


class Session:
    """What every question of one call reuses: the base model, the adapters, or the baseline's decoded video."""

    def __init__(self, args):
        self.args = args
        paths, self.qs = split_inputs(args)
        self.adapters = [load_adapter(p) for p in adapter_files(paths)]   # cheap, and checked before the base
        size, model_dir = resolve_base(args, self.adapters)
        meta = self.adapters[0].meta if self.adapters else {}
        self.base = load_base(size, model_dir, args.device, args.dtype, args.frames or meta.get("frames", 12),
                              args.video_size or meta.get("video_size"), check=self.check_inputs)
        for a in self.adapters:
            check_base(a, self.base.vlm, a.path)
        self.clip = None
        if args.video:  # decoded once: every question reuses the frames, as a chat with the video would
            self.clip = self.base.proc.load_video(args.video)
            if self.base.meta["base_size"] == "tiny" and not looks_like_toy_world(torch.stack(self.clip.frames)):
                note(f"note: {self.clip.source} does not look like the toy world; the shipped tiny base only knows "
                     "coloured shapes on black, so expect answers about shapes")
        self.use = self.adapters if self.adapters and not (args.video or args.no_adapter) else [None]
        what = self.use[0].describe() if len(self.use) == 1 and self.use[0] else \
            f"{len(self.use)} adapters" if self.use[0] else ("video" if args.video else "text") + " mode, no adapter"
        dtype = str(next(self.base.vlm.parameters()).dtype).replace("torch.", "")
        print(f"device {self.base.device}, {dtype}; {what}", file=sys.stderr)

    def check_inputs(self, proc: data.Processor):
        """Before the weights load: the numbers and every question given as an argument fit the context."""
        a = self.args
        if a.max_new_tokens >= proc.context:
            raise ValueError(f"--max-new-tokens {a.max_new_tokens} is past the base model's context of "
                             f"{proc.context} tokens")
        for q in (q for q in self.qs if q != "-"):
            if a.video:
                proc.check_frames(proc.max_frames, q, a.max_new_tokens)
            else:
                proc.check_length(proc.question_inputs(q)[0].shape[1], a.max_new_tokens)

    def answer(self, question: str, adapter: Adapter | None, stream) -> dict:
        a = self.args
        return answer(self.base, question, adapter, self.clip, a.max_new_tokens, a.temperature, a.top_p, a.seed,
                      stream)


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="ADAPTER/QUESTION",
                   help="adapter .safetensors file(s) or folder(s), then questions ('-' = one per line from stdin)")
    p.add_argument("--video", default=None, help="baseline: answer with this video in context, no adapter")
    p.add_argument("--no-adapter", action="store_true", help="answer from the question text alone")
    p.add_argument("--size", default=None, help="the base model: tiny, 256M, 500M, 2.2B (may download it)")
    p.add_argument("--model", default=None, help="the base model's folder (needed for adapters of a local base)")
    p.add_argument("--trust-adapter-base", action="store_true",
                   help="load the released base model the adapter names (may download GBs)")
    p.add_argument("--frames", type=int, default=None, help="--video frames (default: the adapter's, else 12)")
    p.add_argument("--video-size", type=int, default=None, help="--video frame size (default: the adapter's)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="base model weights (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (method: 128)")
    p.add_argument("--temperature", type=finite, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=finite, default=1.0, help="nucleus sampling mass when --temperature > 0, (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--timing", action="store_true", help="print time to first token, decode tokens/s (steps after the first), input tokens")
    p.add_argument("--json", action="store_true", help="one JSON object per answer on stdout, no streaming")
    args = p.parse_intermixed_args(argv)  # options may sit between the adapter and the questions
    if args.video and args.no_adapter:
        p.error("--video and --no-adapter are two different modes; pick one")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.frames is not None and args.frames < 1:
        p.error("--frames must be >= 1")
    if args.video_size is not None and not 1 <= args.video_size <= data.MAX_VIDEO_SIZE:
        p.error(f"--video-size must be between 1 and {data.MAX_VIDEO_SIZE} px (released models read 384)")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        p.error("--seed must be between 0 and 2^63 - 1")
    return args


def timing_line(r: dict) -> str:
    rate = f"{r['tokens_per_s']:.1f} tok/s" if r["tokens_per_s"] else "- tok/s"
    ttft = f"{r['ttft_s'] * 1000:.1f} ms" if r["ttft_s"] is not None else "-"
    return (f"[{r['mode']}] TTFT {ttft} | {r['new_tokens']} tokens, {rate} | "
            f"input {r['input_tokens']} tokens ({r['visual_tokens']} visual)")


def main(argv=None):
    args = parse_args(argv)
    try:
        session = Session(args)
    except data.DecodeError as e:
        raise SystemExit(f"error: {e}") from None
    several = len(session.use) > 1
    many = len(session.qs) > 1 or session.qs == ["-"] or (not session.qs and not sys.stdin.isatty())
    for q, interactive in questions(session.qs):
        if (many or several) and not interactive and not args.json:
            print(f"Q: {q}", flush=True)
        for adapter in session.use:   # every adapter answers each question in turn
            if args.json:
                print(json.dumps(session.answer(q, adapter, None)), flush=True)
                continue
            print(f"[{adapter.path}] " if several else "A: " if many and not interactive else "", end="", flush=True)
            started = [False]

            def stream(piece):  # the answer starts with a space (the prompt ends at "Assistant:"): drop it
                if not started[0]:
                    piece = piece.lstrip()
                    started[0] = bool(piece)
                print(piece, end="", flush=True)

            r = session.answer(q, adapter, stream)
            print(flush=True)
            if args.timing:
                print(timing_line(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_cli(main)
