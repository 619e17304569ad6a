"""The adapter file: one video's LoRA, self-describing, shared by internalize.py, ask.py and compose.py.

Spec: ../shared/design/method.md §4 (how the LoRA is applied), §7 (rank-space composition). One safetensors file:

    {target}.A   (L, R, d_in)    float32 (or the dtype asked for), R = G + r
    {target}.B   (L, R, d_out)
      rows [0, G)    generated rows: r per segment, segments in order (G = n_segments * r), each already
                     multiplied by its segment weight (compose.py --weights)
      rows [G, G+r)  the hypernetwork's static "bias" LoRA, once, times bias_weight

    dW_l = alpha * B_l^T A_l  (d_out, d_in)   -- alpha used directly, not alpha / r (method.md §4)

and a JSON string under the metadata key "video2lora":

    format, format_version          "video2lora-adapter", 1
    base_model, base_size, base_model_dir      id (HF id, "tiny" or folder name), preset or null, resolved folder
    base_config_sha256, base_weights_sha256    sha256 of config.json as SmolVLMConfig.to_hf_dict (sorted keys), and
                                               of the text model's RMSNorm weights as bf16 (tells fine-tunes apart)
    hypernet, hypernet_sha256       path given (or hf:REPO/FILE), sha256 of the hypernet.safetensors read
    hypernet_release, hypernet_release_sha256, hypernet_trained_on
                                    only for the authors' released .pt: its file name, its sha256, its base model
    alpha, rank, num_layers, targets            128, r, L, [[name, d_in, d_out], ...]
    generated_rank, bias_weight     G, the static part's multiplier
    frames, video_size, frame_side  max frames per segment, resize edge, encoder side
    video, video_sha256, start, end the source and span (null when segments come from several videos)
    segments                        [{video, video_sha256, start, end, frames, weight}], in row order
    created_by, tensors_sha256      the writing script; sha256 of the tensor bytes (corruption is an error)

Every failure is an `AdapterError` whose message is one line, ready for `SystemExit(f"error: {e}")`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import lora_target_shapes

FORMAT, VERSION, META_KEY = "video2lora-adapter", 1, "video2lora"
REQUIRED = ("base_model", "base_config_sha256", "base_weights_sha256", "hypernet", "hypernet_sha256", "alpha", "rank",
            "generated_rank", "bias_weight", "num_layers", "targets", "segments", "tensors_sha256")


class AdapterError(ValueError):
    """A missing, corrupted or mismatched adapter; the message is one line."""


@dataclass
class Adapter:
    ab: dict[str, tuple[torch.Tensor, torch.Tensor]]   # target -> (A (L, R, d_in), B (L, R, d_out))
    meta: dict

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
    """What identifies a base model: its config, and its RMSNorm weights (a cheap weights fingerprint that tells
    a fine-tune from its base). Norms are hashed as bf16, which every supported load dtype round-trips exactly."""
    cfg = json.dumps(vlm.config.to_hf_dict(), sort_keys=True).encode()
    norms = [p.detach().float().cpu().flatten() for n, p in vlm.model.text_model.named_parameters() if "norm" in n]
    weights = torch.cat(norms).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    return {"base_config_sha256": hashlib.sha256(cfg).hexdigest(),
            "base_weights_sha256": hashlib.sha256(weights).hexdigest()}


# ------------------------------------------------------------------------------------------------ build
def adapter_from_lora(lora: dict, rank: int, meta: dict) -> Adapter:
    """The hypernetwork's output for ONE sample {t: (A (1, L, 2r, d_in), B (1, L, 2r, d_out))} -> an Adapter.
    The hypernetwork already puts generated rows first and the static rows last, the file's layout."""
    ab = {t: (a[0].detach().float().cpu(), b[0].detach().float().cpu()) for t, (a, b) in lora.items()}
    for t, (a, _) in ab.items():
        if a.shape[1] != 2 * rank:
            raise AdapterError(f"{t}: expected {2 * rank} rows (r generated + r static), got {a.shape[1]}")
    return Adapter(ab, {**meta, "rank": rank, "generated_rank": rank, "bias_weight": 1.0})


