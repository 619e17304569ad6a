"""The adapter file: one video's LoRA, self-describing, shared by internalize.py, ask.py and compose.py; and what
the three scripts share besides it: one-line errors, exit codes after signals, safe output files.

Spec: ../shared/design/method.md §4 (how the LoRA is applied), §7 (rank-space composition). One safetensors file:

    {target}.A   (L, R, d_in)    float32 (or the dtype asked for), R = G + r
    {target}.B   (L, R, d_out)
      rows [0, G)    generated rows: r per segment, segments in order (G = n_segments * r), each already
                     multiplied by its segment weight (compose.py --weights)
      rows [G, G+r)  the hypernetwork's static "bias" LoRA, once, times bias_weight

    dW_l = alpha * B_l^T A_l  (d_out, d_in)   -- alpha used directly, not alpha / r (method.md §4)

and a JSON string under the metadata key "video2lora" (every field is checked on load, type and range):

    format, format_version          "video2lora-adapter", 2
    base_model, base_size           HF id, "tiny" or a folder's NAME; the preset size, or null for a local folder
                                    (no path is stored: an adapter names no folder of its maker's machine)
    base_config_sha256, base_weights_sha256    sha256 of config.json as SmolVLMConfig.to_hf_dict (sorted keys), and
                                               of every weight tensor as stored (model.weights_sha256)
    hypernet, hypernet_sha256       its name (relative to the repository, hf:REPO/FILE, else the folder's name),
                                    sha256 of the hypernet.safetensors read
    hypernet_release, hypernet_release_sha256, hypernet_trained_on
                                    only for the authors' released .pt: its file name, its sha256, its base model
    alpha, rank, num_layers, targets            128, r, L, [[name, d_in, d_out], ...]
    generated_rank, bias_weight     G, the static part's multiplier
    frames, video_size, frame_side  max frames per segment, resize edge, encoder side
    video, video_sha256, start, end the source's file name and the span internalized, seconds (null when segments
                                    come from several videos)
    segments                        [{video, video_sha256, start, end, frames, weight}], in row order
    created_by, tensors_sha256      the writing script; sha256 of the tensor bytes (corruption is an error)

Every failure is an `AdapterError` whose message is one line, ready for `SystemExit(f"error: {e}")`.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import re
import signal
import stat
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from model import LORA_TARGETS, PRESETS, folder_weights_sha256, lora_target_shapes, read_config, weights_sha256

FORMAT, VERSION, META_KEY = "video2lora-adapter", 2, "video2lora"
SIZES = ("tiny", *PRESETS)


class AdapterError(ValueError):
    """A missing, corrupted or mismatched adapter; the message is one line."""


@dataclass
class Adapter:
    ab: dict[str, tuple[torch.Tensor, torch.Tensor]]   # target -> (A (L, R, d_in), B (L, R, d_out))
    meta: dict
    path: Path | None = None                            # the file it was loaded from, if any

    @property
    def alpha(self) -> float:
        return float(self.meta["alpha"])

    def lora(self, device=None) -> dict:
        """The form `SmolVLM.forward(lora=...)` takes: a leading batch axis of 1, broadcast over the batch."""
        return {t: (a[None].to(device), b[None].to(device)) for t, (a, b) in self.ab.items()}

    def describe(self) -> str:
        m = self.meta
        segs = ", ".join(f"{s['start']:.1f}-{s['end']:.1f}s" for s in m["segments"])
        return (f"{m['video'] or 'several videos'} [{segs}] on {m['base_model']}; rank {m['generated_rank']}+"
                f"{m['rank']} x {m['num_layers']} layers of {','.join(t for t, _, _ in m['targets'])}, "
                f"alpha {m['alpha']:g}")

    def delta_weight(self, target: str, layer: int) -> torch.Tensor:
        """dW = alpha * B^T A, (d_out, d_in): what the adapter adds to that layer's weight."""
        a, b = self.ab[target]
        return self.alpha * b[layer].float().T @ a[layer].float()


