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
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

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
        kv = torch.cat([x, z], dim=1)                                     # (N, T+Q, W): context first
        q = self.q_proj(z).view(N, Q, H, hd).transpose(1, 2)              # (N, H, Q, hd)
        k = self.k_proj(kv).view(N, -1, Hkv, hd).transpose(1, 2)          # (N, Hkv, T+Q, hd)
        v = self.v_proj(kv).view(N, -1, Hkv, hd).transpose(1, 2)          # (N, Hkv, T+Q, hd)
        # Boolean mask, True = may attend; the SDPA kernels accumulate the softmax in fp32 even for bf16 inputs.
        mask = None if keep is None else keep[:, None, None, :]            # (N, 1, 1, T+Q)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (N, H, Q, hd)
        return self.o_proj(o.transpose(1, 2).reshape(N, Q, H * hd))       # (N, Q, W)


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
# Save / load: safetensors + JSON, never pickles.

def _paths(path) -> tuple[Path, Path]:
    """A directory holds hypernet.safetensors + hypernet.json; a file x.safetensors gets x.json beside it."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / "hypernet.safetensors"
    return p, p.with_suffix(".json")


def save_hypernet(path, hyper: HyperNet) -> Path:
    """Write weights and config (each to a temp file, then renamed); returns the .safetensors path."""
    weights, cfg = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in hyper.state_dict().items()}
    save_file(tensors, str(weights) + ".tmp", metadata={"format": "pt"})
    os.replace(str(weights) + ".tmp", weights)
    Path(str(cfg) + ".tmp").write_text(json.dumps({"hyper_config": hyper.config.to_dict()}, indent=2))
    os.replace(str(cfg) + ".tmp", cfg)
    return weights


def load_hypernet(path, model_config=None, device="cpu", base: dict | None = None) -> HyperNet:
    """Load a saved hypernetwork; with `model_config`, first check it fits that base model (L, D, dims); with `base`
    (adapter.base_facts of the model it will run on), refuse one that train.py recorded as trained on another."""
    weights, cfg_path = _paths(path)
    for p in (weights, cfg_path):
        if not p.is_file():
            raise FileNotFoundError(f"no hypernetwork file {p}")
    meta = json.loads(cfg_path.read_text())
    config = HyperConfig.from_dict(meta["hyper_config"])
    trained_on = meta.get("base") or {}
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
    return hyper.eval()  # inference mode: out_norm "batch" uses its running statistics (train.py calls .train())
