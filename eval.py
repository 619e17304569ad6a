"""Evaluate on a video benchmark: the same frozen SmolVLM2 answers each prompt with the video in context, from the
video's adapter alone (zero visual tokens) and from the text alone; then the paper's paired statistics.

    python eval.py activitynet-qa --annotations val_q.json val_a.json --videos anet/ --size 500M
    python eval.py nextqa --annotations nextqa/val.csv map_vid_vidorID.json --videos NExTVideo/ --size 2.2B
    torchrun --nproc-per-node 8 eval.py activitynet-captions --annotations val_1.json --videos anet/ --size 500M
    python eval.py toy --kinds color,shape,direction,count     # the toy world's fidelity row, shipped checkpoints
    python eval.py vdc --report --judge-url http://localhost:8000/v1 --judge-model NAME   # grade what is written

Spec: ../shared/design/method.md §8-§9. Answers are greedy, --max-new-tokens 128, 12 frames at 384 px (§11).
Conditions: "video" = the prompt with the video (or its segment) in context, the paper's Base; "adapter" = the
text-only prompt with the segment's adapter installed, F2L; "text" = the text-only prompt, no adapter (a control).

Benchmarks and the public files each reader was matched to (--annotations; videos are looked up under --videos as
NAME, NAME.mp4, .mkv, .webm, .avi or .mov):
  activitynet-captions  train.json / val_1.json / val_2.json of captions.zip (cs.stanford.edu/people/ranjaykrishna/
      densevid): {"v_ID": {"duration": s, "timestamps": [[start, end], ...], "sentences": [...]}}. One item per
      sentence; its segment is internalized on its own. Video v_ID (or ID). The paper's prompt is unpublished; we
      ask the scene prompt the hypernetwork trained on (§6.1).
  activitynet-qa  dataset/{split}_q.json + {split}_a.json of github.com/MILVLG/activitynet-qa: [{"video_name",
      "question", "question_id"}] and [{"answer", "type", "question_id"}] (the _a file defaults to the _q file's
      sibling). Video v_NAME (or NAME). Prompt: the raw question. Kind: the answer type (its dataset/README.md).
  nextqa  NExT-QA open-ended, github.com/doc-doc/NExT-OE dataset/nextqa/{val,test}.csv: video, frame_count, width,
      height, question, answer, qid, type; then map_vid_vidorID.json of NExT-QA ({"video": "0000/video"}; default:
      beside the csv). add_reference_answer_{split}.json beside the csv ({video: {qid: answer}}) adds a reference.
  vdc  VDC_1k.jsonl of huggingface.co/datasets/wchai/Video-Detailed-Caption, read as github.com/rese1f/aurora
      post_eval/process_vdc_result.py reads it: {"video_id", "captions": {"short_caption", "detailed_caption",
      "background_caption", "main_object_caption", "camera_caption"}}. Five items per video, kind = style; each
      prompt is one of VDC's own (aurora src/lmms-eval/lmms_eval/tasks/vdc/utils.py).
  jsonl  ours, one object per line: {"video": path (under --videos, default the file's folder), "prompt": str,
      "references": [str, ...], optional "start"/"end" (seconds: internalize that segment), "id", "kind"}.
  toy  the toy world's held-out manifest (clips written by the toy world's `clips` command): {"id", "video_path",
      "prompt", "target_text", "kind"}; scored by the toy world's first-word rule (toyworld.md).

Metrics. f1 / em: SQuAD v2.0 evaluation script: lower-case, drop punctuation, drop the articles a/an/the, collapse
whitespace; token-level F1 (bag of words) and exact match; max over references; empty vs empty counts 1.
first_word: the answer's first word equals a one-word reference (a longer reference must match word for word).
judge (--judge-url): an OpenAI-compatible chat endpoint grades each answer against the references with JUDGE_PROMPT
at temperature 0; the integer 0-5 it returns is rescaled to [0, 1] as score / 5 (method.md §8: judge unknown).
BLEU / ROUGE / CIDEr are not built in: the paper's tables use only the judge and token F1.

Statistics, per metric and kind, over the items every condition answered: n, the means, the paired difference
D = mean(adapter - in context), its 95 % percentile bootstrap CI (items resampled with replacement as pairs, 4000
resamples, seed 0; --bootstrap-unit video resamples whole videos, a cluster bootstrap, since the questions on one
video are not independent). Margin: delta = --margin, or --margin-rel rho x (in-context mean), rho = 0.4 by default
(method.md §8: reproduces every flag of the paper). NI <=> CI_low > -delta; Eq <=> -delta < CI_low and CI_high < delta.

Files in --out: config.json (what the answers depend on; a rerun with other settings is refused); answers.jsonl,
or answers.rank{R}.jsonl for rank R of W under torchrun (RANK, WORLD_SIZE, LOCAL_RANK: every W-th video, this
node's GPU LOCAL_RANK), one line per (item, condition), appended, flushed and fsynced as it comes. A rerun skips every
pair any answers file holds and answers a cut-short last line again. Ranks never wait for each other: whichever
completes the set prints the table, so a crashed rank is rerun alone (RANK=3 WORLD_SIZE=8 python eval.py ...).
judge.jsonl caches the judge's grades; adapters/ holds one adapter per video span, reused by every prompt on it;
report.md and report.json hold the table.
"""
from __future__ import annotations

