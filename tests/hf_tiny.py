"""Tiny random SmolVLM2 checkpoints in the Hugging Face layout, written by transformers (the test-only oracle)."""
from __future__ import annotations

import torch

IMAGE_TOKEN = 100  # the tiny vocab's <image> id (real checkpoints: 49190)


def tiny_hf_config(scale: int = 2, tie: bool = False, **text_overrides):
    from transformers import SmolVLMConfig

    image = {2: 32, 3: 48}[scale]  # 4x4 or 6x6 patches of 8 px -> 4 tokens per frame either way
    text = dict(model_type="llama", vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, max_position_embeddings=512,
                tie_word_embeddings=tie, pad_token_id=2, eos_token_id=None, bos_token_id=None)
    text.update(text_overrides)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  image_size=image)
    return SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=scale, image_token_id=IMAGE_TOKEN,
                         tie_word_embeddings=tie)


def tiny_hf_model(scale: int = 2, tie: bool = False, seed: int = 0, **text_overrides):
    """A transformers SmolVLMForConditionalGeneration with every parameter randomised (norms and biases too)."""
    from transformers import SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(tiny_hf_config(scale, tie, **text_overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # init leaves norms at 1 and biases at 0: perturb them all
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 2
    return model


def video_ids(n_frames: int, text_before=(5, 6, 7), text_after=(8, 9), tokens_per_frame: int = 4) -> list[int]:
    """A prompt with frames laid out as SmolVLM2 does: boundary, global-img, <image> x N, boundary."""
    fake, glob = 101, 102
    ids = [1, *text_before]
    for _ in range(n_frames):
        ids += [fake, glob] + [IMAGE_TOKEN] * tokens_per_frame + [fake, 10]
    return ids + list(text_after)
