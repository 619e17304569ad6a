"""Builders the test files share: clips written with PyAV, tiny random base models in the Hugging Face layout, tiny
random hypernetworks. Everything is made here, offline; nothing comes from a hub. Test files import these
functions (`from conftest import write_clip`); `hf_tiny.py` beside it builds the transformers-side checkpoints."""
from __future__ import annotations

import fractions
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import model as M
from adapter import run_cli
from hypernet import HyperConfig, HyperNet, save_hypernet
from toy import base as toy_base
from toy import world

# A hypernetwork small enough for a test: 4 latents of width 32, 2 blocks, rank 4.
TINY_PERCEIVER = dict(latent_size=32, n_latents=4, num_blocks=2, n_heads=4, head_dim=8, n_kv_heads=2, rank=4)
# train.py's options for a hypernetwork small enough to train in seconds in a test.
TINY_TRAIN_ARGS = ["--latent-size", "32", "--n-latents", "4", "--num-blocks", "1", "--n-heads", "2", "--head-dim", "16",
                   "--n-kv-heads", "1", "--rank", "4", "--workers", "0"]


def train_args(case, out, *extra, manifest="m.jsonl") -> list[str]:
    """train.py's argv for a test case {"base": folder, "dir": folder holding the manifest}."""
    return ["--model", str(case["base"]), "--train", str(case["dir"] / manifest), "--out", str(out),
            *TINY_TRAIN_ARGS, *map(str, extra)]


# ------------------------------------------------------------------------------------------------ clips
def write_clip(path, w=64, h=48, n=30, rate=10, codec="libx264", pix="yuv420p", rotation=None, pts_ms=None, gop=8):
    """A clip whose frames all differ (a moving bar, a changing grey) so a wrong frame shows; a red corner marker
    shows the orientation. pts_ms: explicit presentation times (variable frame rate)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, pix
        s.codec_context.gop_size = gop
        if pts_ms is not None:
            s.codec_context.time_base = fractions.Fraction(1, 1000)
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i in range(n):
            a = np.full((h, w, 3), (i * 37) % 256, np.uint8)
            a[: h // 3, : max(1, w // 4)] = (255, 0, 0)
            a[:, (i * 3) % w] = 255
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = pts_ms[i], fractions.Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return Path(path)


def write_square_clip(path, rgb, direction: str, n: int = 16, rate: int = 4, side: int = 32):
    """4 s at 4 fps (so 4 sampled frames): a square moving left or right on a background of its own colour."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width = s.height = side
        s.pix_fmt, s.options = "yuv420p", {"crf": "18", "threads": "1"}
        for i in range(n):
            a = np.full((side, side, 3), rgb, np.uint8) // 2
            x = 4 + (i * 16) // n if direction == "right" else 20 - (i * 16) // n
            a[12:20, x:x + 8] = rgb
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return Path(path)


# ------------------------------------------------------------------------------------------------ base models
def write_random_base(path: Path, hidden: int = 48, seed: int = 0) -> M.SmolVLMConfig:
    """A random SmolVLM2 folder (config, safetensors, toy tokenizer, processor configs): 32-px frames, 4 tokens per
    frame, a 2-layer decoder `hidden` wide. Norms are perturbed too, so the weights fingerprint tells models apart."""
    tok = world.toy_tokenizer()
    vision = M.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            patch_size=8, image_size=32)
    text = M.TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                        max_position_embeddings=4096)
    cfg = M.SmolVLMConfig(vision, text, scale_factor=2, image_token_id=tok.token_to_id("<image>"))
    torch.manual_seed(seed)
    vlm = M.SmolVLM(cfg)
    for p in vlm.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else p.data.add_(torch.randn_like(p) * 0.1)
    toy_base.write_model_dir(Path(path), cfg, tok, vlm.state_dict())
    return cfg


def write_learnable_base(path: Path, seed: int = 0) -> Path:
    """A random 2-layer SmolVLM2 in the HF layout, 32 wide, on which a tiny hypernetwork visibly learns: the LM head
    is scaled up (else no LoRA can make the output distribution peaky) and so is the connector (else the frames
    barely change the hidden states the hypernetwork reads)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = world.toy_tokenizer()
    text = M.TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=1e4,
                        rms_norm_eps=1e-5, max_position_embeddings=4096)
    cfg = M.SmolVLMConfig(M.VisionConfig(32, 64, 1, 2, 8, 32), text, scale_factor=2,
                          image_token_id=tok.token_to_id("<image>"))
    torch.manual_seed(seed)
    vlm = M.SmolVLM(cfg)
    with torch.no_grad():
        vlm.lm_head.weight.mul_(8.0)
        vlm.model.connector.modality_projection.proj.weight.mul_(4.0)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in vlm.state_dict().items()}, path / "model.safetensors")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|im_end|>"}))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"max_image_size": {"longest_edge": 32},
         "video_sampling": {"fps": 1, "max_frames": 12, "video_size": {"longest_edge": 32}}}))
    return path


def toy_random_base(folder=None):
    """The toy base's architecture, initialised as toy/base.py does (seed 0), untrained; written to `folder` in the
    HF layout when one is given. -> (vlm, config, tokenizer)."""
    tok = world.toy_tokenizer()
    config = toy_base.toy_config(tok.get_vocab_size(), tok.token_to_id("<image>"))
    torch.manual_seed(0)
    vlm = M.SmolVLM(config)
    toy_base.init_weights(vlm)
    if folder is not None:
        toy_base.write_model_dir(Path(folder), config, tok, vlm.state_dict())
    return vlm, config, tok


# ------------------------------------------------------------------------------------------------ hypernetworks
def random_hypernet(cfg: M.SmolVLMConfig, seed: int = 0, **overrides) -> HyperNet:
    """A TINY_PERCEIVER hypernetwork with scaler_B and bias_B non-zero: at init they are 0 and every adapter would be
    dW = 0, which would let a wrong LoRA path pass."""
    torch.manual_seed(seed)
    hyper = HyperNet(HyperConfig.for_model(cfg, **{**TINY_PERCEIVER, **overrides}))
    for t in hyper.config.targets:
        hyper.scaler_B[t].data.fill_(0.05)
        hyper.bias_B[t].data.normal_(0.0, 0.05)
    return hyper


def write_random_hypernet(path: Path, cfg: M.SmolVLMConfig, seed: int = 0) -> Path:
    save_hypernet(path, random_hypernet(cfg, seed))
    return path


# ------------------------------------------------------------------------------------------------ CLI errors
def assert_one_line_error(capsys, fn, argv, match: str, no_output: Path | None = None, code: int = 1, keep=(),
                          ignore=("note:", "hint:")) -> str:
    """Run a CLI's main as its `__main__` does (adapter.run_cli): exit status `code`, exactly one stderr line
    `error: ...` containing `match` (lines starting with `ignore` aside), no traceback; the files in `keep`
    byte-identical; `no_output` not created; no temp file beside any of them. Returns the error line."""
    before = {Path(p): Path(p).read_bytes() for p in keep}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(fn, [str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith(tuple(ignore))]
    if isinstance(e.value.code, str):   # SystemExit("error: ...") prints when it reaches the interpreter
        lines, status = lines + [e.value.code], 1
    else:
        status = e.value.code
    assert status == code, (status, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err
    for p, raw in before.items():
        assert p.read_bytes() == raw, f"{p} changed"
    if no_output is not None:
        assert not no_output.exists()
    for folder in {Path(p).parent for p in [*keep, *([no_output] if no_output else [])]}:
        assert not list(folder.glob(".v2l-*")), "a temp file was left behind"
    return lines[0]