import argparse, csv, hashlib, io, json, os, re, string, sys, time, urllib.error, urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import model as M
from adapter import AdapterError, load_adapter, run_cli, save_adapter, write_atomic
from internalize import internalize, load_models

CONDITIONS = {"video": "in context", "adapter": "adapter", "text": "text only"}
VIDEO_EXTS = ("", ".mp4", ".mkv", ".webm", ".avi", ".mov")


class EvalError(ValueError):
    """A user-caused problem (bad file, bad flag, unreachable judge); the message is one line."""


@dataclass(frozen=True)
class Item:
    id: str
    video: str                       # a file name or relative path candidate; resolve() makes it a path
    prompt: str
    references: tuple[str, ...]
    kind: str = ""
    start: float | None = None       # seconds; None = the video's start / end
    end: float | None = None
    alt: tuple[str, ...] = ()        # other names the video may have (ActivityNet: with or without "v_")


# ------------------------------------------------------------------------------------------------ readers
def read_text(path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: unreadable annotation file ({e})") from None


def load_json(path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: unreadable annotation file ({e})") from None


def jsonl_rows(path):
    """(line number, object) for each non-blank line; a line that is not JSON is an error naming it."""
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not JSON ({e.msg})") from None


SCENE_PROMPT = "Describe what is happening in this scene."        # method.md §6.1, the one-scene training prompt
ANETQA_TYPES = ("motion", "spatial", "temporal", "yes/no", "color", "object", "location", "number", "other")
VDC_PROMPTS = {"short": "Write a one-sentence summary of the video.",
               "detailed": "Describe the video based on these frames in a few sentences.",
               "background": "Describe the background, including objects, location, weather, and time.",
               "main_object": "Describe the main subject, including their attributes and movements throughout the "
                              "video.",
               "camera": "What are the camera angles and movements throughout the video?"}


def read_activitynet_captions(files):
    items = []
    for vid, ann in load_json(files[0]).items():
        for i, ((s, e), sentence) in enumerate(zip(ann["timestamps"], ann["sentences"], strict=True)):
            s, e = max(0.0, float(s)), min(float(e), float(ann["duration"]))  # some stamps run past the video
            if e > s:
                items.append(Item(f"{vid}#{i}", vid, SCENE_PROMPT, (sentence.strip(),), "caption", s, e,
                                  (vid.removeprefix("v_"),)))
    return items


def read_activitynet_qa(files):
    q_file = files[0]
    a_file = files[1] if len(files) > 1 else q_file.with_name(q_file.name.replace("_q.json", "_a.json"))
    answers = {a["question_id"]: a for a in load_json(a_file)}
    items = []
    for q in load_json(q_file):
        a = answers[q["question_id"]]
        items.append(Item(q["question_id"], f"v_{q['video_name']}", q["question"], (str(a["answer"]),),
                          ANETQA_TYPES[a["type"]], alt=(q["video_name"],)))
    return items


def read_nextqa(files):
    path, vmap, extra = files[0], files[1] if len(files) > 1 else None, None
    vmap = vmap or path.with_name("map_vid_vidorID.json")              # video id -> "folder/video id"
    vmap = load_json(vmap) if len(files) > 1 or vmap.is_file() else {}
    extra = path.with_name(f"add_reference_answer_{path.stem}.json")   # {video id: {qid: second answer}}
    extra = load_json(extra) if extra.is_file() else {}
    items = []
    for r in csv.DictReader(io.StringIO(read_text(path), newline="")):
        second = extra.get(r["video"], {}).get(r["qid"])
        items.append(Item(f"{r['video']}_{r['qid']}", vmap.get(r["video"], r["video"]), r["question"],
                          (r["answer"], *([second] if second else [])), r["type"]))
    return items


def read_vdc(files):
    return [Item(f"{d['video_id']}:{style}", d["video_id"], prompt, (d["captions"][f"{style}_caption"],), style)
            for _, d in jsonl_rows(files[0]) for style, prompt in VDC_PROMPTS.items()]


def read_jsonl(files):
    items = []
    for n, d in jsonl_rows(files[0]):
        refs = d.get("references")
        if not (isinstance(d.get("video"), str) and isinstance(d.get("prompt"), str) and isinstance(refs, list)
                and refs and all(isinstance(r, str) for r in refs)):
            raise EvalError(f'{files[0]}:{n}: needs "video" and "prompt" strings and "references", a list of strings')
        start, end = (None if d.get(k) is None else float(d[k]) for k in ("start", "end"))
        items.append(Item(str(d.get("id", f"line{n}")), d["video"], d["prompt"], tuple(refs), str(d.get("kind", "")),
                          start, end))
    return items


def read_toy(files):
    return [Item(d["id"], d["video_path"], d["prompt"], (d["target_text"],), d["kind"])
            for _, d in jsonl_rows(files[0])]


# name -> (reader, default metrics, default annotation files)
BENCHMARKS = {"activitynet-captions": (read_activitynet_captions, ("f1", "em"), None),
              "activitynet-qa": (read_activitynet_qa, ("f1", "em"), None),
              "nextqa": (read_nextqa, ("f1", "em"), None),
              "vdc": (read_vdc, ("f1", "em"), None),
              "jsonl": (read_jsonl, ("f1", "em"), None),
              "toy": (read_toy, ("first_word",), ["data/toy/heldout/manifest.jsonl"])}


def read_items(bench: str, files: list[str]) -> list[Item]:
    if bench not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {bench!r}; known: {', '.join(BENCHMARKS)}")
    try:
        items = BENCHMARKS[bench][0]([Path(f) for f in files])
    except EvalError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, csv.Error) as e:  # a field missing, ...
        raise EvalError(f"{files[0]}: not in {bench}'s format ({type(e).__name__}: {e})") from None
    if not items:
        raise EvalError(f"{files[0]}: no items")
    if len({it.id for it in items}) != len(items):
        raise EvalError(f"{files[0]}: item ids are not unique")
    return items


def resolve(items: list[Item], videos: Path) -> tuple[list[Item], list[str]]:
    """Items whose video exists, with `video` its path; and the names of the videos not found."""
    found: dict[tuple, str | None] = {}
    for it in items:
        names = (it.video, *it.alt)
        if names not in found:
            paths = (videos / f"{n}{ext}" for n in names for ext in VIDEO_EXTS)
            found[names] = next((str(p) for p in paths if p.is_file()), None)
    kept = [replace(it, video=found[(it.video, *it.alt)], alt=()) for it in items if found[(it.video, *it.alt)]]
    return kept, sorted({names[0] for names, p in found.items() if p is None})


# ------------------------------------------------------------------------------------------------ metrics
def normalize(text: str) -> str:
    """SQuAD v2.0 evaluate script's normalize_answer."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(answer: str, refs) -> float:
    def f1(a, r):
        a, r = normalize(a).split(), normalize(r).split()
        same = sum((Counter(a) & Counter(r)).values())
        if not a or not r or not same:
            return float(a == r)
        return 2 * same / (len(a) + len(r))        # = 2PR / (P + R) with P = same/|a|, R = same/|r|
    return max(f1(answer, r) for r in refs)


def exact_match(answer: str, refs) -> float:
    return float(any(normalize(answer) == normalize(r) for r in refs))


def first_word(answer: str, refs) -> float:
    words = lambda t: [w for w in (x.strip(string.punctuation).lower() for x in t.split()) if w]  # noqa: E731
    got = words(answer)
    return float(any((got == w) if len(w) > 1 else (bool(got) and got[:1] == w) for w in map(words, refs)))


METRICS = {"f1": token_f1, "em": exact_match, "first_word": first_word}

JUDGE_PROMPT = ("You grade an answer about a video against reference answers written by people who watched it. "
                "You do not see the video: judge only whether the answer agrees in meaning with the references; "
                "synonyms and paraphrases count as agreement, details the references contradict count against.\n\n"
                "Question or instruction: {prompt}\nReference answer(s):\n{references}\nAnswer to grade: {answer}\n\n"
                "Give an integer score from 0 (wrong or unrelated) to 5 (fully correct and complete). "
                'Reply with JSON only, for example {{"score": 3}}.')
JUDGE_BACKOFF_S = 2.0


def judge(prompt, refs, answer, url: str, model: str, key: str | None, timeout: float, retries: int) -> float:
    """One chat completion -> score / 5. Network errors, 408/429/5xx and unreadable replies are retried with
    exponential backoff; any other HTTP error, or the last failure, is an EvalError."""
    body = {"model": model, "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": JUDGE_PROMPT
            .format(prompt=prompt, references="\n".join(f"- {r}" for r in refs), answer=answer)}]}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    endpoint = url.rstrip("/") + "/chat/completions"
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(endpoint, json.dumps(body).encode(), headers)
            with urllib.request.urlopen(req, timeout=timeout) as r:
                reply = json.loads(r.read())["choices"][0]["message"]["content"]
            m = re.search(r'"?score"?\s*:\s*(\d+(?:\.\d+)?)', reply) or re.search(r"\d+(?:\.\d+)?", reply)
            if m and 0 <= float(m.group(m.lastindex or 0)) <= 5:
                return float(m.group(m.lastindex or 0)) / 5
            problem = f"reply without a 0-5 score: {reply[:60]!r}"
        except urllib.error.HTTPError as e:
            if e.code not in (408, 429) and e.code < 500:
                raise EvalError(f"judge {endpoint}: HTTP {e.code} {e.reason}") from None
            problem = f"HTTP {e.code} {e.reason}"
        except (KeyError, IndexError, TypeError, json.JSONDecodeError):
            problem = "not an OpenAI-style chat completion"
        except (urllib.error.URLError, OSError) as e:      # refused, unreachable, timed out
            problem = str(getattr(e, "reason", e))
        if attempt < retries:
            time.sleep(JUDGE_BACKOFF_S * 2 ** attempt)
    raise EvalError(f"judge {endpoint}: {problem} (after {retries + 1} tries)")


# ------------------------------------------------------------------------------------------------ statistics
def paired_bootstrap(a, b, n_boot: int = 4000, seed: int = 0, groups=None) -> tuple[float, float, float]:
    """mean(a - b) and its 95 % percentile bootstrap interval. Items are resampled with replacement as pairs; with
    `groups` (one label per item), whole groups are (a cluster bootstrap: the mean over the drawn groups' items)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    sums, counts = d, np.ones_like(d)
    if groups is not None:
        _, g = np.unique(np.asarray(groups), return_inverse=True)
        sums, counts = np.bincount(g, d), np.bincount(g).astype(float)
    rng, boots = np.random.default_rng(seed), []
    for k in range(0, n_boot, 256):  # 256 resamples at a time bounds memory; an even draw count keeps the stream
        pick = rng.integers(0, len(sums), size=(min(256, n_boot - k), len(sums)))   # (resamples, units)
        boots.append(sums[pick].sum(1) / counts[pick].sum(1))
    boots = np.concatenate(boots)
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def verdicts(lo: float, hi: float, delta: float) -> dict:
    return {"NI": bool(lo > -delta), "Eq": bool(-delta < lo and hi < delta)}


def statistics(records: list[dict], metrics, args) -> list[dict]:
    """records: one per (item, condition) with "scores". One row per metric and kind ("all" first): the items that
    both paired conditions scored; text only is averaged over the same items when present."""
    by_item: dict[str, dict] = {}                          # id -> {"kind", "path", condition: {metric: score}}
    for r in records:
        by_item.setdefault(r["id"], {"kind": r["kind"], "path": r["video"]})[r["condition"]] = r["scores"]
    kinds = sorted({v["kind"] for v in by_item.values()})
    rows = []
    for metric in metrics:
        for kind in ["all"] + (kinds if len(kinds) > 1 else []):
            its = [v for v in by_item.values() if (kind == "all" or v["kind"] == kind)
                   and all(metric in v.get(c, {}) for c in ("video", "adapter"))]
            if not its:
                continue
            col = {c: np.array([v[c][metric] for v in its])                     # condition -> (n,) scores
                   for c in CONDITIONS if all(metric in v.get(c, {}) for v in its)}
            groups = [v["path"] for v in its] if args.bootstrap_unit == "video" else None
            d, lo, hi = paired_bootstrap(col["adapter"], col["video"], args.bootstrap, args.seed, groups)
            delta = args.margin if args.margin is not None else args.margin_rel * col["video"].mean()
            rows.append({"metric": metric, "kind": kind, "n": len(its), **{c: float(x.mean()) for c, x in col.items()},
                         "diff": d, "ci": [lo, hi], "delta": float(delta), **verdicts(lo, hi, delta)})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| metric | kind | n | in context | adapter | text only | adapter - in context | 95 % CI | delta | NI | Eq "
            "|\n" + "|---" * 11 + "|")
    fmt = lambda r, c: f"{r[c]:.3f}" if c in r else "-"  # noqa: E731
    return "\n".join([head] + [f"| {r['metric']} | {r['kind']} | {r['n']} | {fmt(r, 'video')} | {fmt(r, 'adapter')} | "
                               f"{fmt(r, 'text')} | {r['diff']:+.3f} | [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | "
                               f"{r['delta']:.3f} | {'yes' if r['NI'] else 'no'} | {'yes' if r['Eq'] else 'no'} |"
                               for r in rows])


# ------------------------------------------------------------------------------------------------ results files
def read_records(path: Path) -> list[dict]:
    """The records of an append-only JSONL; a cut-short last line (a crash mid-write) is dropped."""
    if not path.is_file():
        return []
    lines, out = path.read_bytes().split(b"\n"), []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line)) if line.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i < len(lines) - 1:
                print(f"warning: {path}:{i + 1}: corrupted line skipped (its answer is redone)", file=sys.stderr)
    return out