def concat_adapters(adapters: list[Adapter], weights=None, bias_weight: float = 1.0, meta: dict | None = None) -> Adapter:
    """method.md §7: A = [w_1 A_1; ...; w_n A_n; b A_bias], B = [B_1; ...; B_n; B_bias], so
    dW = alpha (sum_c w_c B_c^T A_c + b B_bias^T A_bias): segment updates add and the static part counts once.
    The inputs must share base model and hypernetwork (hence the same static part)."""
    first, weights = adapters[0], list(weights or [1.0] * len(adapters))
    if len(weights) != len(adapters):
        raise AdapterError(f"{len(weights)} weights for {len(adapters)} adapters")
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


# ------------------------------------------------------------------------------------------------ save / load
def _tensors(adapter: Adapter, dtype=None) -> dict[str, torch.Tensor]:
    return {f"{t}.{k}": x.to(dtype or x.dtype).contiguous() for t, ab in adapter.ab.items() for k, x in zip("AB", ab)}


def write_atomic(path, write) -> Path:
    """Call write(tmp_path), then rename over `path`: a crash or error never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_adapter(path, adapter: Adapter, dtype: torch.dtype | None = None) -> Path:
    tensors = _tensors(adapter, dtype)
    meta = {**adapter.meta, "format": FORMAT, "format_version": VERSION, "tensors_sha256": _sha256_tensors(tensors)}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt",
                                                                                   META_KEY: json.dumps(meta)}))


def _read(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file")
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
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise AdapterError(f"{path}: corrupted adapter metadata") from None
    return meta, tensors


def load_adapter(path, vlm=None) -> Adapter:
    """Read and verify an adapter: format, version, tensor names and shapes, the tensor checksum; with `vlm`, also
    that it was made for this base model (config and weights fingerprints, layer count, target shapes)."""
    path = Path(path)
    meta, tensors = _read(path)
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a Video2LoRA adapter (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > VERSION:
        raise AdapterError(f"{path}: adapter format version {meta['format_version']} is newer than this code "
                           f"({VERSION})")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise AdapterError(f"{path}: incomplete adapter metadata (no {', '.join(missing)})")
    if _sha256_tensors(tensors) != meta.get("tensors_sha256"):
        raise AdapterError(f"{path}: corrupted adapter (tensor checksum mismatch)")
    L, R = meta["num_layers"], meta["generated_rank"] + meta["rank"]
    want = {f"{t}.{k}": (L, R, d) for t, d_in, d_out in meta["targets"] for k, d in (("A", d_in), ("B", d_out))}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        raise AdapterError(f"{path}: tensors {sorted(got.items())[:2]} do not match the metadata "
                           f"{sorted(want.items())[:2]}")
    adapter = Adapter({t: (tensors[f"{t}.A"], tensors[f"{t}.B"]) for t, _, _ in meta["targets"]}, meta)
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
        raise AdapterError(f"{path} was made for base model {meta['base_model']}: same architecture, different weights")
    shapes = lora_target_shapes(text)
    if meta["num_layers"] != text.num_hidden_layers or any(tuple(shapes[t]) != (i, o) for t, i, o in meta["targets"]):
        raise AdapterError(f"{path}: target shapes {meta['targets']} do not fit this base model")


# ------------------------------------------------------------------------------------------------ PEFT export
def export_peft(adapter: Adapter, out_dir) -> Path:
    """Write a PEFT LoRA for transformers' SmolVLMForConditionalGeneration. PEFT computes
    lora_B(lora_A(x)) * lora_alpha / r with lora_A.weight (R, d_in), lora_B.weight (d_out, R); we fold our alpha
    into lora_B (= alpha * B^T) and set lora_alpha = r = R, so PEFT's scale is exactly 1."""
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
              "base_model_name_or_path": adapter.meta["base_model"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", META_KEY: json.dumps(adapter.meta)}
    write_atomic(out_dir / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    write_atomic(out_dir / "adapter_config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir
