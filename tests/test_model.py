"""model.py against transformers' SmolVLMForConditionalGeneration on the same random weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
from hf_tiny import IMAGE_TOKEN, tiny_hf_model, video_ids

torch.set_num_threads(2)


@pytest.fixture(scope="module", params=[(2, False), (3, True)], ids=["s2-untied", "s3-tied"])
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained folder, scale factor)."""
    scale, tie = request.param
    hf = tiny_hf_model(scale, tie)
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    return hf, M.load_model(path), scale


def _pixels(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_logits_and_hidden_states_equal_transformers(pair):
    hf, ours, _ = pair
    size = hf.config.vision_config.image_size
    ids = torch.tensor([video_ids(2)])
    pix = _pixels(2, size)
    ref = hf(input_ids=ids, pixel_values=pix[None], output_hidden_states=True)
    out = ours(ids, pix, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    L = ours.config.text.num_hidden_layers
    assert len(out.hidden_states) == L  # the first L of transformers' L + 1: the states *entering* each layer
    for l in range(L):
        torch.testing.assert_close(out.hidden_states[l], ref.hidden_states[l], atol=1e-5, rtol=0)


def test_logits_of_selected_positions_equal_the_full_logits_there(pair):
    # logits=<(B, T) bool mask>: the training path that scores only answer tokens; "last" is the generation path.
    hf, ours, _ = pair
    ids = torch.tensor([video_ids(2), video_ids(2, text_before=(11, 12, 13))])
    pix = _pixels(4, hf.config.vision_config.image_size)
    full = ours(ids, pix).logits
    pick = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    torch.testing.assert_close(ours(ids, pix, logits=pick).logits, full[pick], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(ids, pix, logits="last").logits, full[:, -1:], atol=1e-6, rtol=0)
    assert ours(ids, pix, logits="none").logits is None


def test_padded_batch_equals_each_sample_alone(pair):
    hf, ours, _ = pair
    size = hf.config.vision_config.image_size
    a, b = video_ids(2), video_ids(1, text_before=(11, 12, 13, 14, 15, 16))
    T = max(len(a), len(b))
    ids = torch.full((2, T), 2)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, s in enumerate((a, b)):  # left padding, as for generation
        ids[i, T - len(s):], mask[i, T - len(s):] = torch.tensor(s), 1
    pix = _pixels(3, size)
    # Frames flat in prompt order, or padded per sample with all-zero frames as the transformers processor does.
    padded = torch.zeros(2, 2, 3, size, size)
    padded[0], padded[1, 0] = pix[:2], pix[2]
    for frames in (pix, padded):
        out = ours(ids, frames, mask, output_hidden_states=True)
        for i, (s, p) in enumerate(((a, pix[:2]), (b, pix[2:]))):
            ref = hf(input_ids=torch.tensor([s]), pixel_values=p[None], output_hidden_states=True)
            real = slice(T - len(s), T)
            torch.testing.assert_close(out.logits[i, real], ref.logits[0], atol=1e-5, rtol=0)
            for l in range(len(out.hidden_states)):
                torch.testing.assert_close(out.hidden_states[l][i, real], ref.hidden_states[l][0], atol=1e-5, rtol=0)


def test_branches_after_a_shared_prefix_equal_each_sequence_alone(pair):
    """A (B, T, T) mask with position_ids: two answers packed after one video prefix, each seeing the prefix and
    itself only, give the logits transformers gives each [prefix + branch] alone."""
    hf, ours, _ = pair
    prefix, branches = video_ids(2), [[11, 12, 13], [14, 15, 16, 17, 18]]
    ids = torch.tensor([prefix + sum(branches, [])])
    seg = torch.tensor([[0] * len(prefix) + [k + 1 for k, b in enumerate(branches) for _ in b]])
    positions = torch.tensor([list(range(len(prefix))) + [len(prefix) + i for b in branches for i in range(len(b))]])
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    pix = _pixels(2, hf.config.vision_config.image_size)
    out = ours(ids, pix, mask, position_ids=positions)
    start = len(prefix)
    for b in branches:
        ref = hf(input_ids=torch.tensor([prefix + b]), pixel_values=pix[None]).logits[0]
        torch.testing.assert_close(out.logits[0, start:start + len(b)], ref[len(prefix):], atol=1e-5, rtol=0)
        start += len(b)
    torch.testing.assert_close(out.logits[0, :len(prefix)], ref[:len(prefix)], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs position_ids"):
        ours(ids, pix, mask)


def _greedy_no_cache(ours, ids, pix, n):
    seq = ids
    for _ in range(n):
        nxt = ours(seq, pix).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq[0, ids.shape[1]:].tolist()


def test_greedy_generation_matches_transformers_with_and_without_cache(pair):
    hf, ours, _ = pair
    size = hf.config.vision_config.image_size
    ids, pix = torch.tensor([video_ids(2)]), _pixels(2, size, seed=1)
    ref = hf.generate(input_ids=ids, pixel_values=pix[None], max_new_tokens=20, do_sample=False, min_new_tokens=20)
    expected = ref[0, ids.shape[1]:].tolist()
    assert M.generate(ours, ids, pixel_values=pix, max_new_tokens=20) == [expected]
    assert _greedy_no_cache(ours, ids, pix, 20) == expected


def test_generate_left_padded_batch_equals_single(pair):
    _, ours, _ = pair
    a, b = [1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13]
    ids = torch.tensor([a, [2] * 5 + b])
    mask = (torch.arange(8)[None] >= torch.tensor([[0], [5]])).long()
    batch = M.generate(ours, ids, mask, max_new_tokens=12)
    assert batch == [M.generate(ours, torch.tensor([s]), max_new_tokens=12)[0] for s in (a, b)]


def test_sampling_is_seeded_and_respects_eos(pair):
    _, ours, _ = pair
    ids = torch.tensor([[1, 5, 6, 7]])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    s1 = M.generate(ours, ids, max_new_tokens=15, temperature=1.0, top_p=0.9, generator=g())
    assert s1 == M.generate(ours, ids, max_new_tokens=15, temperature=1.0, top_p=0.9, generator=g())
    assert s1 != M.generate(ours, ids, max_new_tokens=15, temperature=1.0, generator=torch.Generator().manual_seed(4))
    first = s1[0]
    k = next(i for i in range(1, 15) if first[i] not in first[:i])  # a token first seen at step k
    kw = dict(max_new_tokens=15, temperature=1.0, top_p=0.9)
    assert M.generate(ours, ids, eos_token_id=first[k], generator=g(), **kw)[0] == first[:k]  # stops, eos dropped
    streamed = []
    M.generate(ours, ids, on_token=lambda t: streamed.append(int(t[0])), generator=g(), **kw)
    assert streamed == first


# ------------------------------------------------------------------------------------------------------------ LoRA

def _random_lora(cfg, batch, rank=4, targets=M.LORA_TARGETS, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    shapes = M.lora_target_shapes(cfg.text)
    L = cfg.text.num_hidden_layers
    return {t: (torch.randn(batch, L, rank, shapes[t][0], generator=g) * scale,
                torch.randn(batch, L, rank, shapes[t][1], generator=g) * scale) for t in targets}


def _merged_copy(ours, lora, sample, alpha):
    merged = M.SmolVLM(ours.config)
    merged.load_state_dict(ours.state_dict())
    for l, layer in enumerate(merged.model.text_model.layers):
        for t, (A, B) in lora.items():
            lin = getattr(layer.self_attn if t in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, t)
            lin.weight.data += alpha * B[sample, l].T @ A[sample, l]  # (d_out, r) @ (r, d_in)
    return merged


def test_lora_equals_explicit_weight_merge_per_sample(pair):
    _, ours, _ = pair
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 8, 7, 6, 5]])
    lora = _random_lora(ours.config, batch=2)
    out = ours(ids, lora=lora, lora_alpha=3.0).logits
    for i in range(2):
        ref = _merged_copy(ours, lora, i, 3.0)(ids[i:i + 1]).logits
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, ours(ids).logits, atol=1e-3)  # the adapter does change the output