def open_append(path: Path):
    """Append mode, after cutting off a partial last line so the next record starts a line of its own."""
    if path.is_file() and (raw := path.read_bytes()) and not raw.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
    return open(path, "a")


def append(f, record: dict):
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())  # on disk before the next answer starts: a crash loses at most the answer in progress


def answer_records(out: Path) -> list[dict]:
    """Every rank's answers, later lines winning (a rerun after an error may answer a pair again)."""
    merged = {}
    for path in sorted(out.glob("answers*.jsonl")):
        merged.update({(r["id"], r["condition"]): r for r in read_records(path)})
    return list(merged.values())


def scored(records: list[dict], metrics, args, out: Path) -> list[dict]:
    """Answered records with "scores": the built-in metrics, plus the judge's (cached in judge.jsonl, keyed by the
    answer text and the judge model, so a rerun grades only what is new)."""
    ok = [r for r in records if "answer" in r]
    for r in ok:
        r["scores"] = {m: METRICS[m](r["answer"], r["references"]) for m in metrics}
    if not args.judge_url:
        return ok
    def key(r):
        return hashlib.sha1(json.dumps([r["id"], r["condition"], args.judge_model, r["answer"]]).encode()).hexdigest()
    cache = {j["key"]: j["judge"] for j in read_records(out / "judge.jsonl")}
    todo = list({key(r): r for r in ok if key(r) not in cache}.values())
    pool = ThreadPoolExecutor(args.judge_workers)
    try:
        with open_append(out / "judge.jsonl") as f:
            jobs = {pool.submit(judge, r["prompt"], r["references"], r["answer"], args.judge_url, args.judge_model,
                                os.environ.get(args.judge_key_env), args.judge_timeout, args.judge_retries): r
                    for r in todo}
            for job in tqdm(jobs, desc="judge", unit="answer", disable=not todo):
                cache[key(jobs[job])] = job.result()      # an EvalError stops here; what was graded stays cached
                append(f, {"key": key(jobs[job]), "id": jobs[job]["id"], "judge": cache[key(jobs[job])]})
    finally:
        pool.shutdown(cancel_futures=True)
    for r in ok:
        r["scores"]["judge"] = cache[key(r)]
    return ok