# ------------------------------------------------------------------------------------------------ fingerprints
def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_tensors(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())   # raw bytes, any dtype (bf16 has no numpy type)
    return h.hexdigest()


def base_facts(vlm) -> dict:
    """What identifies a base model: its config, and ALL its weights. A model from model.load_model carries the
    sha256 of its tensors as stored in the files (computed while loading, so it does not depend on the dtype or
    device it was loaded to); a model built in memory is hashed as it is."""
    weights = getattr(vlm, "weights_sha256", None) or weights_sha256(vlm.state_dict().items())
    return {"base_config_sha256": _config_sha256(vlm.config), "base_weights_sha256": weights}


def _config_sha256(config) -> str:
    return hashlib.sha256(json.dumps(config.to_hf_dict(), sort_keys=True).encode()).hexdigest()


def folder_facts(model_dir) -> dict:
    """base_facts of the model in a folder, reading its tensors one at a time (no model is built)."""
    config, _, _ = read_config(Path(model_dir))
    return {"base_config_sha256": _config_sha256(config), "base_weights_sha256": folder_weights_sha256(model_dir)}


# ------------------------------------------------------------------------------------------------ build
def adapter_from_lora(lora: dict, rank: int, meta: dict) -> Adapter:
    """The hypernetwork's output for ONE sample {t: (A (1, L, 2r, d_in), B (1, L, 2r, d_out))} -> an Adapter.
    The hypernetwork already puts generated rows first and the static rows last, the file's layout."""
    ab = {t: (a[0].detach().float().cpu(), b[0].detach().float().cpu()) for t, (a, b) in lora.items()}
    for t, (a, _) in ab.items():
        if a.shape[1] != 2 * rank:
            raise AdapterError(f"{t}: expected {2 * rank} rows (r generated + r static), got {a.shape[1]}")
    return Adapter(ab, {**meta, "rank": rank, "generated_rank": rank, "bias_weight": 1.0})


SPREAD = {"1": lambda n: 1.0, "1/n": lambda n: 1 / n, "1/sqrt(n)": lambda n: n ** -0.5}


def spread_weights(rule: str, n: int) -> list[float]:
    """One multiplier for each of n composed segments by a rule: "1" (plain concatenation, the paper's), "1/n" (the
    segments' mean update) or "1/sqrt(n)" (in between; the toy world composes 4 and 8 segments best with it,
    toy/README.md)."""
    if rule not in SPREAD:
        raise ValueError(f"segment weights must be one of {', '.join(SPREAD)}, got {rule!r}")
    return [SPREAD[rule](n)] * n


