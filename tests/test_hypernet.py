"""hypernet.py: shapes, parameter counts, dW = 0 at init, padding invariance, gradients, compile, save/load."""
import json
import time
from types import SimpleNamespace

import pytest
import torch

from adapter import adapter_from_lora, concat_adapters
from hypernet import (HyperConfig, HyperNet, compile_hypernet, compose_lora, load_hypernet, param_breakdown,
                      save_hypernet)
import model as M
from model import TextConfig, lora_linear

# Small perceiver dims so every test runs in well under a second on 2 cores.
TINY_PERCEIVER = dict(latent_size=32, n_latents=4, num_blocks=2, n_heads=4, head_dim=8, n_kv_heads=2, rank=4)


def model_config(L=3, D=24, I=40, heads=4, kv=2, head_dim=6):
    """Stand-in for SmolVLMConfig: HyperConfig.for_model only reads `.text`."""
    return SimpleNamespace(text=TextConfig(hidden_size=D, intermediate_size=I, num_hidden_layers=L,
                                           num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim))


def tiny(targets=("down_proj",), seed=0, proj_mult=4, **kw):
    torch.manual_seed(seed)
    return HyperNet(HyperConfig.for_model(model_config(**kw), targets=targets, proj_mult=proj_mult, **TINY_PERCEIVER))