def report(out: Path, ids, metrics, args) -> str:
    """The paper's table from every rank's answers (restricted to `ids` when given); writes report.md/.json."""
    records = [r for r in answer_records(out) if (ids is None or r["id"] in ids)
               and (not args.kinds or r["kind"] in args.kinds)]
    if not records:
        raise EvalError(f"{out}: no answers yet")
    failed = sorted({f"{r['id']} ({r['error']})" for r in records if "error" in r})
    rows = statistics(scored(records, metrics, args, out), [*metrics, *(["judge"] if args.judge_url else [])], args)
    if not rows:
        raise EvalError(f"{out}: no item has both an in-context and an adapter answer yet")
    margin = f"delta = {args.margin}" if args.margin is not None else f"delta = {args.margin_rel} x in-context mean"
    text = (f"{args.bench}: {len({r['id'] for r in records})} items on {len({r['video'] for r in records})} videos; "
            f"{margin}; 95 % CI: percentile paired bootstrap over {args.bootstrap_unit}s, {args.bootstrap} resamples, "
            f"seed {args.seed}\n\n{table(rows)}\n")
    if failed:
        text += f"\n{len(failed)} items failed, left out: {', '.join(failed[:5])}{' ...' * (len(failed) > 5)}\n"
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(text))
    write_atomic(out / "report.json", lambda tmp: tmp.write_text(json.dumps({"rows": rows, "failed": failed}) + "\n"))
    return text


