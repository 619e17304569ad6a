"""The Perceiver hypernetwork: per-layer hidden states of one video in, one LoRA per layer out.

Spec: ../shared/design/method.md §3 (structure, released hyper-parameters), §4 (how the LoRA is used), §7
(rank-space layout). Mirrors the authors' `ctx_to_lora` HyperLoRA + Idefics2Perceiver; submodule names follow
theirs (`modality_projection`, `encoder.layers.N.input_latents_layernorm`, `latents_q`, ...) so mapping the
released weights onto this module is a short rename.

    H (B, L, T, D) --fold layers into batch--> (B*L, T, D)
      -> SwiGLU projection D -> 4D -> 512                      (B*L, T, 512)
      -> encoder: 8 latents x 9 cross-attention blocks         (B*L, 8, 512)
      -> decoder: r queries per target, 1 cross-attention      (B*L, n_targets*r, 512)
      -> residual pre-head MLP, L2 normalise                   (B, L, n_targets*r, 512)
      -> per-layer head 512 -> d_in + d_out, scalers           (B, L, r, d_in) and (B, L, r, d_out)
      -> append the learned static LoRA                        A (B, L, 2r, d_in), B (B, L, 2r, d_out)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import sys
import time
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from adapter import sha256_file
from model import LORA_TARGETS, lora_target_shapes


@dataclass(frozen=True)
class HyperConfig:
    """Released hyper-parameters (method.md §3.1) plus the base-model facts the shapes depend on."""
    num_layers: int                                   # L: decoder layers of the base model (one LoRA each)
    hidden_size: int                                  # D: width of the hidden states read
    target_shapes: tuple[tuple[str, int, int], ...]   # (module name, d_in, d_out) per LoRA target
    latent_size: int = 512
    n_latents: int = 8
    num_blocks: int = 9
    n_heads: int = 16
    head_dim: int = 128
    n_kv_heads: int = 4
    rank: int = 16
    proj_mult: int = 4                                # modality projection D -> proj_mult * D -> latent_size
    alpha: float = 128.0                              # the multiplier itself, not alpha/r (method.md §4)
    rms_norm_eps: float = 1e-6
    # How dW = 0 is reached at initialisation. "released": scaler_B = 0 (method.md §3.2, what the authors trained).
    # "lora": the head's B columns = 0 and scaler_B = 1, plain LoRA's zero-B trick. Same function at init, but with
    # scaler_B = 0 no gradient reaches the generating head until scaler_B itself drifts away from 0; in a short
    # training run the static LoRA absorbs everything meanwhile and the adapter never depends on the video.
    init: str = "released"
    # Beyond the released recipe (toy/recipes/hypernet.toml uses it): "batch" standardises every feature of the
    # perceiver's output over the clips of a training batch (BatchNorm without affine, per layer, query row and
    # feature) and by running statistics at inference. The clip-to-clip part of a uniformly pooled state is small beside the part every clip
    # shares; standardising leaves only the first, so the generated rows depend on the video from step 1 and the
    # static rows carry what all videos share. "none" (released): no such layer.
    out_norm: str = "none"

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.target_shapes)

    @classmethod
    def for_model(cls, model_config, targets=("down_proj",), **overrides) -> "HyperConfig":
        """Read L, D and every target's (d_in, d_out) from a SmolVLMConfig; defaults are the released ones."""
        text = model_config.text
        shapes = lora_target_shapes(text)
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {list(LORA_TARGETS)}")
        # Sorted in LORA_TARGETS order so the decoder's query rows have one canonical layout.
        ordered = [t for t in LORA_TARGETS if t in targets]
        return cls(num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                   target_shapes=tuple((t, *shapes[t]) for t in ordered), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HyperConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown HyperConfig keys {sorted(unknown)}")
        # JSON turns tuples into lists; a frozen config keeps them hashable tuples.
        return cls(**{**d, "target_shapes": tuple(tuple(s) for s in d["target_shapes"])})

    def check_matches(self, model_config) -> None:
        """Raise a one-line ValueError unless this hypernetwork fits `model_config` (L, D, target dims)."""
        other = HyperConfig.for_model(model_config, self.targets)
        facts = lambda c: (c.num_layers, c.hidden_size, c.target_shapes)  # noqa: E731
        if facts(other) != facts(self):
            raise ValueError(f"hypernetwork was built for {self.describe()} but the base model has {other.describe()}")

    def describe(self) -> str:
        return f"L={self.num_layers}, D={self.hidden_size}, " + ", ".join(
            f"{n} {i}->{o}" for n, i, o in self.target_shapes)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (Idefics2 perceiver, as in the authors' idefics2.py).

class RMSNorm(nn.Module):
    """Idefics2RMSNorm: normalise in fp32, cast back, then scale (so under autocast the result is fp32)."""
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), bias-free: the modality projection and every perceiver FFN."""
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CrossAttention(nn.Module):
    """Latents attend to [context; latents] (method.md §3.2.3). GQA: 16 query heads share 4 K/V heads."""
    def __init__(self, c: HyperConfig):
        super().__init__()
        W, H, Hkv, hd = c.latent_size, c.n_heads, c.n_kv_heads, c.head_dim
        self.shape = (H, Hkv, hd)
        self.q_proj = nn.Linear(W, H * hd, bias=False)
        self.k_proj = nn.Linear(W, Hkv * hd, bias=False)
        self.v_proj = nn.Linear(W, Hkv * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, W, bias=False)

    def forward(self, z, x, keep):  # z (N, Q, W) latents, x (N, T, W) context, keep (N, T+Q) bool or None
        (N, Q, _), (H, Hkv, hd) = z.shape, self.shape
        g = H // Hkv                                                      # query heads per K/V head
        kv = torch.cat([x, z], dim=1)                                     # (N, T+Q, W): context first
        # Query head h = j*g + i uses K/V head j (repeat_kv); grouping the g heads of a K/V head as extra query rows
        # gives the same products without materialising repeated keys and values.
        q = self.q_proj(z).view(N, Q, Hkv, g, hd).permute(0, 2, 3, 1, 4).reshape(N, Hkv, g * Q, hd)
        k = self.k_proj(kv).view(N, -1, Hkv, hd).transpose(1, 2)          # (N, Hkv, T+Q, hd)
        v = self.v_proj(kv).view(N, -1, Hkv, hd).transpose(1, 2)          # (N, Hkv, T+Q, hd)
        # Written out as Idefics2PerceiverAttention computes it, not with SDPA: scores divided by sqrt(hd), padding
        # pushed to the dtype's minimum, softmax in fp32 and cast back to q's dtype (bf16 under autocast) before
        # the product with v. The released hypernetworks were trained with exactly this; in fp32 it reproduces the
        # authors' adapters bit for bit (SDPA's fused kernels differ by ~2e-8, ~1e-5 in logits). With only 8 or 16
        # queries the (N, Hkv, g*Q, T+Q) score matrix is small.
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd)           # (N, Hkv, g*Q, T+Q)
        if keep is not None:
            w = w + torch.zeros_like(w[:, :1, :1]).masked_fill(~keep[:, None, None, :], torch.finfo(w.dtype).min)
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(w, v).view(N, Hkv, g, Q, hd)                      # (N, Hkv, g, Q, hd)
        return self.o_proj(o.permute(0, 3, 1, 2, 4).reshape(N, Q, H * hd))  # (N, Q, W)


class PerceiverLayer(nn.Module):
    """One cross-attention block; RMSNorm before *and* after both attention and FFN (Idefics2PerceiverLayer)."""
    def __init__(self, c: HyperConfig):
        super().__init__()
        W, eps = c.latent_size, c.rms_norm_eps
        self.input_latents_layernorm, self.input_context_layernorm = RMSNorm(W, eps), RMSNorm(W, eps)
        self.self_attn = CrossAttention(c)
        self.post_attention_layernorm = RMSNorm(W, eps)
        self.pre_ff_layernorm, self.post_ff_layernorm = RMSNorm(W, eps), RMSNorm(W, eps)
        self.mlp = SwiGLU(W, 4 * W, W)

    def forward(self, z, x, keep):
        zn, xn = self.input_latents_layernorm(z), self.input_context_layernorm(x)
        z = z + self.post_attention_layernorm(self.self_attn(zn, xn, keep))
        return z + self.post_ff_layernorm(self.mlp(self.pre_ff_layernorm(z)))


class Resampler(nn.Module):
    """Learned queries + `depth` cross-attention blocks + RMSNorm; no latent self-attention (released config)."""
    def __init__(self, c: HyperConfig, n_queries: int, depth: int):
        super().__init__()
        self.latents_q = nn.Parameter(torch.randn(n_queries, c.latent_size))
        self.layers = nn.ModuleList(PerceiverLayer(c) for _ in range(depth))
        self.layernorm = RMSNorm(c.latent_size, c.rms_norm_eps)

    def forward(self, x, keep_ctx=None):  # x (N, T, W), keep_ctx (N, T) bool or None -> (N, Q, W)
        N, Q = x.shape[0], self.latents_q.shape[0]
        z = self.latents_q.expand(N, -1, -1)
        keep = None  # the queries are always visible, so only the context part of the mask can be False
        if keep_ctx is not None:
            keep = torch.cat([keep_ctx, keep_ctx.new_ones(N, Q)], dim=1)  # (N, T+Q)
        for layer in self.layers:
            z = layer(z, x, keep)
        return self.layernorm(z)


class PreHead(nn.Module):
    """x + LN(Lin(SiLU(Lin(LN(x))))), with biases: the authors' ResMLPBlock, one block shared by all layers."""
    def __init__(self, W: int):
        super().__init__()
        self.norm_in, self.fc1 = nn.LayerNorm(W), nn.Linear(W, 4 * W)
        self.fc2, self.norm_out = nn.Linear(4 * W, W), nn.LayerNorm(W)

    def forward(self, x):
        return x + self.norm_out(self.fc2(F.silu(self.fc1(self.norm_in(x)))))


# ----------------------------------------------------------------------------------------------------------------
# The hypernetwork.

class HyperNet(nn.Module):
    def __init__(self, config: HyperConfig):
        super().__init__()
        c = self.config = config
        L, W, r = c.num_layers, c.latent_size, c.rank
        self.modality_projection = SwiGLU(c.hidden_size, c.proj_mult * c.hidden_size, W)
        self.encoder = Resampler(c, c.n_latents, c.num_blocks)
        # Rows [i*r, (i+1)*r) of the decoder queries belong to target i: each target has its own r queries.
        self.decoder = Resampler(c, len(c.targets) * r, 1)
        self.pre_head = PreHead(W)
        P = lambda *shape: nn.Parameter(torch.empty(*shape))  # noqa: E731
        self.head = nn.ParameterDict({t: P(L, W, i + o) for t, i, o in c.target_shapes})    # per-layer head
        self.scaler_A = nn.ParameterDict({t: P(L, r) for t in c.targets})                   # per (layer, row)
        self.scaler_B = nn.ParameterDict({t: P(L, r) for t in c.targets})
        self.bias_A = nn.ParameterDict({t: P(L, r, i) for t, i, o in c.target_shapes})      # static LoRA
        self.bias_B = nn.ParameterDict({t: P(L, r, o) for t, i, o in c.target_shapes})
        if c.out_norm not in ("none", "batch"):
            raise ValueError(f"unknown hypernetwork out_norm {c.out_norm!r}: choose none or batch")
        if c.out_norm == "batch":  # saved with the weights; a hypernetwork without them has no such tensors
            n_q = len(c.targets) * r
            self.register_buffer("running_mean", torch.zeros(L * n_q * W))
            self.register_buffer("running_var", torch.ones(L * n_q * W))
        self.perceive = self._perceive  # compile_hypernet() swaps in a compiled version; weights are unchanged
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Init of method.md §3.2. Scalers B and bias B start at 0, so the LoRA's dW is exactly 0.

        Every linear is N(0, 0.02) as the spec says; the authors' pre-head (a plain nn.Module) appears to keep
        PyTorch's default init instead. Only training from scratch can tell the two apart.
        """
        c = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.encoder.latents_q)
        nn.init.normal_(self.decoder.latents_q)
        if c.init not in ("released", "lora"):
            raise ValueError(f"unknown hypernetwork init {c.init!r}: choose released or lora")
        for t, d_in, d_out in c.target_shapes:
            nn.init.normal_(self.head[t], 0.0, 0.5 / math.sqrt(c.latent_size + (d_in + d_out) * c.rank))
            nn.init.ones_(self.scaler_A[t])
            if c.init == "lora":
                with torch.no_grad():
                    self.head[t][..., d_in:] = 0.0  # (L, W, d_in + d_out): the B half of every generated row
                nn.init.ones_(self.scaler_B[t])
            else:
                nn.init.zeros_(self.scaler_B[t])
            nn.init.normal_(self.bias_A[t], 0.0, 0.2 / math.sqrt(d_in * c.rank))
            nn.init.zeros_(self.bias_B[t])
        if c.out_norm == "batch":
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def _perceive(self, h, keep):  # h (N, T, D) one sequence per (sample, layer), keep (N, T) -> (N, n_q, W)
        x = self.modality_projection(h.to(self.modality_projection.gate_proj.weight.dtype))  # (N, T, W)
        return self.decoder(self.encoder(x, keep))

    def forward(self, hidden_states, mask=None, layer_chunk=None, amp_dtype="auto"):
        """hidden_states (B, L, T, D), mask (B, T) 1 = real -> {target: (A (B, L, 2r, d_in), B (B, L, 2r, d_out))}.

        layer_chunk: run the perceiver on this many layers at a time (None = all L at once). Peak activation
        memory scales with layer_chunk * T instead of L * T; under autograd each chunk is also checkpointed.
        amp_dtype: autocast dtype for the perceiver ("auto" = bf16 on CUDA as released, fp32 elsewhere; None = off).
        """
        c, (B, L, T, D) = self.config, hidden_states.shape
        if (L, D) != (c.num_layers, c.hidden_size):
            raise ValueError(f"hidden states have L={L}, D={D}; the hypernetwork expects "
                             f"L={c.num_layers}, D={c.hidden_size}")
        keep = torch.ones(B, T, dtype=torch.bool, device=hidden_states.device) if mask is None else mask.bool()
        dev = hidden_states.device.type
        if amp_dtype == "auto":
            amp_dtype = torch.bfloat16 if dev == "cuda" else None
        step, embs = layer_chunk or L, []
        for l0 in range(0, L, step):
            h = hidden_states[:, l0:l0 + step]                                      # (B, l, T, D)
            n = h.shape[1]
            k = keep[:, None, :].expand(B, n, T).reshape(B * n, T)                 # the mask, repeated per layer
            with torch.autocast(dev, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                if layer_chunk and torch.is_grad_enabled():  # keep only chunk inputs; recompute in backward
                    e = checkpoint(self.perceive, h.reshape(B * n, T, D), k, use_reentrant=False)
                else:
                    e = self.perceive(h.reshape(B * n, T, D), k)                   # (B*n, n_q, W)
            embs.append(e.float().view(B, n, -1, c.latent_size))
        # Pre-head, L2 norm and head run in fp32 outside autocast, as in the authors' HyperLoRA.forward.
        e = torch.cat(embs, dim=1)                                                  # (B, L, n_q, W)
        if c.out_norm == "batch":
            e = self._standardize(e)
        e = F.normalize(self.pre_head(e), dim=-1)
        return self._to_lora(e)

    def _standardize(self, e):  # (B, L, n_q, W): each feature over the batch in training, running stats otherwise
        batch_stats = self.training and e.shape[0] > 1  # one clip has no spread to measure: use the running stats
        flat = F.batch_norm(e.reshape(e.shape[0], -1), self.running_mean, self.running_var,
                            training=batch_stats, momentum=0.1, eps=1e-5)
        return flat.view_as(e)

    def _to_lora(self, e):  # e (B, L, n_q, W) -> {target: (A (B, L, 2r, d_in), B (B, L, 2r, d_out))}
        B, r, out = e.shape[0], self.config.rank, {}
        for i, (t, d_in, d_out) in enumerate(self.config.target_shapes):
            rows = torch.einsum("blrw,lwk->blrk", e[:, :, i * r:(i + 1) * r], self.head[t])  # (B, L, r, d_in+d_out)
            a, b = rows.split([d_in, d_out], dim=-1)
            a = a * self.scaler_A[t][None, :, :, None]                              # one scaler per (layer, row)
            b = b * self.scaler_B[t][None, :, :, None]
            # Generated rows first, then the static rows (combine_lora); the static part is video-independent.
            A = torch.cat([a, self.bias_A[t].expand(B, -1, -1, -1)], dim=2)         # (B, L, 2r, d_in)
            Bm = torch.cat([b, self.bias_B[t].expand(B, -1, -1, -1)], dim=2)        # (B, L, 2r, d_out)
            out[t] = (A, Bm)
        return out


def internalize(vlm, hyper: HyperNet, input_ids, attention_mask=None, pixel_values=None, layer_chunk=None) -> dict:
    """method.md §2 + §3: the frozen VLM reads [video + instruction] with *no* LoRA, and the hypernetwork turns the
    residual streams entering its L layers into one adapter per sample. Returns what `vlm.forward(lora=...)` takes.

    Only the VLM pass is under no_grad: in training, gradients flow through the hypernetwork (never into the VLM).
    """
    with torch.no_grad():
        out = vlm(input_ids, pixel_values, attention_mask, output_hidden_states=True, logits="none")
    hidden = torch.stack(out.hidden_states, dim=1)  # L x (B, T, D) -> (B, L, T, D)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    return hyper(hidden, mask, layer_chunk=layer_chunk)


def compose_lora(lora: dict, owner: torch.Tensor, rank: int) -> dict:
    """Segment LoRAs -> one LoRA per video, composed in rank space exactly as adapter.concat composes saved adapters
    (method.md §7: generated rows side by side, the static rows once), but batched and differentiable, so training
    can go through the composition that `internalize.py --segments` and compose.py perform.

    lora: {t: (A (N, L, 2r, d_in), B (N, L, 2r, d_out))} for N segments; owner (N,) long: the video (0..V-1) each
    segment belongs to, a video's segments consecutive and in time order. Video v gets
    A = [A_gen(seg 1); ...; A_gen(seg k_v); 0; ...; 0; A_static], of rank (K + 1) r with K = max k_v: the zero rows
    that pad a video with fewer segments leave its dW unchanged."""
    V = int(owner.max()) + 1
    counts = torch.bincount(owner, minlength=V)
    first = torch.cumsum(counts, 0) - counts                       # (V,) each video's first segment
    slot = torch.arange(len(owner), device=owner.device) - first[owner]  # (N,) place of a segment in its video
    K, out = int(counts.max()), {}
    for t, ab in lora.items():
        parts = []
        for X in ab:
            _, L, _, d = X.shape
            gen = X.new_zeros(V, K, L, rank, d).index_put((owner, slot), X[:, :, :rank])  # (V, K, L, r, d)
            gen = gen.transpose(1, 2).reshape(V, L, K * rank, d)
            parts.append(torch.cat([gen, X[first, :, rank:]], dim=2))  # (V, L, (K + 1) r, d)
        out[t] = tuple(parts)
    return out


def compile_hypernet(hyper: HyperNet, enabled: bool | None = None) -> HyperNet:
    """torch.compile the perceiver (the heavy part) in place; default on for CUDA, off on CPU.

    Only `hyper.perceive` is replaced: parameters and state_dict keys are untouched, so the saved module is the
    plain one. Compilation is lazy, so the first call's time (compile + run) is printed when it happens.
    """
    if enabled is None:
        enabled = next(hyper.parameters()).device.type == "cuda"
    if not enabled:
        return hyper
    compiled, pending = torch.compile(hyper._perceive), [True]

    def perceive(h, keep):  # (N, T, D), (N, T) -> (N, n_q, W); times the first call, where compiling happens
        t0, first, pending[0] = time.perf_counter(), pending[0], False
        out = compiled(h, keep)
        if first:
            print(f"hypernet: torch.compile first call (compile + run) took {time.perf_counter() - t0:.1f} s")
        return out

    hyper.perceive = perceive
    return hyper


def param_breakdown(hyper: HyperNet) -> dict[str, int]:
    """Parameter counts per part, the grouping of method.md §3.3."""
    groups = {"projection": "modality_projection", "encoder": "encoder", "decoder": "decoder",
              "pre_head": "pre_head", "head": "head", "static_lora": "bias_", "scalers": "scaler_"}
    counts = {g: sum(p.numel() for n, p in hyper.named_parameters() if n.startswith(pre))
              for g, pre in groups.items()}
    return {**counts, "total": sum(p.numel() for p in hyper.parameters())}


# ----------------------------------------------------------------------------------------------------------------
# Save / load: safetensors + JSON, never pickles. load_hypernet also takes the authors' released .pt and
# hf:REPO/FILE (next section), so every script that is given a hypernetwork accepts all three.

def _paths(path) -> tuple[Path, Path]:
    """A directory holds hypernet.safetensors + hypernet.json; a file x.safetensors gets x.json beside it."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / "hypernet.safetensors"
    return p, p.with_suffix(".json")


def save_hypernet(path, hyper: HyperNet, release: dict | None = None, base: dict | None = None) -> Path:
    """Write weights and config (each to a temp file, then renamed); returns the .safetensors path. Kept in the JSON
    beside the config: `release`, the provenance of a converted released checkpoint; `base`, the fingerprint of the
    base model it was trained on (adapter.base_facts), which load_hypernet checks."""
    weights, cfg = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in hyper.state_dict().items()}
    save_file(tensors, str(weights) + ".tmp", metadata={"format": "pt"})
    os.replace(str(weights) + ".tmp", weights)
    info = {"hyper_config": hyper.config.to_dict(), **({"release": release} if release else {}),
            **({"base": base} if base else {})}
    Path(str(cfg) + ".tmp").write_text(json.dumps(info, indent=2))
    os.replace(str(cfg) + ".tmp", cfg)
    return weights


