"""benchmarks/limits.py: the analytic FLOP counts equal torch's FlopCounterMode on tiny shapes (the fractions of the
matmul peak that bench_ttft and bench_model print rest on them), and the decode byte count is the tensors' bytes."""
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import limits  # noqa: E402
import model as M  # noqa: E402
from hypernet import HyperConfig, HyperNet  # noqa: E402

torch.set_num_threads(2)


def tiny_config(scale=2):
    vision = M.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            patch_size=8, image_size=16 * scale)
    text = M.TextConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=12)
    return M.SmolVLMConfig(vision, text, scale_factor=scale, image_token_id=90)


def counted(fn) -> int:
    """FLOPs FlopCounterMode sees. The math SDPA backend runs attention as matmuls, which it counts (it has no
    formula for the CPU flash kernel) and, like it, ignores the causal mask."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("scale, frames", [(2, 1), (3, 2)])
def test_encode_flops_equal_flop_counter(scale, frames):
    cfg = tiny_config(scale)
    vlm = M.SmolVLM(cfg).eval()
    ids = [1, 2] + ([5] + [cfg.image_token_id] * cfg.image_seq_len + [7]) * frames + [3, 4]
    ids = torch.tensor([ids])
    pixels = torch.rand(frames, 3, cfg.vision.image_size, cfg.vision.image_size)
    T = ids.shape[1]
    with torch.no_grad():
        got = counted(lambda: vlm(ids, pixels, output_hidden_states=True, logits="none"))
        assert got == sum(limits.encode_flops(cfg, frames, T, causal_full=True).values())
        got = counted(lambda: vlm(ids, pixels, logits="last"))
        assert got == sum(limits.encode_flops(cfg, frames, T, causal_full=True, head_rows=1).values())
    full, causal = (limits.encode_flops(cfg, frames, T, causal_full=c)["text_attention"] for c in (True, False))
    assert causal == full * (T + 1) // (2 * T)  # the causal count is the lower triangle, diagonal included


@pytest.mark.parametrize("targets", [("down_proj",), ("q_proj", "down_proj")])
def test_hypernet_flops_equal_flop_counter(targets):
    cfg = tiny_config()
    hc = HyperConfig.for_model(cfg, targets, latent_size=32, n_latents=4, num_blocks=2, n_heads=4, head_dim=8,
                               n_kv_heads=2, rank=3)
    hyper = HyperNet(hc).eval().requires_grad_(False)  # (the counter's module hooks want no grad leaves)
    h = torch.randn(2, hc.num_layers, 13, hc.hidden_size)
    with torch.no_grad():
        got = counted(lambda: hyper(h, layer_chunk=2))
    assert got == sum(limits.hypernet_flops(hc, 13, batch=2).values())


def test_decode_bytes_are_the_decoder_tensors_and_the_cache():
    cfg = tiny_config()
    vlm = M.SmolVLM(cfg).eval().to(torch.bfloat16)
    b = limits.decode_bytes(vlm, context=40)
    t = cfg.text
    text_params = sum(p.numel() for p in vlm.model.text_model.parameters())
    head = t.vocab_size * t.hidden_size
    # every text parameter but the embedding table (one row of it is read), plus the untied head, 2 bytes each
    assert b["weights"] == 2 * (text_params - head + t.hidden_size + head)
    cache = vlm.new_cache(1, 40)
    assert b["kv"] == limits.tensor_bytes([cache.k, cache.v]) == 2 * 3 * 2 * 12 * 40 * 2
    assert limits.decode_bytes(vlm, 40, kv_dtype=torch.float32)["kv"] == 2 * b["kv"]


def test_machine_measurements_are_positive_and_groups_cover_the_profile():
    assert all(v > 0 for v in limits.copy_bandwidth(nbytes=1 << 20, repeats=1).values())
    assert limits.matmul_flops(torch.float32, n=64, repeats=1) > 0
    assert limits.gemv_bandwidth(torch.bfloat16, shape=(64, 32), repeats=1) > 0
    ops = limits.op_profile(lambda: torch.randn(64, 64) @ torch.randn(64, 64))
    assert "aten::mm" in ops and ops["shapes"][("aten::mm", "64x64 @ 64x64")][0] == 1
    assert abs(sum(limits.op_groups(ops).values()) - sum(v for k, v in ops.items() if k != "shapes")) < 1e-9
    text = limits.profile_markdown("x", ops, {"matmul": 2 * 64**3}, peak=1e9)
    assert "| matmul + conv |" in text