def inputs(hyper, B=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = hyper.config
    return torch.randn(B, c.num_layers, T, c.hidden_size, generator=g), torch.ones(B, T, dtype=torch.long)


def test_defaults_are_the_released_ones():
    c = HyperConfig.for_model(model_config())
    assert (c.latent_size, c.n_latents, c.num_blocks, c.n_heads, c.head_dim, c.n_kv_heads, c.rank, c.proj_mult,
            c.alpha) == (512, 8, 9, 16, 128, 4, 16, 4, 128.0)
    assert c.targets == ("down_proj",) and c.target_shapes == (("down_proj", 40, 24),)
    assert HyperConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c  # JSON round trip
    with pytest.raises(ValueError, match="unknown LoRA target"):
        HyperConfig.for_model(model_config(), targets=("lm_head",))


def test_shapes_tiny_multi_target():
    hyper = tiny(targets=("q_proj", "down_proj"))
    h, mask = inputs(hyper)
    out = hyper(h, mask)
    assert list(out) == ["q_proj", "down_proj"]  # canonical LORA_TARGETS order
    assert out["q_proj"][0].shape == (2, 3, 8, 24) and out["q_proj"][1].shape == (2, 3, 8, 24)
    assert out["down_proj"][0].shape == (2, 3, 8, 40) and out["down_proj"][1].shape == (2, 3, 8, 24)
    # Each target has its own queries, head, scalers and static LoRA.
    assert hyper.decoder.latents_q.shape == (2 * 4, 32)
    assert set(hyper.head) == set(hyper.scaler_A) == set(hyper.bias_B) == {"q_proj", "down_proj"}


@pytest.mark.parametrize("size,expect_total,expect", [
    # method.md §3.3: ~128.6M (500M) and ~227M (2.2B), with the per-part sizes it lists.
    ("500M", 128.6e6, dict(projection=9.3e6, encoder=51.9e6, decoder=5.8e6, pre_head=2.1e6, head=57.7e6,
                           static_lora=1.8e6)),
    ("2.2B", 227e6, dict(projection=37.7e6, head=125.8e6, static_lora=3.9e6)),
])
def test_real_shapes_and_parameter_counts_on_meta(size, expect_total, expect):
    cfg = HyperConfig.for_model(M.preset_config(size))
    L, D, I = cfg.num_layers, cfg.hidden_size, cfg.target_shapes[0][1]
    assert (L, D, I) == {"500M": (32, 960, 2560), "2.2B": (24, 2048, 8192)}[size]
    with torch.device("meta"):
        hyper = HyperNet(cfg)
        A, B = hyper(torch.empty(1, L, 900, D), torch.ones(1, 900))["down_proj"]
    assert A.shape == (1, L, 32, I) and B.shape == (1, L, 32, D)
    counts = param_breakdown(hyper)
    print({k: f"{v / 1e6:.3f}M" for k, v in counts.items()})
    assert abs(counts["total"] - expect_total) / expect_total < 0.002
    for part, n in expect.items():
        assert abs(counts[part] - n) < 0.05e6, part


def test_delta_w_is_exactly_zero_at_init():
    hyper = tiny(targets=("q_proj", "down_proj"))
    h, mask = inputs(hyper)
    for t, (A, B) in hyper(h, mask).items():
        assert torch.count_nonzero(B) == 0, t  # scaler_B = 0 and bias_B = 0
        assert torch.count_nonzero(A) > 0, t   # A itself is not degenerate
    # Through model.py's LoRA rule the layer output is bit-identical to the frozen layer's.
    A, B = hyper(h, mask)["down_proj"]
    lin, x = torch.nn.Linear(40, 24), torch.randn(2, 5, 40)
    assert torch.equal(lora_linear(lin, x, (A[:, 0], B[:, 0]), hyper.config.alpha), lin(x))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_positions_change_nothing(side):
    hyper = tiny()
    with torch.no_grad():
        hyper.scaler_B["down_proj"].fill_(0.7)  # make the generated B depend on the context
    h, mask = inputs(hyper, B=1, T=6)
    junk = 50 * torch.randn(1, 3, 5, 24)  # large garbage at the padded positions
    hp = torch.cat([h, junk], 2) if side == "right" else torch.cat([junk, h], 2)
    pad = torch.zeros(1, 5, dtype=torch.long)
    mp = torch.cat([mask, pad], 1) if side == "right" else torch.cat([pad, mask], 1)
    ref, got = hyper(h, mask)["down_proj"], hyper(hp, mp)["down_proj"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # ... while unmasking them does change the output (the test is not vacuous).
    assert not torch.allclose(hyper(hp, torch.ones_like(mp))["down_proj"][1], ref[1], atol=1e-4)


def test_layer_chunks_match_all_layers_at_once():
    hyper = tiny(L=5)
    h, mask = inputs(hyper)
    mask[1, -2:] = 0
    ref = hyper(h, mask)["down_proj"]
    for chunk in (1, 2, 5):
        torch.testing.assert_close(hyper(h, mask, layer_chunk=chunk)["down_proj"], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_chunk", [None, 2])  # 2 also exercises the checkpointed path
def test_gradients_reach_every_parameter(layer_chunk):
    hyper = tiny(targets=("q_proj", "down_proj"))
    with torch.no_grad():  # at init dW does not depend on the generated A or on bias_A: open both paths
        for t in hyper.config.targets:
            hyper.scaler_B[t].fill_(0.5)
            hyper.bias_B[t].normal_()
    h, mask = inputs(hyper)
    mask[0, -3:] = 0
    loss = 0
    for A, B in hyper(h, mask, layer_chunk=layer_chunk).values():
        dW = torch.einsum("blro,blri->bloi", B, A)  # (B, L, d_out, d_in): what the base model sees
        loss = loss + (dW * torch.randn_like(dW)).sum()
    loss.backward()
    dead = [n for n, p in hyper.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_compiled_matches_eager():
    hyper = tiny()
    with torch.no_grad():
        hyper.scaler_B["down_proj"].fill_(0.7)
    h, mask = inputs(hyper)
    mask[1, -2:] = 0
    ref = hyper(h, mask)["down_proj"]
    keys = set(hyper.state_dict())
    t0 = time.perf_counter()
    compile_hypernet(hyper, enabled=True)
    got = hyper(h, mask)["down_proj"]
    print(f"compile + first call: {time.perf_counter() - t0:.1f} s")
    # Tolerance: fp32 with fused kernels reordering reductions; observed differences are ~1e-7.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert set(hyper.state_dict()) == keys  # the compiled function holds no weights of its own


def test_proj_mult_sets_the_projection_width_and_old_configs_keep_the_released_one():
    hyper = tiny(proj_mult=1)
    assert hyper.modality_projection.gate_proj.weight.shape == (24, 24)  # D -> 1 * D, not 4 * D
    assert hyper.modality_projection.down_proj.weight.shape == (32, 24)
    h, mask = inputs(hyper)
    assert hyper(h, mask)["down_proj"][0].shape == (2, 3, 8, 40)
    old = hyper.config.to_dict()
    del old["proj_mult"]  # a hypernet.json written before the field existed
    assert HyperConfig.from_dict(old).proj_mult == 4


def test_save_load_round_trip_is_bit_exact(tmp_path):
    hyper = tiny(targets=("q_proj", "down_proj"), proj_mult=2)
    with torch.no_grad():
        for p in hyper.parameters():  # move every tensor off its init value
            p.add_(0.01 * torch.randn_like(p))
    path = save_hypernet(tmp_path / "hn", hyper)
    assert sorted(f.name for f in (tmp_path / "hn").iterdir()) == ["hypernet.json", "hypernet.safetensors"]
    loaded = load_hypernet(tmp_path / "hn", model_config=model_config())
    assert loaded.config == hyper.config
    sd, sd2 = hyper.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    h, mask = inputs(hyper)
    for t, (A, B) in hyper(h, mask).items():
        A2, B2 = loaded(h, mask)[t]
        assert torch.equal(A, A2) and torch.equal(B, B2)
    assert load_hypernet(path).config == hyper.config  # the .safetensors path works too


@pytest.mark.parametrize("other", [dict(L=4), dict(D=32, heads=4, head_dim=8), dict(I=48)])
def test_load_rejects_a_different_base_model(tmp_path, other):
    save_hypernet(tmp_path / "hn.safetensors", tiny())
    with pytest.raises(ValueError, match=r"built for L=3, D=24, down_proj 40->24 but the base model has"):
        load_hypernet(tmp_path / "hn.safetensors", model_config=model_config(**other))


def test_end_to_end_with_the_base_model():
    """Hidden states from model.py in, LoRA back into model.py: at init the logits are bit-identical (§12)."""
    torch.manual_seed(0)
    cfg = M.SmolVLMConfig(M.VisionConfig(32, 64, 1, 4, 8, 32),
                          M.TextConfig(128, 48, 96, 3, 6, 2, 8, 10000.0, 1e-5, 256), image_token_id=100)
    vlm = M.SmolVLM(cfg).eval()
    hyper = HyperNet(HyperConfig.for_model(cfg, targets=("v_proj", "down_proj"), **TINY_PERCEIVER))
    ids, prompt = torch.randint(0, 100, (2, 9)), torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        hidden = torch.stack(vlm(ids, output_hidden_states=True, logits="none").hidden_states, 1)  # (B, L, T, D)
        lora = hyper(hidden, torch.ones(2, 9))
        base = vlm(prompt).logits
        assert torch.equal(vlm(prompt, lora=lora, lora_alpha=hyper.config.alpha).logits, base)
        hyper.scaler_B["down_proj"].fill_(1.0)
        changed = vlm(prompt, lora=hyper(hidden, torch.ones(2, 9)), lora_alpha=hyper.config.alpha).logits
    assert not torch.allclose(changed, base, atol=1e-4)


def test_lora_init_is_also_zero_but_trains_the_head_from_step_one():
    """init="lora" (head's B columns 0, scaler_B 1) starts at dW = 0 exactly like the released init, but the generating
    head gets a gradient at once; with the released init (scaler_B = 0) it gets none until scaler_B moves."""
    grads = {}
    for init in ("released", "lora"):
        torch.manual_seed(0)
        hyper = HyperNet(HyperConfig.for_model(model_config(), targets=("down_proj",), init=init, **TINY_PERCEIVER))
        h, mask = inputs(hyper)
        A, B = hyper(h, mask)["down_proj"]
        assert torch.count_nonzero(B) == 0, init
        # A stand-in loss that wants some dW: the B rows' gradient is then nonzero.
        (B * torch.randn_like(B)).sum().backward()
        grads[init] = (hyper.head["down_proj"].grad[..., 40:].abs().sum().item(),  # the head's B half (d_in = 40)
                       hyper.scaler_B["down_proj"].grad.abs().sum().item())
    # released: only scaler_B can move, the head is stuck; lora: the head moves (scaler_B follows once B is nonzero)
    assert grads["released"][0] == 0.0 and grads["released"][1] > 0.0
    assert grads["lora"][0] > 0.0
    with pytest.raises(ValueError, match="unknown hypernetwork init"):
        HyperNet(HyperConfig.for_model(model_config(), init="other", **TINY_PERCEIVER))


def test_compose_lora_is_adapter_concat_batched_and_differentiable():
    """Training-time composition (train.py --compose-prob) builds, for every video of a batch, exactly the adapter
    compose.py / internalize.py --segments build from its segments; a video with fewer segments is padded with zero
    rows, which leave its dW unchanged; gradients reach every segment."""
    hyper = tiny(targets=("down_proj", "q_proj"))
    for p in (*hyper.scaler_B.values(), *hyper.bias_B.values()):  # make dW non-zero, as after training
        torch.nn.init.normal_(p, std=0.3)
    H, mask = inputs(hyper, B=5, T=6)
    H.requires_grad_(True)
    lora = hyper(H, mask)
    owner = torch.tensor([0, 0, 0, 1, 2, 2])[:5]  # video 0: segments 0-2, video 1: segment 3, video 2: segment 4
    composed = compose_lora(lora, owner, hyper.config.rank)
    r, meta = hyper.config.rank, {"segments": [{"video": "v", "video_sha256": "", "start": 0, "end": 1}], "alpha": 1,
                                 "base_config_sha256": "", "base_weights_sha256": "", "hypernet_sha256": "",
                                 "targets": list(lora)}
    for t, ab in lora.items():
        for A, B in zip(composed[t][0], composed[t][1]):
            assert A.shape[1] == B.shape[1] == 4 * r  # 3 segments at most, then the static rows
    single = lambda i: adapter_from_lora({t: (a[i:i + 1], b[i:i + 1]) for t, (a, b) in lora.items()}, r, meta)  # noqa
    want = concat_adapters([single(0), single(1), single(2)]).ab
    for t in lora:
        assert torch.equal(composed[t][0][0].detach(), want[t][0]) and torch.equal(composed[t][1][0].detach(), want[t][1])
        for v, seg in ((1, 3), (2, 4)):  # one segment: the same dW as the segment's own adapter
            dw = torch.einsum("lri,lro->lio", composed[t][0][v], composed[t][1][v])
            own = torch.einsum("lri,lro->lio", lora[t][0][seg], lora[t][1][seg])
            torch.testing.assert_close(dw, own, rtol=0, atol=1e-6)
    loss = sum(a.square().sum() + b.square().sum() for a, b in composed.values())
    loss.backward()
    assert all(H.grad[i].abs().sum() > 0 for i in range(5))
    # Every video with a single segment: nothing changes.
    ones = compose_lora(lora, torch.arange(5), r)
    assert all(torch.equal(ones[t][k], lora[t][k]) for t in lora for k in range(2))


def test_out_norm_batch_standardises_over_the_batch_in_training_and_uses_running_stats_at_inference(tmp_path):
    """out_norm="batch": in training every perceiver output feature has mean 0 and variance 1 over the clips of the
    batch, and the running statistics follow the batches; at inference a clip's adapter is the same alone or in any
    batch, and it survives save/load bit-exactly (load_hypernet returns the hyper in inference mode)."""
    torch.manual_seed(0)
    hyper = HyperNet(HyperConfig.for_model(model_config(), init="lora", out_norm="batch", **TINY_PERCEIVER))
    seen = []
    hyper.pre_head.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    h, mask = inputs(hyper, B=6)
    h = h + 3.0  # a part every clip shares, as in real hidden states
    hyper.train()
    hyper(h, mask)
    e = seen[-1].flatten(1)  # (B, L * n_q * W)
    assert e.mean(0).abs().max() < 1e-4
    var = e.var(0, unbiased=False)  # 1, less the eps of 1e-5 for the few features that barely vary from clip to clip
    assert var.max() < 1 + 1e-4 and (var > 0.99).float().mean() > 0.95
    assert hyper.running_mean.abs().max() > 0  # moved from its zero start
    hyper(h[:1], mask[:1])  # one clip in training: no spread to measure, the running statistics are used (no error)
    hyper.eval()
    alone = hyper(h[:1], mask[:1])["down_proj"]
    batched = hyper(h, mask)["down_proj"]
    assert all(torch.allclose(x[:1], y, atol=1e-6) for x, y in zip(batched, alone))
    save_hypernet(tmp_path / "hn", hyper)
    loaded = load_hypernet(tmp_path / "hn", model_config=model_config())
    assert not loaded.training and torch.equal(loaded.running_var, hyper.running_var)
    assert all(torch.equal(x, y) for x, y in zip(loaded(h, mask)["down_proj"], batched))
    assert "running_mean" not in tiny().state_dict()  # out_norm "none" (released): nothing new in the checkpoint
    with pytest.raises(ValueError, match="unknown hypernetwork out_norm"):
        HyperNet(HyperConfig.for_model(model_config(), out_norm="layer", **TINY_PERCEIVER))