def load_hypernet(path, model_config=None, device="cpu", cache_dir=None, base: dict | None = None) -> HyperNet:
    """Load a hypernetwork: our folder or .safetensors, the authors' released .pt (converted on first use, then read
    from the cache, see convert_released), or hf:REPO/FILE (downloaded first). With `model_config`, first check it
    fits that base model (L, D, dims); with `base` (adapter.base_facts of the model it will run on), refuse one that
    train.py recorded as trained on another. `hyper.source` says what was read: {"weights": the safetensors path,
    "release": provenance of the .pt or None}."""
    local = fetch_hypernet(path)
    if is_released_checkpoint(local):
        local = convert_released(local, cache_dir=cache_dir, model_config=model_config)
    weights, cfg_path = _paths(local)
    for p in (weights, cfg_path):
        if not p.is_file():
            raise FileNotFoundError(f"no hypernetwork file {p}")
    info = json.loads(cfg_path.read_text())
    config = HyperConfig.from_dict(info["hyper_config"])
    trained_on = info.get("base") or {}
    if base is not None and any(trained_on[k] != base[k] for k in trained_on if k.endswith("_sha256") and k in base):
        raise ValueError(f"it was trained on base {trained_on.get('base_model')}, whose fingerprint differs from this "
                         f"base's: pass the --size/--model it was trained on")
    if model_config is not None:
        config.check_matches(model_config)
    with torch.device("meta"):  # no init work: every tensor comes from the file (strict, gpt-fast style)
        hyper = HyperNet(config)
    state = load_file(str(weights), device=str(device))
    missing, unexpected = set(hyper.state_dict()) - set(state), set(state) - set(hyper.state_dict())
    if missing or unexpected:
        raise ValueError(f"{weights}: missing tensors {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    hyper.load_state_dict(state, strict=True, assign=True)
    hyper.source = {"weights": str(weights), "release": info.get("release")}
    return hyper.eval()  # inference mode: out_norm "batch" uses its running statistics (train.py calls .train())


# ----------------------------------------------------------------------------------------------------------------
# The authors' released checkpoints.
#
# frames2lora-smolvlm2-{500m,2.2b}-best-ce.pt (method.md §0) are what their training script writes:
# torch.save(model.state_dict()), a zip holding data.pkl (a pickle: an OrderedDict of tensors plus their config
# objects) and data/<key> (each tensor storage's raw little-endian bytes). Unpickling can run any callable the file
# names, so we never hand it to pickle's defaults nor to torch.load: `_Unpickler.find_class` resolves exactly the
# eleven globals such a file uses and refuses every other with a one-line error, the authors' config classes
# (ctx_to_lora.*, peft.*) become inert records, and tensors are rebuilt by torch's own `_rebuild_tensor_v2` over
# storages we read from the zip ourselves. The result is checked, renamed onto HyperNet and written once as our
# safetensors checkpoint; later loads read that. Proven equal to the authors' forward in tests/test_released.py
# with a checkpoint and reference outputs made by their code (tests/data/frames2lora/README.md).

RELEASE_REPO = "MananSuri27/Frames2LoRA-SmolVLM-ckpts"
RELEASES = {"500M": f"hf:{RELEASE_REPO}/frames2lora-smolvlm2-500m-best-ce.pt",
            "2.2B": f"hf:{RELEASE_REPO}/frames2lora-smolvlm2-2.2b-best-ce.pt"}
# What the authors' pipeline fed the released hypernetworks, in training and in their infer.py / demo
# (default_train_args): one user turn [video, this instruction], 12 frames at 1 fps, longest edge 384, then the
# encoder's square. Our data.Processor reproduces their transformers-4.51.3 inputs bit for bit (test_released.py).
RELEASE_RECIPE = {"instruction": "Internalize this video for later captioning.", "max_frames": 12,
                  "video_size": 384, "sample_fps": 1}


class ReleaseError(ValueError):
    """A released checkpoint that cannot be used as it is: refused, damaged or unsupported. One line, path first."""


class _Record:
    """Inert stand-in for one of the authors' config objects: the pickle's class name and its fields, nothing else.
    NEWOBJ creates it, BUILD hands it its fields; no code of ctx_to_lora or peft exists here, let alone runs."""
    qualname = "?"

    def __init__(self, *args):
        self.args, self.fields = args, {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (instance dict, slot values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ReleaseError(f"malformed {self.qualname} state")
        self.fields = dict(state)


def _record_type(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[1], (_Record,), {"qualname": qualname})


def _enum_value(value):  # PeftType: REDUCE(PeftType, ("LORA",)) -> the plain string
    if not isinstance(value, str):
        raise ReleaseError("malformed PeftType")
    return value


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    """torch._utils._rebuild_tensor_v2 behind argument checks: a storage we built, plain ints, no hooks."""
    ints = lambda xs: isinstance(xs, tuple) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
    if not (isinstance(storage, torch.storage.TypedStorage) and type(offset) is int and offset >= 0 and ints(size)
            and ints(stride) and len(size) == len(stride) and requires_grad is False and not hooks and not metadata):
        raise ReleaseError("malformed tensor record")
    numel = storage._untyped_storage.nbytes() // storage.dtype.itemsize
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        raise ReleaseError(f"a tensor of shape {list(size)} reaches past its storage of {numel} values")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())


class _StorageType:
    """What `torch.FloatStorage` / `torch.LongStorage` resolve to: only the dtype of the storages that name it."""
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


# Every global a released file's data.pkl names (`python -m pickletools` on the fixture lists these 11), and what
# each resolves to here. __builtin__ is protocol 2's name for builtins.
_STORAGE_DTYPES = {"torch.FloatStorage": torch.float32, "torch.LongStorage": torch.int64}
_ALLOWED = {
    "collections.OrderedDict": OrderedDict,
    "__builtin__.set": set,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    **{name: _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{name: _record_type(name) for name in (
        "ctx_to_lora.modeling.hypernet.HypernetConfig", "ctx_to_lora.modeling.aggregator.AggregatorConfig",
        "ctx_to_lora.configs.CtxEncoderArguments", "peft.tuners.lora.config.LoraConfig",
        "peft.tuners.lora.config.LoraRuntimeConfig")},
    "peft.utils.peft_types.PeftType": _enum_value,
}


class _Unpickler(pickle.Unpickler):
    """pickle.Unpickler that can only build the objects in _ALLOWED; storages come from the zip's data/ records."""

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.zf, self.prefix, self.storages = zf, prefix, {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full not in _ALLOWED:
            raise ReleaseError(f"refused: its pickle asks for {full}, which a Frames2LoRA checkpoint never needs "
                               f"(tampered or not a Frames2LoRA file); nothing in it was run")
        return _ALLOWED[full]

    def persistent_load(self, pid):
        """('storage', storage type, key, location, numel) -> that record's bytes as a typed storage. The location
        (cuda:0 in the released files) is ignored: everything is read to the CPU."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and pid[2].isdigit() and type(pid[4]) is int and pid[4] >= 0):
            raise ReleaseError(f"malformed storage reference {str(pid)[:60]}")
        dtype, key, numel = pid[1].dtype, pid[2], pid[4]
        if key not in self.storages:
            try:
                info = self.zf.getinfo(f"{self.prefix}/data/{key}")
            except KeyError:
                raise ReleaseError(f"storage record data/{key} is missing (a truncated checkpoint)") from None
            nbytes = numel * dtype.itemsize
            if info.file_size != nbytes:
                raise ReleaseError(f"storage {key} holds {info.file_size} bytes, its tensor needs {nbytes}")
            buf, done = bytearray(nbytes), 0
            with self.zf.open(info) as f:  # in 16 MB pieces: no second copy of a large tensor in memory
                while done < nbytes and (piece := f.read(min(1 << 24, nbytes - done))):
                    buf[done:done + len(piece)] = piece
                    done += len(piece)
            if done != nbytes:
                raise ReleaseError(f"storage {key} is truncated")
            flat = torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype,
                                                            _internal=True)
        return self.storages[key]


def is_released_checkpoint(path) -> bool:
    """The authors' format: a torch.save zip (by its magic bytes), or any .pt/.pth file (a damaged one then gets
    read_released's precise error rather than "no hypernetwork")."""
    p = Path(path)
    return p.is_file() and (p.suffix in (".pt", ".pth") or zipfile.is_zipfile(p))


def read_released(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The .pt -> (its tensors by name, its other entries as plain Python: records become dicts with "__class__").
    Raises ReleaseError, one line, for anything but a well-formed file of the allowed kind."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise ReleaseError("a zip without exactly one <name>/data.pkl: not a torch.save checkpoint")
            prefix = pkl[0].split("/")[0]
            if f"{prefix}/byteorder" in zf.namelist() and zf.read(f"{prefix}/byteorder") != b"little":
                raise ReleaseError("written on a big-endian machine, which is not supported")
            with zf.open(pkl[0]) as f:
                top = _Unpickler(f, zf, prefix).load()
    except ReleaseError as e:
        raise ReleaseError(f"{path}: {e}") from None
    except Exception as e:  # a damaged zip or pickle raises many types; the user needs one line
        first = (str(e).splitlines() or [""])[0][:120]
        raise ReleaseError(f"{path}: not a readable torch.save checkpoint (truncated or damaged: "
                           f"{type(e).__name__}: {first})") from None
    if not isinstance(top, dict):
        raise ReleaseError(f"{path}: holds a {type(top).__name__}, not a state dict")
    tensors = {k: v for k, v in top.items() if isinstance(v, torch.Tensor)}
    for k, v in tensors.items():  # a pickle's BUILD could have given a tensor state; a saved state dict never does
        if type(v) is not torch.Tensor or v.requires_grad or v._backward_hooks:
            raise ReleaseError(f"{path}: tensor {k} carries more than data (tampered)")
    rest = {k: _plain(v) for k, v in top.items() if k not in tensors}
    return tensors, rest


def _plain(x):
    """Records, sets, tuples and small tensors -> dicts, sorted lists, lists, lists (JSON-ready)."""
    if isinstance(x, _Record):
        return {"__class__": x.qualname, **{k: _plain(v) for k, v in x.fields.items()}}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, set):
        return sorted(_plain(v) for v in x)
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def _released_config(path, rest: dict) -> tuple[HyperConfig, dict]:
    """The authors' HypernetConfig / AggregatorConfig / LoraConfig -> (our HyperConfig, facts worth keeping), or a
    one-line ReleaseError naming the first setting our HyperNet does not implement or the first inconsistency."""
    def need(obj, cls, where):
        if not (isinstance(obj, dict) and obj.get("__class__", "").endswith(cls)):
            raise ReleaseError(f"{path}: {where} is not a {cls}: not a Frames2LoRA hypernetwork checkpoint")
        return obj

    hc = need(rest.get("hypernet_config"), "HypernetConfig", "hypernet_config")
    try:
        agg = need(hc["aggregator_config"], "AggregatorConfig", "hypernet_config.aggregator_config")
        lora = need(hc["lora_config"], "LoraConfig", "hypernet_config.lora_config")
        ctx = need(rest.get("ctx_encoder_args"), "CtxEncoderArguments", "ctx_encoder_args")
        targets, (d_in, d_out) = lora["target_modules"], hc["feature_sizes"]
        unsupported = [  # (what the file says, what HyperNet implements): the released recipe, method.md §3.1
            ("aggregator_type", agg["aggregator_type"], "perceiver"),
            ("ctx_encoder_type", ctx["ctx_encoder_type"], "per_layer_activations"),
            ("layer_to_layer_ctx_encoder", agg["layer_to_layer_ctx_encoder"], True),
            ("per_rank_gen", hc["per_rank_gen"], True), ("use_per_rank_bias", hc["use_per_rank_bias"], False),
            ("use_bias", hc["use_bias"], True), ("use_light_weight_lora", hc["use_light_weight_lora"], False),
            ("per_layer_processing", hc["per_layer_processing"], False),
            ("use_token_mixing", hc["use_token_mixing"], False), ("num_pre_head_layers", hc["num_pre_head_layers"], 1),
            ("extra_modules", hc["extra_modules"] or None, None), ("num_extra_modules", agg["num_extra_modules"], 0),
            ("num_self_attn_per_block", agg["num_self_attn_per_block"], 0),
            ("shared_weights", agg["shared_weights"], False), ("number of LoRA targets", len(targets), 1),
            ("num_modules", agg["num_modules"], 1),
            ("layer_indices", hc["layer_indices"], list(range(agg["num_layers"]))),
        ]
        for what, got, want in unsupported:
            if got != want:
                raise ReleaseError(f"{path}: {what} is {got!r}; this implementation converts only {want!r} "
                                   f"(the released hypernetworks' setting)")
        for (a, x), (b, y) in [(("lora_config.r", lora["r"]), ("aggregator lora_r", agg["lora_r"])),
                               (("latent_size", hc["latent_size"]), ("aggregator output_size", agg["output_size"])),
                               (("base_hidden_size", hc["base_hidden_size"]),
                                ("aggregator feature_size", agg["feature_size"]))]:
            if x != y:
                raise ReleaseError(f"{path}: inconsistent config: {a} {x!r} but {b} {y!r}")
        (t,) = targets
        shape = (t, int(d_in[t]), int(d_out[t]))
        config = HyperConfig(num_layers=int(agg["num_layers"]), hidden_size=int(hc["base_hidden_size"]),
                             target_shapes=(shape,), latent_size=int(hc["latent_size"]),
                             n_latents=int(agg["n_latent_queries"]), num_blocks=int(agg["num_blocks"]),
                             rank=int(lora["r"]), alpha=float(lora["lora_alpha"]),
                             # Idefics2PerceiverConfig defaults the file does not store (their aggregator.py):
                             n_heads=16, head_dim=128, n_kv_heads=4, rms_norm_eps=1e-6, proj_mult=4)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ReleaseError):
            raise
        raise ReleaseError(f"{path}: incomplete or malformed config ({type(e).__name__}: {e})") from None
    return config, {"base_model_name_or_path": rest.get("base_model_name_or_path"),
                    "lora_alpha": float(lora["lora_alpha"]), "peft_version": lora.get("peft_version")}


def _released_state(path, tensors: dict, hyper: HyperNet) -> dict[str, torch.Tensor]:
    """Rename (and reshape) the authors' tensors onto HyperNet's state dict, strictly: every tensor consumed, every
    parameter filled, every shape as the config implies, or a one-line ReleaseError naming the tensor."""
    (t, d_in, d_out), = hyper.config.target_shapes
    pre = {"0": "norm_in", "2": "fc1", "5": "fc2", "6": "norm_out"}  # ResMLPBlock's nn.Sequential indices
    state = {}
    for name, x in tensors.items():
        name = name.removeprefix("_orig_mod.")  # a torch.compile'd model's keys (their loader strips it too)
        if name.startswith("aggregator.perceiver."):  # modality_projection, encoder, decoder: the same names
            state[name.removeprefix("aggregator.perceiver.")] = x
        elif name.startswith("layers.0.mlp.") and name.split(".")[3] in pre:
            _, _, _, idx, kind = name.split(".")
            state[f"pre_head.{pre[idx]}.{kind}"] = x
        elif name == "head.weight":                      # EinMix weight "n_layers d_latent d_lora", d_lora = d_in+d_out
            state[f"head.{t}"] = x
        elif name.split(".")[0] in ("scaler_A", "scaler_B"):  # (1, L, r, 1) -> ours (L, r)
            state[name] = x.reshape(x.shape[1:3]) if x.dim() == 4 and x.shape[0] == x.shape[3] == 1 else x
        else:                                             # bias_A.<t>, bias_B.<t>: (L, r, d) as ours
            state[name] = x
    want = {k: tuple(v.shape) for k, v in hyper.state_dict().items()}
    for k in want:
        if k not in state:
            raise ReleaseError(f"{path}: tensor for {k} is missing (a truncated or foreign checkpoint)")
    for k, x in state.items():
        if k not in want:
            raise ReleaseError(f"{path}: unexpected tensor {k}: not part of the released architecture")
        if tuple(x.shape) != want[k]:
            raise ReleaseError(f"{path}: tensor {k} has shape {list(x.shape)} but its config implies {list(want[k])}")
        if x.dtype != torch.float32:
            raise ReleaseError(f"{path}: tensor {k} is {x.dtype}, expected float32 (as the authors save it)")
    return {k: x.contiguous() for k, x in state.items()}


def convert_released(path, cache_dir=None, model_config=None) -> Path:
    """The authors' .pt -> our checkpoint folder (hypernet.safetensors + hypernet.json), converted once.

    The folder is named by the .pt's sha256 and sits beside the .pt (for a download: beside its Hugging Face cache
    entry) or in `cache_dir`; its JSON records that sha256, so a changed .pt always gets a fresh conversion and a
    stale one is never served. With `model_config`, a file made for another base model is refused before anything
    is written. The folder appears whole or not at all (written under a temporary name, then renamed)."""
    path = Path(path)
    sha = sha256_file(path)
    out = Path(cache_dir or path.parent) / f"{path.stem}.video2lora-{sha[:16]}"
    if (out / "hypernet.json").is_file() and (out / "hypernet.safetensors").is_file():
        release = json.loads((out / "hypernet.json").read_text()).get("release") or {}
        if release.get("sha256") == sha:
            return out
    tensors, rest = read_released(path)
    config, facts = _released_config(path, rest)
    if model_config is not None:
        try:
            config.check_matches(model_config)
        except ValueError as e:
            raise ReleaseError(f"{path}: {e} (it was trained on {facts['base_model_name_or_path']})") from None
    with torch.device("meta"):
        hyper = HyperNet(config)
    hyper.load_state_dict(_released_state(path, tensors, hyper), strict=True, assign=True)
    release = {"format": "frames2lora-pt", "file": path.name, "sha256": sha, **facts, "recipe": RELEASE_RECIPE}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        try:
            save_hypernet(tmp, hyper, release=release)
        except OSError as e:  # e.g. a read-only folder beside the .pt
            raise ReleaseError(f"{path}: cannot write its conversion in {out.parent} ({e.strerror or e}); "
                               f"pass --hypernet-cache DIR") from None
        shutil.rmtree(out, ignore_errors=True)            # a damaged or stale folder of that name
        try:
            os.replace(tmp, out)
        except OSError:  # another process renamed its identical conversion into place first
            if not (out / "hypernet.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"hypernet: converted {path.name} (sha256 {sha[:12]}) to {out}; later runs read that", file=sys.stderr)
    return out


def released_hypernet(size: str) -> str:
    """The default hypernetwork of a released size (hf:REPO/FILE); a one-line ValueError for a size without one."""
    if size not in RELEASES:
        raise ValueError(f"{size} has no released hypernetwork (the authors released "
                         f"{' and '.join(RELEASES)}); train one with train.py or pass --hypernet")
    return RELEASES[size]


def fetch_hypernet(spec) -> Path:
    """hf:OWNER/REPO/FILE -> the file in the Hugging Face cache, downloaded if it is not there yet (progress bar,
    resumable, honours HF_HUB_OFFLINE and HF_TOKEN); anything else is a local path, returned as it is."""
    spec = str(spec)
    if not spec.startswith("hf:"):
        return Path(spec)
    parts = spec[3:].split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{spec}: expected hf:OWNER/REPO/FILE")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import constants, hf_hub_download  # installed with tokenizers

    try:  # the cache first, so a machine that has the file never touches the network
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise ReleaseError(f"{spec}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it once "
                           f"online, or pass --hypernet FILE.pt") from None
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:160]
        raise ReleaseError(f"{spec}: download failed ({type(e).__name__}: {first})") from None