def test_zero_b_lora_is_exactly_the_base_model(pair):
    _, ours, _ = pair
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    lora = {t: (A, torch.zeros_like(B)) for t, (A, B) in _random_lora(ours.config, 1).items()}
    assert torch.equal(ours(ids, lora=lora).logits, ours(ids).logits)


def test_lora_gradients_reach_a_and_b_only(pair):
    _, ours, _ = pair
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    lora = _random_lora(ours.config, 1, targets=("down_proj", "q_proj"))
    for A, B in lora.values():
        A.requires_grad_(True), B.requires_grad_(True)
    ours(ids, lora=lora).logits.logsumexp(-1).sum().backward()
    for A, B in lora.values():
        assert A.grad is not None and A.grad.abs().sum() > 0
        assert B.grad is not None and B.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in ours.parameters())


def test_lora_is_applied_at_every_decode_step(pair):
    _, ours, _ = pair
    ids = torch.tensor([[1, 5, 6, 7]])
    lora = _random_lora(ours.config, 1, targets=("down_proj",), scale=0.3)
    got = M.generate(ours, ids, lora=lora, lora_alpha=2.0, max_new_tokens=10)[0]
    seq = ids
    for _ in range(10):
        seq = torch.cat([seq, ours(seq, lora=lora, lora_alpha=2.0).logits[:, -1:].argmax(-1)], 1)
    assert got == seq[0, 4:].tolist()


