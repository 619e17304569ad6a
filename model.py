"""SmolVLM2 in pure PyTorch: loads the released safetensors, taps hidden states, takes per-sample LoRA.

Spec: ../shared/design/smolvlm2.md. Module and parameter names are those of the Hugging Face checkpoint
(`model.text_model.layers.N.mlp.down_proj`), so loading is a strict one-to-one mapping.

    pixels (F, 3, S, S) -> SigLIP tower -> pixel shuffle + projection -> (F, image_seq_len, D)
    ids (B, T) -> embeddings, image features spliced at <image> positions -> Llama decoder -> logits

Two things the method needs and transformers does not offer directly:
  * hidden-state taps: the residual stream *entering* every decoder layer (what the hypernetwork reads);
  * LoRA as an argument of `forward`, per sample in the batch: y = W x + alpha * B^T (A x).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Configuration (smolvlm2.md §1). Absent keys take *transformers'* class defaults, not the released values:
# that is what transformers itself does, and the released configs rely on it (e.g. 500M omits vision layers).

PRESETS = {
    "256M": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    "500M": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    "2.2B": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
}
TINY_DIR = Path(__file__).resolve().parent / "checkpoints" / "tiny" / "base"  # the shipped toy-world base model


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    patch_size: int = 32
    image_size: int = 224
    layer_norm_eps: float = 1e-6  # llama.cpp and mlx-vlm use 1e-5 here, which is wrong (spec §1.4)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048


@dataclass(frozen=True)
class SmolVLMConfig:
    vision: VisionConfig
    text: TextConfig
    scale_factor: int = 2
    image_token_id: int = 128257  # Idefics3 default; every SmolVLM2 config overrides it (49190)
    tie_word_embeddings: bool = False

    @property
    def image_seq_len(self) -> int:
        """Tokens per frame: (S/P)^2 patches, pixel-shuffled by s in each direction."""
        return (self.vision.image_size // self.vision.patch_size) ** 2 // self.scale_factor**2

    @classmethod
    def from_hf_dict(cls, d: dict) -> "SmolVLMConfig":
        v, t = dict(d.get("vision_config") or {}), dict(d.get("text_config") or {})
        vision = VisionConfig(**{k: v[k] for k in VisionConfig.__dataclass_fields__ if k in v})
        # transformers >= 5 nests rope_theta in rope_parameters; older configs have it at the top of text_config.
        rope = t.get("rope_parameters") or {}
        theta = rope.get("rope_theta", t.get("rope_theta", TextConfig.rope_theta))
        if (rope.get("rope_type") or "default") != "default" or t.get("rope_scaling"):
            raise ValueError(f"unsupported RoPE scaling {rope or t.get('rope_scaling')}: SmolVLM2 uses none")
        fields = {k: t[k] for k in TextConfig.__dataclass_fields__ if k in t and t[k] is not None}
        fields["rope_theta"] = float(theta)
        heads = fields.get("num_attention_heads", TextConfig.num_attention_heads)
        fields.setdefault("num_key_value_heads", heads)  # Llama: no GQA unless stated
        fields.setdefault("head_dim", fields.get("hidden_size", TextConfig.hidden_size) // heads)
        return cls(vision=vision, text=TextConfig(**fields), scale_factor=d.get("scale_factor", 2),
                   image_token_id=d.get("image_token_id", 128257),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))

    def to_hf_dict(self) -> dict:
        """A config.json that both this loader and transformers' SmolVLMForConditionalGeneration read."""
        text = asdict(self.text)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
        return {"architectures": ["SmolVLMForConditionalGeneration"], "model_type": "smolvlm",
                "image_token_id": self.image_token_id, "scale_factor": self.scale_factor,
                "tie_word_embeddings": self.tie_word_embeddings,
                "vision_config": {"model_type": "smolvlm_vision", **asdict(self.vision)},
                "text_config": {"model_type": "llama", "tie_word_embeddings": self.tie_word_embeddings, **text}}