def concat_adapters(adapters: list[Adapter], weights=None, bias_weight: float = 1.0, meta: dict | None = None) -> Adapter:
    """method.md §7: A = [w_1 A_1; ...; w_n A_n; b A_bias], B = [B_1; ...; B_n; B_bias], so
    dW = alpha (sum_c w_c B_c^T A_c + b B_bias^T A_bias): segment updates add and the static part counts once.
    The inputs must share base model and hypernetwork (hence the same static part)."""
    first, weights = adapters[0], list(weights or [1.0] * len(adapters))
    if len(weights) != len(adapters):
        raise AdapterError(f"{len(weights)} weights for {len(adapters)} adapters")
    if not all(_finite(w) for w in [*weights, bias_weight]):
        raise AdapterError(f"weights must be finite numbers, got {weights} and bias weight {bias_weight}")
    for x in adapters[1:]:
        for key, what in (("base_config_sha256", "base models"), ("base_weights_sha256", "base model weights"),
                          ("hypernet_sha256", "hypernetworks"), ("alpha", "alpha"), ("rank", "ranks"),
                          ("targets", "target modules")):
            if x.meta[key] != first.meta[key]:
                raise AdapterError(f"cannot compose adapters of different {what}: {first.meta[key]} vs {x.meta[key]}")
    ab, segments = {}, []
    for t in first.ab:
        g = [x.meta["generated_rank"] for x in adapters]
        bias_a, bias_b = first.ab[t][0][:, g[0]:], first.ab[t][1][:, g[0]:]          # (L, r, d)
        for x, gx in zip(adapters, g):
            if not (torch.equal(x.ab[t][0][:, gx:], bias_a) and torch.equal(x.ab[t][1][:, gx:], bias_b)):
                raise AdapterError("cannot compose adapters whose static parts differ (different bias weights)")
        a = [x.ab[t][0][:, :gx] * w for x, gx, w in zip(adapters, g, weights)] + [bias_a * bias_weight]
        b = [x.ab[t][1][:, :gx] for x, gx in zip(adapters, g)] + [bias_b]
        ab[t] = (torch.cat(a, dim=1), torch.cat(b, dim=1))                               # (L, G + r, d)
    for x, w in zip(adapters, weights):
        segments += [{**s, "weight": s.get("weight", 1.0) * w} for s in x.meta["segments"]]
    out = {**first.meta, **(meta or {}), "segments": segments,
           "generated_rank": sum(x.meta["generated_rank"] for x in adapters),
           "bias_weight": first.meta["bias_weight"] * bias_weight}
    videos = {(s["video"], s["video_sha256"]) for s in segments}
    one = len(videos) == 1   # the top-level source fields describe the whole span only for a single video
    out.update(video=segments[0]["video"] if one else None, video_sha256=segments[0]["video_sha256"] if one else None,
               start=min(s["start"] for s in segments) if one else None,
               end=max(s["end"] for s in segments) if one else None)
    return Adapter(ab, out)


# ------------------------------------------------------------------------------------------------ metadata checks
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _sha(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _time(v) -> bool:
    return _finite(v) and v >= 0


def _or_none(check):
    return lambda v: v is None or check(v)


def _target(v) -> bool:
    return (isinstance(v, list) and len(v) == 3 and v[0] in LORA_TARGETS and _int(1)(v[1]) and _int(1)(v[2]))


SEGMENT = {"video": (str, "a string"), "video_sha256": (_sha, "a sha256 hex digest"), "start": (_time, "a time"),
           "end": (_time, "a time"), "frames": (_int(1), "an integer >= 1"), "weight": (_finite, "a finite number")}
FIELDS = {  # field: (check, what it must be); every one is required
    "base_model": (str, "a string"), "base_size": (_or_none(lambda v: v in SIZES), f"one of {SIZES} or null"),
    "base_config_sha256": (_sha, "a sha256 hex digest"), "base_weights_sha256": (_sha, "a sha256 hex digest"),
    "hypernet": (str, "a string"), "hypernet_sha256": (_sha, "a sha256 hex digest"),
    "alpha": (lambda v: _finite(v) and v > 0, "a finite number > 0"), "rank": (_int(1), "an integer >= 1"),
    "generated_rank": (_int(1), "an integer >= 1"), "bias_weight": (_finite, "a finite number"),
    "num_layers": (_int(1), "an integer >= 1"),
    "targets": (lambda v: isinstance(v, list) and v and all(map(_target, v)), "a list of [module, d_in, d_out]"),
    "frames": (_int(1), "an integer >= 1"), "video_size": (_int(1), "an integer >= 1"),
    "frame_side": (_int(1), "an integer >= 1"), "video": (_or_none(lambda v: isinstance(v, str)), "a string or null"),
    "video_sha256": (_or_none(_sha), "a sha256 hex digest or null"), "start": (_or_none(_time), "a time or null"),
    "end": (_or_none(_time), "a time or null"),
    "segments": (lambda v: isinstance(v, list) and v and all(isinstance(s, dict) for s in v), "a list of segments"),
    "created_by": (str, "a string"), "tensors_sha256": (_sha, "a sha256 hex digest"),
}


def check_meta(meta: dict, where="adapter") -> None:
    """Every field present, of its type and in range, and the fields consistent with each other."""
    for key, (check, what) in FIELDS.items():
        if key not in meta:
            raise AdapterError(f"{where}: incomplete adapter metadata (no {key})")
        ok = isinstance(meta[key], check) if isinstance(check, type) else check(meta[key])
        if not ok:
            raise AdapterError(f"{where}: adapter metadata {key} must be {what}, got {json.dumps(meta[key])[:60]}")
    for i, seg in enumerate(meta["segments"]):
        for key, (check, what) in SEGMENT.items():
            ok = key in seg and (isinstance(seg[key], check) if isinstance(check, type) else check(seg[key]))
            if not ok:
                raise AdapterError(f"{where}: adapter metadata segments[{i}].{key} must be {what}")
        if seg["end"] <= seg["start"]:
            raise AdapterError(f"{where}: adapter metadata segments[{i}] ends before it starts")
    if meta["generated_rank"] != meta["rank"] * len(meta["segments"]):
        raise AdapterError(f"{where}: adapter metadata says {len(meta['segments'])} segments of rank {meta['rank']} "
                           f"but generated_rank {meta['generated_rank']}")
    if len({t for t, _, _ in meta["targets"]}) != len(meta["targets"]):
        raise AdapterError(f"{where}: adapter metadata lists a target module twice")


def _check_tensors(tensors: dict[str, torch.Tensor], where) -> None:
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise AdapterError(f"{where}: tensor {name} is {str(t.dtype).replace('torch.', '')}, not a float type")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{where}: tensor {name} holds NaN or infinite values")


# ------------------------------------------------------------------------------------------------ save / load
def _tensors(adapter: Adapter, dtype=None) -> dict[str, torch.Tensor]:
    return {f"{t}.{k}": x.to(dtype or x.dtype).contiguous() for t, ab in adapter.ab.items() for k, x in zip("AB", ab)}


def save_adapter(path, adapter: Adapter, dtype: torch.dtype | None = None) -> Path:
    """Check, then write atomically (write_atomic). The metadata must be valid JSON: no NaN, no Infinity."""
    tensors = _tensors(adapter, dtype)
    meta = {**adapter.meta, "format": FORMAT, "format_version": VERSION, "tensors_sha256": _sha256_tensors(tensors)}
    check_meta(meta, str(path))
    _check_tensors(tensors, str(path))
    blob = save(tensors, metadata={"format": "pt", META_KEY: json.dumps(meta, allow_nan=False)})
    return write_atomic(path, blob)


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _read(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise AdapterError(f"{path}: " + ("not a regular file" if path.exists() else "no such adapter file"))
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad header or short file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(f"{path}: not a readable safetensors file ({msg})") from None
    if raw is None:
        raise AdapterError(f"{path}: not a Video2LoRA adapter (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw, parse_constant=_no_constant)   # NaN / Infinity are not JSON: refused
    except ValueError:
        raise AdapterError(f"{path}: corrupted adapter metadata (not valid JSON)") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: corrupted adapter metadata (not a JSON object)")
    return meta, tensors


def load_adapter(path, vlm=None) -> Adapter:
    """Read and verify an adapter: format, version, every metadata field, tensor names, shapes, dtypes and values
    (finite), the tensor checksum; with `vlm`, also that it was made for this base model (config and weights
    fingerprints, layer count, target shapes)."""
    path = Path(path)
    meta, tensors = _read(path)
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a Video2LoRA adapter (format {str(meta.get('format'))[:40]!r})")
    version = meta.get("format_version")
    if not _int(1)(version):
        raise AdapterError(f"{path}: adapter metadata format_version must be an integer >= 1")
    if version > VERSION:
        raise AdapterError(f"{path}: adapter format version {version} is newer than this code ({VERSION})")
    if version < VERSION:
        raise AdapterError(f"{path}: adapter format version {version} is from an older version of this code, whose "
                           "base-model fingerprint covered only some weights; internalize the video again")
    check_meta(meta, str(path))
    if _sha256_tensors(tensors) != meta["tensors_sha256"]:
        raise AdapterError(f"{path}: corrupted adapter (tensor checksum mismatch)")
    L, R = meta["num_layers"], meta["generated_rank"] + meta["rank"]
    want = {f"{t}.{k}": (L, R, d) for t, d_in, d_out in meta["targets"] for k, d in (("A", d_in), ("B", d_out))}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        raise AdapterError(f"{path}: tensors {sorted(got.items())[:2]} do not match the metadata "
                           f"{sorted(want.items())[:2]}")
    _check_tensors(tensors, path)
    adapter = Adapter({t: (tensors[f"{t}.A"], tensors[f"{t}.B"]) for t, _, _ in meta["targets"]}, meta, path)
    if vlm is not None:
        check_base(adapter, vlm, path)
    return adapter


def check_base(adapter: Adapter, vlm, path="adapter") -> None:
    """An adapter is only meaningful on the model whose hidden states made it (method.md §10)."""
    meta, facts = adapter.meta, base_facts(vlm)
    text = vlm.config.text
    if meta["base_config_sha256"] != facts["base_config_sha256"]:
        raise AdapterError(f"{path} was made for base model {meta['base_model']} (config sha256 "
                           f"{meta['base_config_sha256'][:12]}), not this one ({facts['base_config_sha256'][:12]})")
    if meta["base_weights_sha256"] != facts["base_weights_sha256"]:
        raise AdapterError(f"{path} was made for base model {meta['base_model']}: same architecture, different "
                           f"weights (sha256 {meta['base_weights_sha256'][:12]}, this one "
                           f"{facts['base_weights_sha256'][:12]})")
    shapes = lora_target_shapes(text)
    if meta["num_layers"] != text.num_hidden_layers or any(tuple(shapes[t]) != (i, o) for t, i, o in meta["targets"]):
        raise AdapterError(f"{path}: target shapes {meta['targets']} do not fit this base model")


# ------------------------------------------------------------------------------------------------ PEFT export
TINY_BASE = "checkpoints/tiny/base"   # the shipped toy base, relative to the repository root


def peft_base(meta: dict, model_dir=None) -> str:
    """What PEFT's `base_model_name_or_path` should say: the folder given, else the HF id of a released size, else
    the shipped toy base's folder relative to the repository root (AutoPeftModel resolves it from the working
    directory; PeftModel.from_pretrained(base, dir) ignores it). A local base needs its folder named."""
    if model_dir is not None:
        return str(model_dir)
    if meta.get("base_size") in PRESETS:
        return PRESETS[meta["base_size"]]
    if meta.get("base_size") == "tiny":
        return TINY_BASE
    raise AdapterError(f"the adapter was made on the local base model {meta.get('base_model')!r}; name the folder "
                       "transformers should load it from (compose.py --to-peft DIR --model BASE_DIR)")


def export_peft(adapter: Adapter, out_dir, model_dir=None) -> Path:
    """Write a PEFT LoRA for transformers' SmolVLMForConditionalGeneration. PEFT computes
    lora_B(lora_A(x)) * lora_alpha / r with lora_A.weight (R, d_in), lora_B.weight (d_out, R); we fold our alpha
    into lora_B (= alpha * B^T) and set lora_alpha = r = R, so PEFT's scale is exactly 1. `model_dir`: the base
    model's folder as the user names it (see peft_base)."""
    out_dir, R = Path(out_dir), adapter.meta["generated_rank"] + adapter.meta["rank"]
    parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    tensors = {}
    for t, (a, b) in adapter.ab.items():
        for l in range(a.shape[0]):
            key = f"base_model.model.model.text_model.layers.{l}.{parent[t]}.{t}"
            tensors[f"{key}.lora_A.weight"] = a[l].float().contiguous()                          # (R, d_in)
            tensors[f"{key}.lora_B.weight"] = (adapter.alpha * b[l].float().T).contiguous()      # (d_out, R)
    targets = "|".join(adapter.ab)
    config = {"peft_type": "LORA", "task_type": None, "r": R, "lora_alpha": R, "use_rslora": False,
              "target_modules": rf".*text_model\.layers\.\d+\.(self_attn|mlp)\.({targets})",
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "base_model_name_or_path": peft_base(adapter.meta, model_dir)}
    meta = {"format": "pt", META_KEY: json.dumps(adapter.meta, allow_nan=False)}
    write_atomic(out_dir / "adapter_model.safetensors", save(tensors, metadata=meta))
    write_atomic(out_dir / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------- what the scripts share
# Every command here (internalize.py, ask.py, compose.py, the toy world's scripts) ends the same way: success, or
# ONE line `error: ...` on stderr and a non-zero status; never a traceback for something a user did, never a
# half-written or clobbered file. `run_cli` is the boundary that guarantees it; `check_output` and `write_atomic`
# keep the user's files safe.

class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`error: ... (see --help)`, status 2) instead of a usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that every `finally`
    runs (temp files are removed) before the process exits with 128 + the signal number. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_ERRNO_HINTS = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
                errno.EROFS: "write elsewhere", errno.EACCES: "write elsewhere or fix the permissions",
                errno.ENAMETOOLONG: "use a shorter name", errno.EISDIR: "give a file name"}


def _on_signal(signum, frame):
    for s in _SIGNALS:  # the first signal starts the cleanup; later ones must not interrupt it
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


def error_line(e: BaseException) -> str:
    """The one line a user sees: `path: reason (what to do)` for a failed file operation, else the message's first
    line."""
    if isinstance(e, OSError) and e.strerror:
        hint = _ERRNO_HINTS.get(e.errno)
        return (f"{e.filename}: " if e.filename else "") + e.strerror + (f" ({hint})" if hint else "")
    first = (str(e).splitlines() or [""])[0]
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return f"out of memory ({first or 'host RAM'}); try fewer --frames, a smaller --video-size or fewer segments"
    return first or type(e).__name__


def run_cli(main, argv=None):
    """Run `main(argv)` as a command and exit. What it guarantees, whatever happens inside:

    - Ctrl-C (SIGINT), SIGTERM, SIGHUP: raised as exceptions (KeyboardInterrupt, Terminated), so cleanup runs;
      then one line on stderr and exit 128 + signal (130, 143, 129), so a calling script sees the interruption.
      A signal already ignored when we start (nohup's SIGHUP) stays ignored.
    - a closed stdout (`ask.py ... | head -1`): silent exit 141, as for SIGPIPE;
    - a failed file operation (OSError: full disk, read-only folder, name too long, ...), running out of memory, or
      a ValueError (this code's one-line error for a user's input): `error: <one line>`, exit 1;
    - SystemExit from `main` (argparse, `SystemExit("error: ...")`) passes through.
    Anything else is a bug and keeps its traceback; V2L_TRACEBACK=1 shows the traceback of every error. The signal
    handlers it installs are put back before it exits (it can run in-process, as the tests do)."""
    handlers = {s: signal.getsignal(s) for s in _SIGNALS}
    for s, h in handlers.items():
        if h is not signal.SIG_IGN:
            signal.signal(s, _on_signal)
    line, code = None, 0
    try:
        main(argv)
        sys.stdout.flush()
    except (KeyboardInterrupt, Terminated) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        line, code = f"interrupted ({signal.Signals(signum).name})", 128 + signum
        if getattr(e, "what", ""):   # train.py's Stopped: the work was saved, and how to go on
            line += f"; {e.what}"
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error when Python flushes
        code = 128 + signal.SIGPIPE
    except (OSError, MemoryError, torch.OutOfMemoryError, ValueError) as e:
        if os.environ.get("V2L_TRACEBACK"):
            raise
        line, code = error_line(e), 1
    finally:
        for s, h in handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    if line:
        print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


def finite(text: str) -> float:
    """argparse type: a float that is a number (not nan / inf)."""
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(text)
    return x


finite.__name__ = "finite number"   # argparse names the type in its message: "invalid finite number value"


def _files(p) -> list[Path]:
    """An input named by the user, as the files it stands for (a folder: the files in it)."""
    p = Path(p)
    return [f for f in p.iterdir() if f.is_file()] if p.is_dir() else [p] if p.exists() else []


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)   # same device and inode: catches symlinks and hard links alike
    except OSError:
        return False


def is_ours(path: Path) -> bool:
    """Whether an existing file is one this code writes (an adapter, a PEFT export's files): read the safetensors
    header only (8-byte length, then JSON), or the JSON config; never the tensors."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):   # a FIFO would block the read
            return False
        with open(path, "rb") as f:
            if path.suffix == ".json":
                return "peft_type" in json.loads(f.read(1 << 20))
            (n,) = struct.unpack("<Q", f.read(8))
            return n < 1 << 26 and META_KEY in json.loads(f.read(n)).get("__metadata__", {})
    except (OSError, ValueError, struct.error, AttributeError):
        return False


def _name_max(folder: Path) -> int:
    while not folder.exists():
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_output(path, inputs=(), force: bool = False) -> Path:
    """Refuse, before any work, an output that would lose data or cannot be written (ValueError, one line): one of
    the inputs (same file by device and inode, so via symlinks and hard links too), a folder, device, FIFO or
    socket where a file is meant, an existing regular file that this code did not write (unless `force`; an empty
    one is fine), a name past the file system's limit, a folder we cannot create files in."""
    path = Path(path)
    too_long = [part for part in path.parts if len(os.fsencode(part)) > _name_max(path.parent)]
    if too_long:
        raise ValueError(f"{path}: the name {too_long[0][:40]}... is longer than this file system allows "
                         f"({_name_max(path.parent)} bytes)")
    for f in (f for p in inputs for f in _files(p)):
        if _same(path, f):
            raise ValueError(f"{path} is one of the inputs ({f}); write the output elsewhere")
    if path.exists():
        mode = os.stat(path).st_mode   # follows a symlink: what would be written is its target
        if stat.S_ISDIR(mode):
            raise ValueError(f"{path} is a folder; give a file name")
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is not a regular file (a device, FIFO or socket); give a file name")
        if not force and os.stat(path).st_size > 0 and not is_ours(path):
            raise ValueError(f"{path} exists and was not written by Video2LoRA; pass --force to overwrite it")
    folder = Path(os.path.realpath(path)).parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{path}: {folder} is not a folder")
    probe = None
    try:   # can we create a file there at all? (read-only, full, no permission: said now, not after the work)
        fd, probe = tempfile.mkstemp(prefix=".v2l-", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as e:
        raise OSError(e.errno, f"cannot create a file in {folder}: {e.strerror}", str(path)) from None
    finally:
        if probe is not None:
            os.unlink(probe)
    return path


def _umask() -> int:
    try:  # Linux tells it without changing it
        return int(re.search(r"Umask:\s*([0-7]+)", Path("/proc/self/status").read_text())[1], 8)
    except (OSError, TypeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_atomic(path, write) -> Path:
    """Write `path` so that no reader ever sees half of it: `write` (bytes, str, or a function of the temp path)
    goes to a temp file in the same folder, which is then renamed over `path` (a symlink: over its target).

    The temp file is `.v2l-XXXXXXXX.tmp`: short, so it never exceeds the file-name limit however long `path` is,
    and covered by .gitignore. It is removed on any failure or interruption (run_cli turns SIGTERM into an
    exception, so this `finally` runs). The final file gets the permissions the umask gives a new file
    (mkstemp's own 0600 would hide it from the user's group)."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".v2l-", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            if not callable(write):
                f.write(write.encode() if isinstance(write, str) else write)
                f.flush()
                os.fsync(f.fileno())
        if callable(write):
            write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as e:   # name the file the user asked for, not our temp file
        if e.filename in (None, tmp):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path