# ------------------------------------------------------------------------------------------------ loading and config

def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_hf_model(2, False, seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = M.load_model(tmp_path)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.fixture()
def saved(tmp_path):
    tiny_hf_model(2, False, seed=2).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("model.text_model.layers.1.mlp.up_proj.weight"),
     "missing tensor model.text_model.layers.1.mlp.up_proj.weight"),
    (lambda sd: sd.__setitem__("model.text_model.layers.0.extra.weight", torch.zeros(3)),
     "unexpected tensor model.text_model.layers.0.extra.weight"),
    (lambda sd: sd.__setitem__("model.connector.modality_projection.proj.weight", torch.zeros(48, 10)),
     "tensor model.connector.modality_projection.proj.weight has shape [48, 10]"),
])
def test_loader_errors_name_the_tensor(saved, edit, message):
    sd = load_file(saved / "model.safetensors")
    edit(sd)
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        M.load_model(saved)


def test_dtype_cast_and_missing_folder(saved, tmp_path):
    assert M.load_model(saved, dtype=torch.bfloat16).model.text_model.norm.weight.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.load_model(tmp_path / "nowhere")


def test_config_reads_both_rope_layouts_and_fills_transformers_defaults():
    old = {"text_config": {"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 273768.0},
           "vision_config": {"hidden_size": 768}, "scale_factor": 4, "image_token_id": 49190}
    c = M.SmolVLMConfig.from_hf_dict(old)
    assert c.text.rope_theta == 273768.0 and c.text.num_key_value_heads == 4 and c.text.head_dim == 16
    assert c.text.rms_norm_eps == 1e-6  # Llama's class default when the key is absent
    assert (c.vision.num_hidden_layers, c.vision.intermediate_size, c.vision.layer_norm_eps) == (12, 3072, 1e-6)
    new = json.loads(json.dumps(c.to_hf_dict()))
    assert M.SmolVLMConfig.from_hf_dict(new) == c
    assert "rope_parameters" in new["text_config"] and "rope_theta" not in new["text_config"]


def test_our_config_json_loads_in_transformers(pair, tmp_path):
    from transformers import SmolVLMConfig

    _, ours, _ = pair
    (tmp_path / "config.json").write_text(json.dumps(ours.config.to_hf_dict()))
    hf_cfg = SmolVLMConfig.from_pretrained(tmp_path)
    assert M.SmolVLMConfig.from_hf_dict(hf_cfg.to_dict()) == ours.config


def test_image_token_count_mismatch_is_a_clear_error(pair):
    hf, ours, _ = pair
    ids = torch.tensor([video_ids(2)])
    with pytest.raises(ValueError, match="<image> tokens but"):
        ours(ids, _pixels(1, hf.config.vision_config.image_size))
    assert (ids == IMAGE_TOKEN).sum() == 8