def preset_config(size: str) -> SmolVLMConfig:
    """The released architectures (spec §1), for shape checks and benchmarks without downloading weights."""
    vision = {"256M": VisionConfig(768, 3072, 12, 12, 16, 512), "500M": VisionConfig(768, 3072, 12, 12, 16, 512),
              "2.2B": VisionConfig(1152, 4304, 27, 16, 14, 384)}
    text = {"256M": TextConfig(49280, 576, 1536, 30, 9, 3, 64, 100000.0, 1e-5, 8192),
            "500M": TextConfig(49280, 960, 2560, 32, 15, 5, 64, 100000.0, 1e-5, 8192),
            "2.2B": TextConfig(49280, 2048, 8192, 24, 32, 32, 64, 273768.0, 1e-5, 16384)}
    if size not in vision:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(vision)}")
    return SmolVLMConfig(vision[size], text[size], scale_factor=3 if size == "2.2B" else 4, image_token_id=49190)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_shapes(text: TextConfig) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every decoder linear a LoRA can target."""
    D, I, q, kv = text.hidden_size, text.intermediate_size, text.num_attention_heads * text.head_dim, \
        text.num_key_value_heads * text.head_dim
    return {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
            "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}


# ----------------------------------------------------------------------------------------------------------------
# Vision tower: SigLIP, bidirectional, pre-LN (spec §4.1).

class VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (F, V, h, w) -> (F, N, V), row-major patches
        # NaViT bucketed position ids reduce to the identity for full S x S frames, and SmolVLM frames are always
        # full: no pixel mask, no bucketing. (transformers 4.54-4.57 shift these ids; see spec §4.1.)
        return x + self.position_embedding.weight[: x.shape[1]]


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(c.hidden_size, c.hidden_size) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Fr, N, V = x.shape
        q, k, v = (p(x).view(Fr, N, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (F, H, N, hd), full softmax over the frame's patches
        return self.out_proj(y.transpose(1, 2).reshape(Fr, N, V))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.encoder = VisionEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (F, 3, S, S) -> (F, N, V)
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class ModalityProjection(nn.Module):
    def __init__(self, c: SmolVLMConfig):
        super().__init__()
        self.proj = nn.Linear(c.vision.hidden_size * c.scale_factor**2, c.text.hidden_size, bias=False)


class Connector(nn.Module):
    """Pixel shuffle (space-to-depth by s) then a linear projection into the text width (spec §4.2)."""

    def __init__(self, c: SmolVLMConfig):
        super().__init__()
        self.s = c.scale_factor
        self.modality_projection = ModalityProjection(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Fr, N, V = x.shape
        h = w = math.isqrt(N)
        s = self.s
        # Output token (bi, bj) concatenates patches (bi*s + dr, bj*s + dc), dr outer and dc inner: exactly the
        # reference's chain of views and permutes, written as one permute.
        x = x.reshape(Fr, h // s, s, w // s, s, V).permute(0, 1, 3, 2, 4, 5)  # (F, h/s, w/s, s, s, V)
        x = x.reshape(Fr, (h // s) * (w // s), s * s * V)
        return self.modality_projection.proj(x)  # (F, image_seq_len, D)


# ----------------------------------------------------------------------------------------------------------------
# Text decoder: Llama (spec §4.4), with LoRA threaded through every linear it may target.

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32, cast back, *then* scale: the order matters for bf16 parity (nanoVLM gets it wrong).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """NeoX rotary tables for (B, T) positions -> cos, sin of shape (B, 1, T, head_dim), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    ang = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat([ang, ang], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half: non-interleaved
    return x * cos + rotated * sin


def lora_linear(linear: nn.Linear, x: torch.Tensor, ab, alpha: float) -> torch.Tensor:
    """y = W x + alpha * B^T (A x), per sample; A (B|1, r, d_in), B (B|1, r, d_out), x (B, T, d_in).

    The LoRA path runs in fp32 and is cast back (method.md §4). alpha multiplies directly: it is *not* alpha/r.
    As the authors' lora_forward: the fp32 delta is added to W x and the sum rounded once to W x's dtype (rounding
    the delta to bf16 first would round twice). In fp32 the two are the same.
    """
    y = linear(x)
    if ab is None:
        return y
    A, B = ab
    delta = (x.float() @ A.float().transpose(-1, -2)) @ B.float()  # (B, T, r) -> (B, T, d_out)
    return (y + alpha * delta).to(y.dtype)


class KVCache:
    """Preallocated keys and values for every layer, plus which slots hold real (unpadded) tokens."""

    def __init__(self, c: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far
        self.padded = False  # whether a filled slot may be padding (then every step checks the mask)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's (B, Hkv, T, hd) keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache full: {end} positions > {self.k.shape[3]} preallocated")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, c: TextConfig, layer_idx: int):
        super().__init__()
        self.c, self.layer_idx = c, layer_idx
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, q_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, lora: dict, alpha: float):
        B, T, _ = x.shape
        c = self.c
        q = lora_linear(self.q_proj, x, lora.get("q_proj"), alpha).view(B, T, -1, c.head_dim).transpose(1, 2)
        k = lora_linear(self.k_proj, x, lora.get("k_proj"), alpha).view(B, T, -1, c.head_dim).transpose(1, 2)
        v = lora_linear(self.v_proj, x, lora.get("v_proj"), alpha).view(B, T, -1, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # q (B, Hq, T, hd), k (B, Hkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, past + T, hd)
        # GQA without materialising repeated heads: kv head g serves q heads g*r .. g*r + r - 1.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           scale=c.head_dim**-0.5, enable_gqa=True)
        return lora_linear(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), lora.get("o_proj"), alpha)


class MLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x, lora: dict, alpha: float):
        h = F.silu(lora_linear(self.gate_proj, x, lora.get("gate_proj"), alpha)) \
            * lora_linear(self.up_proj, x, lora.get("up_proj"), alpha)
        return lora_linear(self.down_proj, h, lora.get("down_proj"), alpha)


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer_idx)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache, lora, alpha):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, lora, alpha)
        return h + self.mlp(self.post_attention_layernorm(h), lora, alpha)


class TextModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class SmolVLMModel(nn.Module):
    """Container that reproduces the checkpoint's `model.` prefix."""

    def __init__(self, c: SmolVLMConfig):
        super().__init__()
        self.vision_model = VisionTransformer(c.vision)
        self.connector = Connector(c)
        self.text_model = TextModel(c.text)


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, V); (B, 1, V) for logits="last"; (N, V) for a mask; None for "none"
    hidden_states: list[torch.Tensor] | None  # L x (B, T, D): the residual stream entering each layer


def _attention_mask(cache: KVCache | None, attention_mask, B: int, T: int, device, position_ids=None):
    """Positions (B, T) and the SDPA mask (B, 1, T, S) or None (plain causal) for this step.

    Positions follow `generate` in transformers: cumsum(mask) - 1, so left padding puts the first real token at
    position 0 and a padded sequence computes exactly what the unpadded one does.
    A (B, T, T) attention_mask says outright which keys each query sees (several answers packed after one shared
    prefix, each seeing the prefix and itself only); it comes with its position_ids and no cache.
    """
    if attention_mask is not None and attention_mask.dim() == 3:
        if cache is not None or position_ids is None:
            raise ValueError("a (B, T, T) attention_mask needs position_ids and no KV cache")
        eye = torch.eye(T, dtype=torch.bool, device=device)  # every query sees itself: no empty softmax row
        return position_ids, (attention_mask.bool() | eye)[:, None]
    past = cache.length if cache is not None else 0
    new = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    if cache is not None:
        cache.mask[:, past:past + T] = new
        full = cache.mask[:, :past + T]
    else:
        full = new
    positions = (full.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    # No (B, T) mask and no padding cached before: every slot is real, known without reading the mask on the
    # device (a GPU sync, and a graph break under torch.compile, at every decode step otherwise).
    dense = (attention_mask is None and (cache is None or not cache.padded)) or bool(full.all())
    if cache is not None:
        cache.padded = not dense
    if dense and (past == 0 or T == 1):
        return positions, None  # no padding: causal (or, for one new token, nothing) suffices
    q_idx = torch.arange(past, past + T, device=device)[:, None]
    k_idx = torch.arange(past + T, device=device)[None, :]
    mask = (k_idx <= q_idx)[None] & full[:, None, :]  # (B, T, S): causal and not padding
    mask |= (k_idx == q_idx)[None]  # a padded query still sees itself, so no softmax row is empty (NaN)
    return positions, mask[:, None]


class SmolVLM(nn.Module):
    def __init__(self, config: SmolVLMConfig):
        super().__init__()
        self.config = config
        self.model = SmolVLMModel(config)
        # Tied checkpoints store no lm_head; the logits then reuse the embedding matrix.
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(F, 3, S, S) or padded (B, F, 3, S, S) frames -> (F_real, image_seq_len, D)."""
        pixels = pixel_values.flatten(0, -4).to(self.model.connector.modality_projection.proj.weight.dtype)
        # Batches of samples with different frame counts are padded with all-zero frames; they carry no tokens.
        pixels = pixels[pixels.flatten(1).ne(0).any(1)]
        return self.model.connector(self.model.vision_model(pixels))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        x = self.model.text_model.embed_tokens(input_ids)  # (B, T, D)
        is_image = input_ids == self.config.image_token_id
        if pixel_values is not None and bool(is_image.any()):
            feats = self.image_features(pixel_values).flatten(0, 1)  # (F * image_seq_len, D), in prompt order
            if feats.shape[0] != int(is_image.sum()):
                raise ValueError(f"{int(is_image.sum())} <image> tokens but {feats.shape[0]} image features "
                                 f"({feats.shape[0] // self.config.image_seq_len} frames)")
            x = x.masked_scatter(is_image[..., None], feats.to(x.dtype))
        return x

    def forward(self, input_ids, pixel_values=None, attention_mask=None, lora=None, lora_alpha: float = 128.0,
                cache: KVCache | None = None, output_hidden_states: bool = False, logits: str | torch.Tensor = "all",
                position_ids=None):
        """lora: {target: (A (B, L, r, d_in), B (B, L, r, d_out))}; a leading 1 broadcasts over the batch.
        attention_mask: (B, T), 1 = real token; or (B, T, T), True = query may see key, with position_ids (B, T).
        logits: "all", "last", "none", or a (B, T) bool mask: the logits of those positions only, (N, V) in row-major
        order (training on a few answer tokens among many video tokens skips the rest of the head and its softmax)."""
        c = self.config.text
        B, T = input_ids.shape
        x = self.embed(input_ids, pixel_values)
        positions, mask = _attention_mask(cache, attention_mask, B, T, x.device, position_ids)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.model.text_model.layers):
            if hidden is not None:
                hidden.append(x)  # entering layer i: entry 0 is the embeddings after the image splice
            layer_lora = {name: (ab[0][:, i], ab[1][:, i]) for name, ab in (lora or {}).items()}
            x = layer(x, cos, sin, mask, cache, layer_lora, lora_alpha)
        if cache is not None:
            cache.length += T
        if isinstance(logits, torch.Tensor):
            x = x[logits]
        elif logits == "none":
            return ModelOutput(None, hidden)
        elif logits == "last":
            x = x[:, -1:]
        x = self.model.text_model.norm(x)
        head = self.lm_head.weight if self.lm_head is not None else self.model.text_model.embed_tokens.weight
        return ModelOutput(F.linear(x, head), hidden)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.model.text_model.embed_tokens.weight
        return KVCache(self.config.text, batch, max_len, w.dtype, w.device)


# ----------------------------------------------------------------------------------------------------------------
# Loading: strict, from the meta device, one tensor at a time (no second copy of the weights in memory).

def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return [single]


def _digest(name: str, t: torch.Tensor) -> tuple[str, str]:
    h = hashlib.sha256(f"{name}:{str(t.dtype).replace('torch.', '')}:{list(t.shape)};".encode())
    h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())   # raw bytes, any dtype
    return name, h.hexdigest()


def weights_sha256(named_tensors, digests: list | None = None) -> str:
    """The base model's weights fingerprint (what adapters record): sha256 over every tensor's name, dtype, shape
    and bytes, in name order, so ANY change of ANY weight tells two models apart. hashlib releases the GIL, so the
    tensors are hashed on a few threads; `digests`, if given, are (name, hex) pairs already computed."""
    digests = list(digests or [])
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests += pool.map(lambda kv: _digest(*kv), named_tensors)
    return hashlib.sha256("".join(f"{n}:{d}\n" for n, d in sorted(digests)).encode()).hexdigest()


def read_config(path: Path) -> tuple[SmolVLMConfig, list[Path], dict]:
    """(config, weight files, {tensor: shape}) of a model folder, reading headers only."""
    from safetensors import safe_open

    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face SmolVLM2 model folder)")
    files, shapes = _weight_files(path), {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            shapes.update({name: tuple(st.get_slice(name).get_shape()) for name in st.keys()})
    # The checkpoint, not the flag, decides: an lm_head tensor means an untied head (the released models).
    config = replace(SmolVLMConfig.from_hf_dict(json.loads((path / "config.json").read_text())),
                     tie_word_embeddings="lm_head.weight" not in shapes)
    return config, files, shapes


def folder_weights_sha256(path) -> str:
    """weights_sha256 of a model folder's tensors, read one at a time: no model is built."""
    from safetensors import safe_open

    _, files, _ = read_config(Path(path))
    digests = []
    for f in files:
        with safe_open(f, framework="pt") as st:
            digests += [_digest(name, st.get_tensor(name)) for name in st.keys()]
    return weights_sha256([], digests)


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu") -> SmolVLM:
    """Build on the meta device, then fill every parameter from the checkpoint with assign=True. The model's
    `weights_sha256` is the fingerprint of the tensors as stored (weights_sha256), hashed while they load: the same
    whatever dtype or device they are loaded to."""
    from safetensors import safe_open

    path = Path(path)
    config, files, shapes = read_config(path)
    with torch.device("meta"):
        model = SmolVLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name in expected.keys() - shapes.keys():
        raise ValueError(f"checkpoint is missing tensor {name} (shape {list(expected[name])})")
    for name in shapes.keys() - expected.keys():
        raise ValueError(f"checkpoint has unexpected tensor {name} (shape {list(shapes[name])})")
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise ValueError(f"tensor {name} has shape {list(shape)} but config.json implies {list(expected[name])}")
    state, workers = {}, min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:   # hashing overlaps the loading; few tensors in flight
        pending, done = set(), []
        for f in files:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    stored = st.get_tensor(name)
                    pending.add(pool.submit(_digest, name, stored))
                    state[name] = stored.to(device=device, dtype=dtype)
                    if len(pending) > 2 * workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        done += [x.result() for x in finished]
        done += [x.result() for x in pending]
    model.load_state_dict(state, strict=True, assign=True)
    model.weights_sha256 = weights_sha256([], done)
    return model.eval().requires_grad_(False)


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" is CUDA when there is one, else the CPU; "cuda" means this process's GPU under torchrun. A device
    this machine does not have is a ValueError that says which it has."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {name}: no CUDA device here (torch {torch.__version__}, {build}); "
                             "use --device cpu")
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: no MPS device here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
    return device


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Base-model weights: "auto" is bf16 on CUDA as released (method.md §3.3), fp32 on CPU (bit-reproducible)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_model_dir(size: str | None = None, model_dir=None) -> Path:
    """--model DIR wins; else the preset: "tiny" ships in the repo, released sizes come from the HF cache or hub."""
    if model_dir is not None:
        return Path(model_dir)
    if size is None or size == "tiny":
        return TINY_DIR
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}: choose tiny, {', '.join(PRESETS)} or pass --model DIR")
    from huggingface_hub import constants, snapshot_download  # installed with tokenizers

    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:  # the standard cache first, so an offline machine with the weights never touches the network
        return Path(snapshot_download(PRESETS[size], allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:  # resumable, shows progress, honours HF_HUB_OFFLINE and HF_TOKEN
        return Path(snapshot_download(PRESETS[size], allow_patterns=patterns))
    except Exception as e:  # offline, no network, gated, disk full...: one line that says what to do
        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else \
            f"downloading it failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
        raise ValueError(f"{PRESETS[size]} is not in the Hugging Face cache and {why}; download it once with "
                         "network access, or pass --model DIR (a local SmolVLM2 folder)") from None


# ----------------------------------------------------------------------------------------------------------------
# Generation (spec §4.5): prefill with pixels, then one token per step from the KV cache, same LoRA every step.

def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: greedy at temperature 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: SmolVLM, input_ids, attention_mask=None, pixel_values=None, lora=None, lora_alpha=128.0,
             max_new_tokens: int = 64, eos_token_id: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             generator=None, on_token: Callable[[torch.Tensor], None] | None = None) -> list[list[int]]:
    """Left-padded prompts (B, T) -> the new tokens of each sample, stopping at eos (not included). The prompt and
    the answer must fit the model's context (max_position_embeddings): the KV cache is allocated for both."""
    B, T = input_ids.shape
    context = model.config.text.max_position_embeddings
    if not (isinstance(max_new_tokens, int) and 1 <= max_new_tokens):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    if T + max_new_tokens > context:
        raise ValueError(f"a prompt of {T} tokens plus {max_new_tokens} new tokens is past the model's context of "
                         f"{context} tokens; shorten the input or ask for at most {max(context - T, 0)} new tokens")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    cache = model.new_cache(B, T + max_new_tokens)
    out = model(input_ids, pixel_values, attention_mask, lora, lora_alpha, cache=cache, logits="last")
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        nxt = sample_next(out.logits[:, -1], temperature, top_p, generator)  # (B,)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done, eos_token_id)
            done |= nxt == eos_token_id
        tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        out = model(nxt[:, None], lora=lora, lora_alpha=lora_alpha, cache=cache, logits="last")
    result = []
    for row in torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(B)]:
        result.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    return result