# ------------------------------------------------------------------------------------------------ answering
def adapter_for(m, span: tuple, cache: Path):
    """The adapter of one (video, start, end) span: from the cache when it was made by these models, else
    internalized now (method.md §5 steps 1-2) and cached; every prompt on the span reuses it."""
    video, start, end = span
    tag = hashlib.sha1(f"{Path(video).resolve()}|{start}|{end}".encode()).hexdigest()[:12]
    path = cache / f"{Path(video).stem}.{tag}.safetensors"
    if path.is_file():
        try:
            adapter = load_adapter(path, m.vlm)
            if all(adapter.meta.get(k) == m.meta[k] for k in ("hypernet_sha256", "frames", "video_size")):
                return adapter
        except AdapterError:
            pass                                                   # corrupted or foreign: made again
    adapter = internalize(m, Path(video), start, end)
    save_adapter(path, adapter)
    return adapter


def prepare(m, span: tuple, conditions: set, cache: Path) -> dict:
    """What a span's prompts need: its decoded clip (in context) and/or its adapter; or the decode error."""
    try:
        return {**({"clip": m.proc.load_video(span[0], start=span[1], end=span[2])} if "video" in conditions else {}),
                **({"adapter": adapter_for(m, span, cache)} if "adapter" in conditions else {})}
    except data.DecodeError as e:
        return {"error": str(e)}


def generate(m, jobs: list[tuple], max_new_tokens: int) -> list[tuple[str, int]]:
    """jobs: (prompt, Clip or None, Adapter or None), one condition per call -> (answer, new tokens) each.
    Greedy, left-padded; each row gets its own video or its own adapter, stacked along the batch."""
    inputs = [m.proc.question_inputs(p, video=clip) for p, clip, _ in jobs]       # (1, T_b), (F_b, 3, S, S) | None
    ids, mask = data.pad_batch([x[0][0] for x in inputs], m.proc.pad_id, side="left")  # (B, T)
    pixels = [x[1] for x in inputs if x[1] is not None]
    lora, alpha = None, 128.0
    if jobs[0][2] is not None:
        rows = [j[2].lora(m.device) for j in jobs]                                 # B x {t: ((1, L, R, d_in), ...)}
        lora = {t: tuple(torch.cat([r[t][k] for r in rows]) for k in (0, 1)) for t in rows[0]}   # (B, L, R, d)
        alpha = jobs[0][2].alpha
    new = M.generate(m.vlm, ids.to(m.device), mask.to(m.device), torch.cat(pixels).to(m.device) if pixels else None,
                     lora, alpha, max_new_tokens=max_new_tokens, eos_token_id=m.proc.eou_id)
    return [(m.proc.decode(t).strip(), len(t)) for t in new]


def run(m, items: list[Item], done: set, f, args, rank: int, world: int):
    """This rank's videos (every world-th, in file order), `args.batch` spans at a time: their clips / adapters
    are prepared once, then each condition's prompts are answered in batches; every answer is appended at once."""
    spans: dict[tuple, list[Item]] = {}
    for it in items:
        spans.setdefault((it.video, it.start, it.end), []).append(it)
    mine = set(list(dict.fromkeys(it.video for it in items))[rank::world])
    todo = [(s, [(it, c) for it in its for c in args.conditions if (it.id, c) not in done])
            for s, its in spans.items() if s[0] in mine]
    todo = [t for t in todo if t[1]]
    bar = tqdm(total=sum(len(jobs) for _, jobs in todo), unit="answer", desc=f"rank {rank}" if world > 1 else "answers")
    for i in range(0, len(todo), args.batch):
        chunk = todo[i:i + args.batch]
        ready = {s: prepare(m, s, {c for _, c in jobs}, args.adapter_cache) for s, jobs in chunk}
        for c in args.conditions:
            jobs = [(it, ready[s]) for s, js in chunk for it, cc in js if cc == c]
            for b in range(0, len(jobs), args.batch):
                part, t0 = jobs[b:b + args.batch], time.perf_counter()
                good = [(it, r) for it, r in part if "error" not in r]
                outs = generate(m, [(it.prompt, r.get("clip") if c == "video" else None,
                                     r.get("adapter") if c == "adapter" else None) for it, r in good],
                                args.max_new_tokens) if good else []
                seconds, outs = (time.perf_counter() - t0) / max(1, len(good)), iter(outs)
                for it, r in part:
                    rec = {"id": it.id, "condition": c, "kind": it.kind, "video": it.video, "start": it.start,
                           "end": it.end, "prompt": it.prompt, "references": list(it.references)}
                    if "error" in r:
                        append(f, {**rec, "error": r["error"]})
                    else:
                        text, n = next(outs)
                        append(f, {**rec, "answer": text, "new_tokens": n, "seconds": round(seconds, 4)})
                bar.update(len(part))
    bar.close()


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", help=f"one of: {', '.join(BENCHMARKS)}")
    p.add_argument("--annotations", nargs="+", help="the benchmark's annotation file(s) (see above)")
    p.add_argument("--videos", help="folder the videos are looked up in (default: the annotation file's folder)")
    p.add_argument("--out", help="results folder (default: results/eval/<bench>-<size>)")
    p.add_argument("--limit", type=int, help="only the first N videos of the annotation file")
    p.add_argument("--kinds", type=lambda s: s.split(","), help="only these kinds (question types, caption styles)")
    p.add_argument("--conditions", type=lambda s: s.split(","), default=list(CONDITIONS),
                   help="comma-separated subset of video,adapter,text (default: all; statistics pair the first two)")
    p.add_argument("--prompt-template", default="{prompt}",
                   help='wrap every prompt, e.g. "{prompt} Answer only the question, in one sentence."')
    p.add_argument("--size", default=None, help="base model preset: tiny (default), 256M, 500M, 2.2B")
    p.add_argument("--model", default=None, help="a SmolVLM2 folder; overrides --size (needs --hypernet)")
    p.add_argument("--hypernet", default=None, help="hypernetwork folder (default: checkpoints/<size>/hypernet)")
    p.add_argument("--frames", type=int, default=12, help="max frames per video or segment (method: 12)")
    p.add_argument("--video-size", type=int, default=None, help="frame resize edge (default: 384 for released sizes)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: this rank's GPU)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the hypernetwork's perceiver")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (method: 128)")
    p.add_argument("--batch", type=int, default=16, help="prompts generated together (and spans prepared together)")
    p.add_argument("--metrics", type=lambda s: s.split(","), help="f1,em,first_word (default: the benchmark's)")
    margin = p.add_mutually_exclusive_group()
    margin.add_argument("--margin", type=float, help="absolute equivalence / non-inferiority margin delta")
    margin.add_argument("--margin-rel", type=float, default=0.4, help="delta = this x in-context mean (default 0.4)")
    p.add_argument("--bootstrap", type=int, default=4000, help="bootstrap resamples")
    p.add_argument("--bootstrap-unit", choices=["item", "video"], default="item", help="what the bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", help="model name sent to the judge endpoint")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    p.add_argument("--judge-retries", type=int, default=3, help="retries per judge request (exponential backoff)")
    p.add_argument("--judge-workers", type=int, default=8, help="judge requests in flight")
    p.add_argument("--report", action="store_true", help="no model: print the table from the answers in --out")
    args = p.parse_args(argv)
    if bad := [c for c in args.conditions if c not in CONDITIONS]:
        p.error(f"unknown condition(s) {bad}; choose from {', '.join(CONDITIONS)}")
    if "{prompt}" not in args.prompt_template:
        p.error("--prompt-template must contain {prompt}")
    if args.judge_url and not args.judge_model:
        p.error("--judge-url needs --judge-model (the paper's judge is unknown: name yours)")
    if min(args.batch, args.frames, args.max_new_tokens, args.bootstrap, 1 if args.limit is None else args.limit) < 1:
        p.error("--batch, --frames, --max-new-tokens, --bootstrap and --limit must be >= 1")
    return args


def select(items: list[Item], args) -> list[Item]:
    if args.kinds:
        items = [it for it in items if it.kind in args.kinds]
    if args.limit:
        keep = set(list(dict.fromkeys(it.video for it in items))[:args.limit])
        items = [it for it in items if it.video in keep]
    if not items:
        raise EvalError("no items left after --kinds / --limit")
    return items


def _main(args):
    if args.bench not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {args.bench!r}; known: {', '.join(BENCHMARKS)}")
    _, metrics, default_files = BENCHMARKS[args.bench]
    metrics = args.metrics or list(metrics)
    if bad := [x for x in metrics if x not in METRICS]:
        raise EvalError(f"unknown metric(s) {bad}; built in: {', '.join(METRICS)} (and judge, with --judge-url)")
    out = Path(args.out or f"results/eval/{args.bench}-{Path(args.model).name if args.model else args.size or 'tiny'}")
    files = args.annotations or default_files
    if args.report:
        ids = {it.id for it in select(read_items(args.bench, files), args)} if args.annotations else None
        print(report(out, ids, metrics, args), end="")
        return
    if not files:
        raise EvalError(f"{args.bench} needs --annotations FILE")
    if args.bench == "toy" and not Path(files[0]).is_file():
        raise EvalError(f"no toy manifest at {files[0]}; write the held-out clips first: "
                        f"python -m toy.world clips --split heldout --n 200 --out {Path(files[0]).parent}")
    items = select(read_items(args.bench, files), args)
    videos = Path(args.videos or Path(files[0]).parent)
    if not videos.is_dir():
        raise EvalError(f"--videos {videos}: no such folder")
    n_videos = len({it.video for it in items})
    items, missing = resolve(items, videos)
    if not items:
        raise EvalError(f"none of the {len(missing)} videos found under {videos} (e.g. {missing[0]})")
    if missing:
        print(f"warning: {len(missing)} of {n_videos} videos not found under {videos}, their items skipped: "
              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (all in {out}/missing_videos.txt)",
              file=sys.stderr)
    # torchrun sets these: rank r of W takes every W-th video and this node's GPU LOCAL_RANK. Ranks never wait for
    # each other: the one that completes the set prints the table, so a crashed rank is rerun alone with its env.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args.device = str(M.pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0))))
    try:
        m = load_models(args.size, args.model, args.hypernet, args.device, args.dtype, args.frames, args.video_size,
                        args.compile)
    except ValueError as e:
        raise EvalError(str(e)) from None
    config = {"benchmark": args.bench, "base_model": m.meta["base_model"], "base_weights_sha256":
              m.meta["base_weights_sha256"], "hypernet_sha256": m.meta["hypernet_sha256"], "frames": m.meta["frames"],
              "video_size": m.meta["video_size"], "dtype": str(next(m.vlm.parameters()).dtype),
              "max_new_tokens": args.max_new_tokens, "prompt_template": args.prompt_template}
    if (out / "config.json").is_file() and (old := load_json(out / "config.json")) != config:
        diff = "; ".join(f"{k} {old.get(k)} vs {v}" for k, v in config.items() if old.get(k) != v)
        raise EvalError(f"{out} holds answers made with other settings ({diff}); pass another --out")
    args.adapter_cache = out / "adapters"
    args.adapter_cache.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=1) + "\n"))
    write_atomic(out / "missing_videos.txt", lambda tmp: tmp.write_text("".join(f"{v}\n" for v in missing)))
    items = [replace(it, prompt=args.prompt_template.replace("{prompt}", it.prompt)) for it in items]
    done = {(r["id"], r["condition"]) for r in answer_records(out)}
    with open_append(out / (f"answers.rank{rank}.jsonl" if world > 1 else "answers.jsonl")) as f:
        run(m, items, done, f, args, rank, world)
    done = {(r["id"], r["condition"]) for r in answer_records(out)}
    left = {(it.id, c) for it in items for c in args.conditions} - done
    if left:
        print(f"rank {rank} done; {len(left)} answers of other ranks to come: the last rank to finish prints the "
              f"table (or: eval.py {args.bench} --out {out} --report)", file=sys.stderr)
    else:
        print(report(out, {it.id for it in items}, metrics, args), end="")


def main(argv=None):
    try:
        _main(parse_args(argv))
    except EvalError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    run_cli(main)
