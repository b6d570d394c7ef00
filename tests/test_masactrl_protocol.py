"""MasaCtrl against its official code (TencentARC/MasaCtrl ``masactrl/masactrl.py``, identical in
PIE-Bench's ``models/masactrl/masactrl.py``) and PIE-Bench's runner ``run_editing_masactrl.py``.

The mask-guided reference is a transcription (written for this test) of
``MutualSelfAttentionControlMaskAuto`` (``masactrl.py:196-334``): ``aggregate_cross_attn_map``,
``attn_batch`` and ``forward``, fed the processor's ``(b h) n d`` projections of the batch
``[u_s, u_t, c_s, c_t]`` and the head-averaged cross-attention maps it stored this step.
"""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image

from baselines.masactrl import MasaCtrl, MutualSelfAttention
from oig.attn_control import attention_layers
from oig.toy import world
from oig.types import EditRequest

SRC = "a red circle on a gray background"
TGT = "a red square on a gray background"
# SD 1.x's block layout with tiny channels: 16 transformer layers, 16x16 maps at a 64x64 latent
SD_LAYOUT = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16, 16, 16), layers_per_block=2,
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


@pytest.fixture(scope="module")
def sd(tiny_models):
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**SD_LAYOUT).eval().requires_grad_(False)
    return dataclasses.replace(tiny_models, unet=unet, model_id=tiny_models.model_id + "+sd_layout")


@pytest.fixture(scope="module")
def img():
    return Image.fromarray(world.benchmark(1)[0].source_image)


def _run_recording(ed, req):
    """Run ``ed`` and return its result and the sampled latents after every DDIM step."""
    seen = []
    step = ed.core.ddim_step

    def rec(x, eps, t, t_prev):
        out = step(x, eps, t, t_prev)
        seen.append(out[0])
        return out

    ed.core.ddim_step = rec
    try:
        return ed(req), seen
    finally:
        del ed.core.ddim_step


# ------------------------------------------------------------------ §10.2 partial schedule
@pytest.mark.parametrize("start_step", [2, 3])
def test_start_step_leaves_the_first_steps_untouched(sd, img, start_step):
    """``step_idx = range(start_step, total_steps)`` (masactrl.py:37): the latents after the first
    ``start_step`` steps are the uncontrolled run's, bit for bit; every later one differs."""
    steps = 5
    kw = dict(steps=steps, inversion_guidance=1.0)  # (the CFG-7.5 inversion with "" only costs time)
    req = EditRequest(img, SRC, TGT, seed=0)
    ctrl_res, ctrl = _run_recording(MasaCtrl(start_step=start_step, **kw).bind(sd), req)
    free_res, free = _run_recording(MasaCtrl(start_step=steps, **kw).bind(sd), req)
    assert len(ctrl) == len(free) == steps
    for i in range(start_step):
        assert torch.equal(ctrl[i], free[i]), f"step {i}"
    for i in range(start_step, steps):
        # the target row changes from the first controlled step on; the source row never does
        assert (ctrl[i][1] - free[i][1]).abs().max() > 1e-4, f"step {i}"
        assert torch.equal(ctrl[i][0], free[i][0]), f"step {i}"
    # with no controlled step the edit is plain DDIM sampling of [source, target] from the inverted noise
    c = MasaCtrl(**kw).bind(sd).core
    inv = c.invert_image(c.prepare(img), "", steps)
    plain = c.sample(torch.cat([inv.xT, inv.xT]), c.encode_text(["", TGT]), c.encode_text(["", ""]), 7.5, steps)
    assert torch.equal(free_res.extras["latent"], plain[1:])
    assert torch.equal(free_res.extras["source_latent"], plain[:1])
    assert not torch.equal(ctrl_res.extras["latent"], plain[1:])


