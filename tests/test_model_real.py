"""Parity with transformers at the real shapes of the three released sizes (random weights, fp32). Slow tier."""
from __future__ import annotations

import pytest
import torch

import model as M


@pytest.mark.slow
@pytest.mark.parametrize("size", ["256M", "500M", "2.2B"])
def test_real_shape_parity(size):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    cfg = M.preset_config(size)
    torch.manual_seed(0)
    hf = SmolVLMForConditionalGeneration(SmolVLMConfig(**cfg.to_hf_dict())).eval()
    with torch.device("meta"):
        ours = M.SmolVLM(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)  # shares the tensors: no second copy
    n = cfg.image_seq_len
    ids = torch.tensor([[1, 11126, 42, 49189, 49152] + [49190] * n + [49189, 1812, 314, 49279, 198, 9519, 9531, 42]])
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size) * 2 - 1
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels[None], output_hidden_states=True)
        out = ours(ids, pixels, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    for l in range(cfg.text.num_hidden_layers):
        torch.testing.assert_close(out.hidden_states[l], ref.hidden_states[l], atol=1e-4, rtol=1e-5)
