"""Ask questions about an internalized video: the answer comes from the adapter alone, zero visual tokens.

    python ask.py adapter.safetensors "What happens after the dog jumps?"
    python ask.py adapter.safetensors "Q1" "Q2" --timing       # loaded once, any number of questions
    python ask.py adapter.safetensors - < questions.txt        # one question per line; no question: a prompt
    python ask.py --video clip.mp4 "Q"                         # baseline: the video in context, no adapter
    python ask.py --no-adapter "Q"                             # the base model from the text alone

Spec: ../shared/design/method.md §5. The prompt is the text-only chat turn
`<|im_start|>User: {q}<end_of_utterance>\\nAssistant:`; the adapter's A and B (adapter.py) go to every forward as
the `lora` argument, y = W x + alpha B^T (A x). The base model is the one the adapter names in its metadata, and
loading checks the adapter really belongs to it. Decoding is greedy with 128 new tokens unless told otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import data
import model as M
from adapter import Adapter, AdapterError, check_base, load_adapter
from internalize import Base, load_base


def split_inputs(args) -> tuple[Path | None, list[str]]:
    """The first positional is the adapter, unless --video/--no-adapter make it optional: then only a
    *.safetensors first positional is one (it names the base model to compare on)."""
    pos = list(args.inputs)
    if args.video is None and not args.no_adapter:
        if not pos:
            raise SystemExit("error: give an adapter file (or --video CLIP / --no-adapter)")
        return Path(pos[0]), pos[1:]
    if pos and pos[0].endswith(".safetensors"):
        return Path(pos[0]), pos[1:]
    return None, pos


def questions(given: list[str]):
    """Arguments in order; "-" reads stdin, one question per line; none: an interactive prompt on a terminal,
    else stdin lines. Yields (question, interactive)."""
    if not given:
        given = ["-"] if not sys.stdin.isatty() else []
        if not given:
            while True:
                try:
                    q = input("> ").strip()
                except (EOFError, KeyboardInterrupt):
                    print(file=sys.stderr)
                    return
                if q in ("", "exit", "quit"):
                    return
                yield q, True
    for q in given:
        if q == "-":
            yield from ((line.strip(), False) for line in sys.stdin if line.strip())
        else:
            yield q, False


def resolve_base(args, meta: dict | None):
    """--model / --size override; else the adapter's own base (preset size, else its folder); else tiny."""
    if args.model or args.size or meta is None:
        return args.size or "tiny", args.model
    if meta.get("base_size"):
        return meta["base_size"], None
    folder = Path(meta["base_model_dir"])
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: the adapter's base model folder {folder} is gone; pass --model DIR")
    return None, str(folder)


def answer(base: Base, question: str, adapter: Adapter | None = None, video=None, max_new_tokens: int = 128,
           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stream=None) -> dict:
    """One answer from the base model (internalize.Base or Models): with `adapter` the LoRA carries the video and the
    prompt is text only (method.md §5); with `video` (a path, or a Clip from base.proc.load_video, decoded once for
    many questions) the video is in context, the paper's baseline; with neither, the text alone. Greedy unless
    temperature > 0. `stream(text)` receives each new piece of the answer as soon as it decodes cleanly."""
    proc = base.proc
    if adapter is not None and video is not None:
        raise ValueError("an answer comes from the adapter or from the video in context, not both")
    ids, pixels = proc.question_inputs(question, video)                 # (1, T), (F, 3, S, S) | None
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
            "input_tokens": ids.shape[1], "visual_tokens": int((ids == proc.image_token_id).sum()),
            "new_tokens": len(out), "ttft_s": stamps[0] - t0 if stamps else None, "tokens_per_s": rate,
            "total_s": t1 - t0}


class Session:
    """What every question of one call reuses: the base model, the adapter, or the baseline's decoded video."""

    def __init__(self, args):
        self.args = args
        path, self.qs = split_inputs(args)
        try:
            self.adapter = load_adapter(path) if path else None
            meta = self.adapter.meta if self.adapter else {}
            size, model_dir = resolve_base(args, meta or None)
            self.base = load_base(size, model_dir, args.device, args.dtype, args.frames or meta.get("frames", 12),
                                  args.video_size or meta.get("video_size"))
            if self.adapter:
                check_base(self.adapter, self.base.vlm, path)
        except (AdapterError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        self.clip = None
        if args.video:  # decoded once: every question reuses the frames, as a chat with the video would
            try:
                self.clip = self.base.proc.load_video(args.video)
            except data.DecodeError as e:
                raise SystemExit(f"error: {e}") from None
        self.use = self.adapter if self.adapter and not (args.video or args.no_adapter) else None
        what = self.use.describe() if self.use else ("video" if args.video else "text") + " mode, no adapter"
        dtype = str(next(self.base.vlm.parameters()).dtype).replace("torch.", "")
        print(f"device {self.base.device}, {dtype}; {what}", file=sys.stderr)

    def answer(self, question: str, stream) -> dict:
        a = self.args
        return answer(self.base, question, self.use, self.clip, a.max_new_tokens, a.temperature, a.top_p, a.seed,
                      stream)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="ADAPTER/QUESTION",
                   help="adapter.safetensors, then questions ('-' = one per line from stdin)")
    p.add_argument("--video", default=None, help="baseline: answer with this video in context, no adapter")
    p.add_argument("--no-adapter", action="store_true", help="answer from the question text alone")
    p.add_argument("--size", default=None, help="override the base model: tiny, 256M, 500M, 2.2B")
    p.add_argument("--model", default=None, help="override the base model folder")
    p.add_argument("--frames", type=int, default=None, help="--video frames (default: the adapter's, else 12)")
    p.add_argument("--video-size", type=int, default=None, help="--video frame size (default: the adapter's)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="base model weights (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (method: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when --temperature > 0")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--timing", action="store_true", help="print time to first token, decode tokens/s (steps after the first), input tokens")
    p.add_argument("--json", action="store_true", help="one JSON object per answer on stdout, no streaming")
    args = p.parse_intermixed_args(argv)  # options may sit between the adapter and the questions
    if args.video and args.no_adapter:
        p.error("--video and --no-adapter are two different modes; pick one")
    return args


def timing_line(r: dict) -> str:
    rate = f"{r['tokens_per_s']:.1f} tok/s" if r["tokens_per_s"] else "- tok/s"
    ttft = f"{r['ttft_s'] * 1000:.1f} ms" if r["ttft_s"] is not None else "-"
    return (f"[{r['mode']}] TTFT {ttft} | {r['new_tokens']} tokens, {rate} | "
            f"input {r['input_tokens']} tokens ({r['visual_tokens']} visual)")


def main(argv=None):
    args = parse_args(argv)
    session = Session(args)
    many = len(session.qs) > 1 or session.qs == ["-"] or (not session.qs and not sys.stdin.isatty())
    for q, interactive in questions(session.qs):
        if args.json:
            print(json.dumps(session.answer(q, lambda s: None)), flush=True)
            continue
        if many and not interactive:
            print(f"Q: {q}\nA: ", end="", flush=True)
        started = [False]

        def stream(piece):  # the answer starts with a space (the prompt ends at "Assistant:"): drop it
            if not started[0]:
                piece = piece.lstrip()
                started[0] = bool(piece)
            print(piece, end="", flush=True)

        r = session.answer(q, stream)
        print(flush=True)
        if args.timing:
            print(timing_line(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