def test_controlled_layers_are_the_last_six_decoder_self_attentions(sd):
    """``cur_att_layer // 2 in range(10, 16)`` (masactrl.py:36,60) on SD's 16 transformer layers."""
    layers = attention_layers(sd.unet)
    ctrl = MutualSelfAttention(start_step=4, start_layer=10)
    ctrl.setup(layers)
    names = sorted(layers[i].name for i in ctrl.mutual_layers)
    assert names == sorted(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in (2, 3) for a in range(3))
    assert all(layers[i].index // 2 in range(10, 16) for i in ctrl.mutual_layers)  # the official layer count


def test_runner_prompts_and_guidance(tiny_models, img, monkeypatch):
    """PIE-Bench's ``ddim+masactrl`` (run_editing_masactrl.py:131-158, diffuser_utils.py:90-270):
    invert with "" at CFG 7.5 against "", sample ``["", target]`` at CFG 7.5 against ""."""
    ed = MasaCtrl(steps=2).bind(tiny_models)
    c = ed.core
    seen = {}
    invert, sample = c.invert_image, c.sample

    def spy_invert(img_, prompt, steps, guidance=1.0, negative="", **k):
        seen["invert"] = (prompt, steps, guidance, negative)
        return invert(img_, prompt, steps, guidance=guidance, negative=negative, **k)

    def spy_sample(x, cond, neg, guidance, steps, **k):
        seen["sample"] = (cond, neg, guidance, steps)
        return sample(x, cond, neg, guidance, steps, **k)

    monkeypatch.setattr(c, "invert_image", spy_invert)
    monkeypatch.setattr(c, "sample", spy_sample)
    ed(EditRequest(img, SRC, TGT, seed=0))
    assert seen["invert"] == ("", 2, 7.5, "")
    cond, neg, guidance, steps = seen["sample"]
    assert torch.equal(cond, c.encode_text(["", TGT])) and torch.equal(neg, c.encode_text(["", ""]))
    assert (guidance, steps) == (7.5, 2)


# ------------------------------------------------------------------ §10.3 mask-guided attention
def _heads_first(x, heads):
    """``rearrange(x, "(b h) n d -> h (b n) d")``"""
    bh, n, d = x.shape
    return x.reshape(bh // heads, heads, n, d).permute(1, 0, 2, 3).reshape(heads, -1, d)


def _to_batch_heads(x, heads):
    """``rearrange(x, "b n (h d) -> (b h) n d")`` (the official processor's layout)."""
    b, n, hd = x.shape
    return x.reshape(b, n, heads, hd // heads).permute(0, 2, 1, 3).reshape(b * heads, n, hd // heads)


class OfficialMaskAuto:
    """``MutualSelfAttentionControlMaskAuto``'s maths for one controlled self-attention call."""

    def __init__(self, thres, ref_token_idx, cur_token_idx, cross_attns):
        self.thres, self.ref_token_idx, self.cur_token_idx = thres, ref_token_idx, cur_token_idx
        self.cross_attns = cross_attns  # head-means [B, N, 77] of this step's 16x16 cross-attentions
        self.self_attns_mask = None

    def attn_batch(self, q, k, v, num_heads, scale):
        b = q.shape[0] // num_heads
        q, k, v = (_heads_first(x, num_heads) for x in (q, k, v))
        sim = torch.einsum("h i d, h j d -> h i j", q, k) * scale
        if self.self_attns_mask is not None:
            mask = self.self_attns_mask
            mask[mask >= self.thres] = 1
            mask[mask < self.thres] = 0
            sim_fg = sim + mask.masked_fill(mask == 0, torch.finfo(sim.dtype).min)
            sim_bg = sim + mask.masked_fill(mask == 1, torch.finfo(sim.dtype).min)
            sim = torch.cat([sim_fg, sim_bg])
        attn = sim.softmax(-1)
        if len(attn) == 2 * len(v):
            v = torch.cat([v] * 2)
        out = torch.einsum("h i j, h j d -> h i d", attn, v)
        h1 = out.shape[0] // num_heads  # "(h1 h) (b n) d -> (h1 b) n (h d)"
        n, d = out.shape[1] // b, out.shape[2]
        return out.reshape(h1, num_heads, b, n, d).permute(0, 2, 3, 1, 4).reshape(h1 * b, n, num_heads * d)

    def aggregate_cross_attn_map(self, idx):
        attn_map = torch.stack(self.cross_attns, dim=1).mean(1)
        res = int(math.sqrt(attn_map.shape[-2]))
        attn_map = attn_map.reshape(-1, res, res, attn_map.shape[-1])
        image = attn_map[..., idx]
        if isinstance(idx, list):
            image = image.sum(-1)
        image_min = image.min(dim=1, keepdim=True)[0].min(dim=2, keepdim=True)[0]
        image_max = image.max(dim=1, keepdim=True)[0].max(dim=2, keepdim=True)[0]
        return (image - image_min) / (image_max - image_min)

    def forward(self, q, k, v, num_heads, scale):
        qu, qc = q.chunk(2)
        ku, kc = k.chunk(2)
        vu, vc = v.chunk(2)
        h = num_heads
        out_u_source = self.attn_batch(qu[:h], ku[:h], vu[:h], h, scale)
        out_c_source = self.attn_batch(qc[:h], kc[:h], vc[:h], h, scale)
        res = int(math.sqrt(q.shape[1]))
        if len(self.cross_attns) == 0:
            self.self_attns_mask = None
        else:
            mask_source = self.aggregate_cross_attn_map(idx=self.ref_token_idx)[-2]
            self.self_attns_mask = F.interpolate(mask_source[None, None], (res, res)).flatten()
        out_u_target = self.attn_batch(qu[-h:], ku[:h], vu[:h], h, scale)
        out_c_target = self.attn_batch(qc[-h:], kc[:h], vc[:h], h, scale)
        if self.self_attns_mask is not None:
            mask_target = self.aggregate_cross_attn_map(idx=self.cur_token_idx)[-1]
            spatial_mask = F.interpolate(mask_target[None, None], (res, res)).reshape(-1, 1)
            spatial_mask[spatial_mask >= self.thres] = 1
            spatial_mask[spatial_mask < self.thres] = 0
            fg, bg = out_u_target.chunk(2)
            out_u_target = fg * spatial_mask + bg * (1 - spatial_mask)
            fg, bg = out_c_target.chunk(2)
            out_c_target = fg * spatial_mask + bg * (1 - spatial_mask)
            self.self_attns_mask = None
        return torch.cat([out_u_source, out_u_target, out_c_source, out_c_target])


def _mask_setup(sd, thres, ref_tokens, cur_tokens, seed=0, latent=64):
    """A mask-guided controller at step 4 with random 16x16 cross-attention maps of this step
    stored, and random q/k/v of its first controlled layer (``up_blocks.2``: 32x32 tokens)."""
    layers = attention_layers(sd.unet)
    ctrl = MutualSelfAttention(start_step=4, start_layer=10, mask_guided=True, mask_threshold=thres,
                               mask_ref_tokens=ref_tokens, mask_cur_tokens=cur_tokens)
    ctrl.layers = layers
    ctrl.setup(layers)
    ctrl.latent_hw = (latent, latent)
    ctrl.begin_step(4)
    layer = layers[min(ctrl.mutual_layers)]
    assert layer.name == "up_blocks.2.attentions.0.transformer_blocks.0.attn1"
    g = torch.Generator().manual_seed(seed)
    n_maps = latent // 4
    assert sorted(layers[i].name.split(".transformer")[0] for i in ctrl.store_layers) == [
        "down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
    for i in sorted(ctrl.store_layers):
        logits = 3 * torch.randn(4, n_maps * n_maps, 77, generator=g)
        ctrl.maps[i] = logits.softmax(-1)  # head-averaged probabilities, batch [u_s, u_t, c_s, c_t]
    heads, hd = 2, 4
    n = (latent // 2) ** 2
    q, k, v = (torch.randn(4, n, heads * hd, generator=g) for _ in range(3))
    attn = SimpleNamespace(heads=heads, scale=hd**-0.5)
    return ctrl, layer, attn, q, k, v


@pytest.mark.parametrize("thres,ref_tokens,cur_tokens", [(0.1, [1], [1]), (0.5, [1], [1]), (0.4, [1, 2], [3])])
def test_mask_auto_attention_equals_official(sd, thres, ref_tokens, cur_tokens):
    ctrl, layer, attn, q, k, v = _mask_setup(sd, thres, ref_tokens, cur_tokens)
    idx = ctrl.source_rows(4)
    assert idx.tolist() == [0, 0, 2, 2]
    with torch.no_grad():
        ours = ctrl.attend(layer, attn, q, k[idx], v[idx])  # the processor hands over edit_qkv's k, v
        ref = OfficialMaskAuto(thres, ref_tokens, cur_tokens, [ctrl.maps[i] for i in sorted(ctrl.store_layers)])
        official = ref.forward(*(_to_batch_heads(x, attn.heads) for x in (q, k, v)), attn.heads, attn.scale)
    assert ours.shape == official.shape == q.shape
    assert (ours - official).abs().max() < 1e-5
    # the masks are partial, so this is not plain mutual attention
    mask_s, mask_t = ctrl._masks(layer)
    assert 0 < mask_s.sum() < mask_s.numel() and 0 < mask_t.sum() < mask_t.numel()
    plain = OfficialMaskAuto(thres, ref_tokens, cur_tokens, []).forward(
        *(_to_batch_heads(x, attn.heads) for x in (q, k, v)), attn.heads, attn.scale)
    assert (official[[1, 3]] - plain[[1, 3]]).abs().max() > 1e-2
    assert (official[[0, 2]] - plain[[0, 2]]).abs().max() < 1e-5  # source rows: their own attention


def test_mask_auto_without_stored_maps_is_plain_mutual_attention(sd):
    ctrl, layer, attn, q, k, v = _mask_setup(sd, 0.1, [1], [1])
    ctrl.maps = {}
    assert ctrl.attend(layer, attn, q, k, v) is None  # the processor then attends to the source k, v
    ref = OfficialMaskAuto(0.1, [1], [1], []).forward(*(_to_batch_heads(x, attn.heads) for x in (q, k, v)),
                                                      attn.heads, attn.scale)
    idx = [0, 0, 2, 2]
    hd = q.shape[-1] // attn.heads
    split = lambda x: x.view(4, -1, attn.heads, hd).transpose(1, 2)  # noqa: E731
    mutual = F.scaled_dot_product_attention(split(q), split(k[idx]), split(v[idx]))
    assert (mutual.transpose(1, 2).reshape(4, -1, attn.heads * hd) - ref).abs().max() < 1e-5


def test_source_from_inversion_feeds_the_inverted_latents(tiny_models, img, monkeypatch):
    """``ref_intermediate_latents`` (diffuser_utils.py:169-174): before the U-Net call of step ``i``
    the source row is the inverted latent ``[-1 - i]`` (of timestep ``t_i``); the source row's
    output of the last step is kept (a one-step reconstruction, not the clean latent)."""
    steps = 3
    ed = MasaCtrl(steps=steps, inversion_guidance=1.0, source_from_inversion=True).bind(tiny_models)
    c = ed.core
    inputs = []
    eps = c.eps

    def spy(x, t, *a, **k):
        if x.shape[0] == 2:  # the [source, target] sampling batch (the inversion runs on one row)
            inputs.append(x)
        return eps(x, t, *a, **k)

    monkeypatch.setattr(c, "eps", spy)
    res, outs = _run_recording(ed, EditRequest(img, SRC, TGT, seed=0))
    inv = c.invert_image(c.prepare(img), "", steps, keep=True)
    assert len(inputs) == steps and len(inv.trajectory) == steps + 1
    for i in range(steps):
        assert torch.equal(inputs[i][0], inv.trajectory[i][0]), f"step {i}"
    assert torch.equal(res.extras["source_latent"], outs[-1][:1])
    assert not torch.allclose(res.extras["source_latent"], inv.z0, atol=1e-4)
    assert torch.equal(res.extras["latent"], outs[-1][1:])
