"""Attention control shared by the attention-editing baselines (PnP, MasaCtrl, Prompt-to-Prompt).

Three pieces, written once:

* :func:`attention_layers` — a stable table of the U-Net's attention modules (self-attention
  ``attn1`` and cross-attention ``attn2`` of every transformer block inside ``down_blocks``,
  ``mid_block`` and ``up_blocks``), in the order a forward pass calls them, each with its
  place (down/mid/up), block, transformer-layer number and resolution *level* (0 = latent
  resolution, ``k`` = latent side / 2**k).
* :class:`AttentionController` — the per-edit state: the current denoising step (set by the
  editor before every U-Net call, see :meth:`AttentionController.unet_kwargs`), which layers
  it acts on, head-averaged attention maps stored on request, and the edit hooks
  (:meth:`~AttentionController.edit_qkv`, :meth:`~AttentionController.edit_probs`,
  :meth:`~AttentionController.attend`) that subclasses override.
* :class:`ControlProcessor` — one diffusers attention processor class that computes q/k/v
  with the module's own ``to_q``/``to_k``/``to_v``/``to_out`` and hands them to the
  controller. A layer the controller does not act on at the current step is delegated to the
  module's *original* processor, so an edit with nothing to inject is bit-for-bit the plain
  U-Net.

:meth:`AttentionController.install` installs one processor per attention module through
:func:`oig.attention.attn_processors`; on exit (also after an exception) the U-Net gets its
original processor objects back.

Batch layout. Editors that denoise a source and a target branch together run the CFG batch
of :meth:`oig.diffusion.Diffusion.eps` on ``x = [source, target]``, i.e. rows
``[neg·source, neg·target, cond·source, cond·target]``: ``halves = 2`` groups of rows, the
first row of each group being its source. Plug-and-Play's unguided source branch gives
``[source, neg·target, cond·target]`` (one group). The helpers :meth:`source_rows` and
:meth:`target_rows` encode that.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import attn_processors

log = logging.getLogger(__name__)

_NAME = re.compile(
    r"^(?P<place>down_blocks|mid_block|up_blocks)(?:\.(?P<block>\d+))?\.attentions\.(?P<att>\d+)"
    r"\.transformer_blocks\.(?P<tb>\d+)\.(?P<which>attn1|attn2)$"
)
_PLACE = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
_PLACE_ORDER = {"down": 0, "mid": 1, "up": 2}


@dataclass(frozen=True)
class AttnLayer:
    """One attention module of the U-Net.

    ``index``: position among all attention modules in call order; ``transformer``: number of
    its transformer layer (the attn1/attn2 pair) in call order — SD 1.x/2.x have 16 (6 down,
    1 mid, 9 up); ``place_index``: transformer number within its place (the decoder layer
    number when ``place == "up"``); ``level``: the feature map is the latent down-sampled by
    ``2**level``.
    """

    name: str
    index: int
    transformer: int
    kind: str  # "self" | "cross"
    place: str  # "down" | "mid" | "up"
    block: int
    level: int
    place_index: int

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"

    def hw(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Feature-map size of this layer for a latent of size ``latent_hw``."""
        f = 2**self.level
        return -(-latent_hw[0] // f), -(-latent_hw[1] // f)


def attention_layers(unet: torch.nn.Module) -> list[AttnLayer]:
    """The attention modules of an SD-shaped ``UNet2DConditionModel`` in forward-call order."""
    n_levels = len(unet.down_blocks)
    found = []
    for name, mod in unet.named_modules():
        m = _NAME.match(name)
        if m is None:
            continue
        if getattr(mod, "norm_q", None) is not None or getattr(mod, "norm_k", None) is not None:
            raise ValueError(f"attention module {name} uses q/k normalisation; only SD-shaped U-Nets are supported")
        place = _PLACE[m["place"]]
        block = int(m["block"] or 0)
        level = {"down": block, "mid": n_levels - 1, "up": n_levels - 1 - block}[place]
        cross = bool(getattr(mod, "is_cross_attention", m["which"] == "attn2"))
        key = (_PLACE_ORDER[place], block, int(m["att"]), int(m["tb"]), m["which"])
        found.append((key, name, place, block, level, "cross" if cross else "self"))
    if not found:
        raise ValueError("this U-Net has no transformer attention layers (down_blocks/mid_block/up_blocks)")
    found.sort()
    layers, tr, place_count, last_tr = [], -1, {"down": -1, "mid": -1, "up": -1}, None
    for i, (key, name, place, block, level, kind) in enumerate(found):
        tr_key = key[:4]
        if tr_key != last_tr:
            tr += 1
            place_count[place] += 1
            last_tr = tr_key
        layers.append(AttnLayer(name, i, tr, kind, place, block, level, place_count[place]))
    return layers


def blend_level(layers: list[AttnLayer]) -> int:
    """The coarsest level with cross-attention in the down/up blocks (SD at 512 px: 16x16,
    the maps Prompt-to-Prompt's LocalBlend and MasaCtrl's automatic masks read)."""
    levels = [layer.level for layer in layers if layer.is_cross and layer.place != "mid"]
    if not levels:
        raise ValueError("no cross-attention layers outside the mid block")
    return max(levels)


class AttentionController:
    """Base controller: step counter, layer table and map storage; edits nothing.

    Subclasses choose their layers in :meth:`setup` and override :meth:`active` and the edit
    hooks. ``store_layers`` (layer indices) makes the controller keep the head-averaged
    attention probabilities of those layers: ``maps[index]`` for the current step and
    ``map_sums[index]`` summed over the steps so far (fp32, after :meth:`edit_probs`, as P2P's
    in-place attention store does).
    """

    #: rows per CFG group of the batch; the first row of each group is the source
    halves = 2

    def __init__(self):
        self.layers: list[AttnLayer] = []
        self.step = 0
        self.t: int | None = None
        self.total_steps = 0
        self.latent_hw: tuple[int, int] | None = None
        self.store_layers: set[int] = set()
        self.maps: dict[int, torch.Tensor] = {}
        self.map_sums: dict[int, torch.Tensor] = {}

    # ---------------------------------------------------------------- lifecycle
    def setup(self, layers: list[AttnLayer]):
        """Called by :meth:`install` with the U-Net's layer table; select layers here."""

    def reset(self):
        self.step, self.t = 0, None
        self.maps, self.map_sums = {}, {}

    def begin_step(self, i: int, t: int | None = None):
        """Declare that the next U-Net call is denoising step ``i`` (timestep ``t``)."""
        self.step, self.t = i, t
        self.maps = {}

    def unet_kwargs(self, i: int, t: int) -> dict:
        """Per-step hook for :meth:`oig.diffusion.Diffusion.sample`: sets the step, adds nothing."""
        self.begin_step(i, t)
        return {}

    @contextmanager
    def install(self, unet: torch.nn.Module):
        """Install a :class:`ControlProcessor` on every attention module; restore on exit."""
        layers = attention_layers(unet)
        self.layers = layers
        self.reset()
        self.setup(layers)
        by_name = {layer.name: layer for layer in layers}
        procs = {}
        for key, proc in unet.attn_processors.items():
            mod = key[: -len(".processor")] if key.endswith(".processor") else key
            procs[key] = ControlProcessor(self, by_name[mod], proc) if mod in by_name else proc
        with attn_processors(unet, procs):
            yield self

    # ---------------------------------------------------------------- batch rows
    def source_rows(self, batch: int) -> torch.Tensor:
        """For each row, the index of the source row of its group (``[0, 0, 2, 2]`` for 4 rows)."""
        g = batch // self.halves
        return torch.arange(batch) // g * g

    def target_rows(self, batch: int) -> list[int]:
        g = batch // self.halves
        return [r for r in range(batch) if r % g != 0]

    # ---------------------------------------------------------------- hooks
    def active(self, layer: AttnLayer) -> bool:
        """Whether ``layer`` goes through the controller at the current step (else: original processor)."""
        return layer.index in self.store_layers

    def needs_probs(self, layer: AttnLayer) -> bool:
        """Whether the explicit softmax path is needed (edited or stored probabilities)."""
        return layer.index in self.store_layers

    def edit_qkv(self, layer: AttnLayer, q, k, v):
        """Edit projections of shape ``[batch, tokens, heads * head_dim]``; returns ``(q, k, v)``."""
        return q, k, v

    def edit_probs(self, layer: AttnLayer, probs: torch.Tensor) -> torch.Tensor:
        """Edit attention probabilities of shape ``[batch, heads, queries, keys]``."""
        return probs

    def attend(self, layer: AttnLayer, attn, q, k, v) -> torch.Tensor | None:
        """Optionally compute the attention output ``[batch, tokens, heads * head_dim]`` yourself."""
        return None

    def record(self, layer: AttnLayer, probs: torch.Tensor):
        m = probs.detach().float().mean(1)
        self.maps[layer.index] = m
        prev = self.map_sums.get(layer.index)
        self.map_sums[layer.index] = m.clone() if prev is None else prev + m


class ControlProcessor:
    """Attention processor that routes one module's q/k/v/probabilities through a controller.

    Mirrors diffusers' ``AttnProcessor``/``AttnProcessor2_0`` (spatial norm, group norm,
    cross-attention norm, residual connection, output rescale); the softmax is explicit only
    where the controller needs the probabilities, otherwise
    ``F.scaled_dot_product_attention`` is used.
    """

    def __init__(self, controller: AttentionController, layer: AttnLayer, original):
        self.controller = controller
        self.layer = layer
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        c, layer = self.controller, self.layer
        if not c.active(layer):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key = attn.to_k(context)
        value = attn.to_v(context)
        query, key, value = c.edit_qkv(layer, query, key, value)

        out = c.attend(layer, attn, query, key, value)
        if out is None:
            n_keys = key.shape[1]
            if layer.index in c.store_layers or c.needs_probs(layer):
                mask = attn.prepare_attention_mask(attention_mask, n_keys, batch)
                q, k, v = (attn.head_to_batch_dim(x) for x in (query, key, value))
                probs = attn.get_attention_scores(q, k, mask)
                probs = probs.view(batch, attn.heads, *probs.shape[1:])
                probs = c.edit_probs(layer, probs)
                if layer.index in c.store_layers:
                    c.record(layer, probs)
                out = torch.bmm(probs.reshape(batch * attn.heads, *probs.shape[2:]).to(v.dtype), v)
                out = attn.batch_to_head_dim(out)
            else:
                mask = None
                if attention_mask is not None:
                    mask = attn.prepare_attention_mask(attention_mask, n_keys, batch)
                    mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
                hd = key.shape[-1] // attn.heads
                q, k, v = (x.view(batch, -1, attn.heads, hd).transpose(1, 2) for x in (query, key, value))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
                out = out.transpose(1, 2).reshape(batch, -1, attn.heads * hd).to(q.dtype)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def sdpa_rows(attn, q, k, v) -> torch.Tensor:
    """Plain multi-head attention of ``[batch, tokens, inner]`` projections (helper for ``attend``)."""
    batch, hd = q.shape[0], q.shape[-1] // attn.heads
    qh, kh, vh = (x.view(batch, -1, attn.heads, hd).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * hd)
