r"""OIG and OIG+ (Lee, Kang & Han, "Diffusion-Based Conditional Image Editing through
Optimized Inference with Guidance", WACV 2025), following the official implementation
(github.com/Hleephilip/OIG, commit 1da09e1) step by step, un-lagged.

Notation: x^src_t the source trajectory (DDIM reconstruction from the inverted noise with
the source prompt), x^tgt_t the target trajectory (from the same x_T), y_src / y_tgt the
prompts, E_I / E_T the guidance CLIP's image / text encoders, D the VAE decoder, Π the CLIP
preprocessing (x/2 + 1/2, no clamp; bicubic resize of the short side; centre crop; CLIP
normalisation), f^l_t the residual-branch output (after conv2, before the skip add) of
ResNet block l of the U-Net's down and up blocks (the mid block excluded), w the CFG scale,
ε̂ = ε(x, y_neg) + w (ε(x, y_tgt) − ε(x, y_neg)).

1. x_T = DDIM-Inv(E(x_src), y_src), guidance 1 (pix2pix-zero index convention by default).
2. Reconstruction pass (no grad), CFG with [y_neg, y_src], caching S^l_k = f^l(x^src_{τ_k}).
3. Guided pass, at every step k = 0..N−1 (timestep τ_k):

       x̂0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)
       L_clip   = max(0, cos(E_I(Π(D(x̂0))), E_T(y_src)) − cos(E_I(Π(D(x̂0))), E_T(y_tgt)) + β_p)
       L_struct = Σ_l max(0, β_f · MSE(f^l_t(x^tgt_t), S^l_k) − MSE(f^l_t(x^tgt_t), sg f^l_{t+1}(x^tgt_{t+1})))
                  (no negative at the first guided step: Σ_l β_f · MSE(f^l_t, S^l_k))
       L_dist   = λ1 L_clip + λ2 L_struct
       x_{t−Δ}  = DDIM(x_t, ε̂) − η_k ∇_{x_t} L_dist

   The CFG input is [x_t, x_t]; like the reference, the gradient is the one reaching the
   first (negative-prompt) copy, while the loss value covers both halves (MSE over the
   [2, C, H, W] features). η_k = η(min(k+1, N−1)) with η(i) = 2(i+1)/(N/10) while
   i+1 < N/10, else 2·1.05^−(i+1)  (0.80, 1.20, 1.60, 1.567, … , 0.174 for N = 50).

OIG+ adds the cycle-consistency terms of the reference (paper Appendix B): the source
reconstruction is re-inverted step by step in lock-step with the target pass; its DDIM
"jump to T", x̃_T = sqrt(ᾱ_T/ᾱ_s) x_s + (sqrt(1−ᾱ_T) − sqrt(ᾱ_T(1−ᾱ_s)/ᾱ_s)) ε, feeds

       L_cyc,tgt = λ4 (1 − i/N) / η_i · ‖x̂0^tgt − Sample_N(x̃_T, y_tgt)‖₂      (added to L_dist)
       L_cyc,src = λ3 (1 − i/N) · ‖sqrt(ᾱ_T) x̂0^tgt + sqrt(1−ᾱ_T) ε(x̂0^tgt, 1, y_tgt) − x̃_T‖₂

with λ3 = 0.2 λ4 by default; the second's gradient (w.r.t. the source chain's latent) is
subtracted after each inverse step. λ4 = 0 gives OIG exactly.

Differences from the reference that do not change results: no gradients of U-Net
parameters; no extra no-grad U-Net calls when λ4 = 0; when the negative prompt is the
source prompt (real images) the reconstruction runs one batch-1 forward per step
(ε̂ = ε(x, y_src) exactly) and keeps one copy of the features; in the guided pass the CFG
copy whose gradient is discarded runs without autograd, so only one copy is
back-propagated; a hinge at 0 (no gradient) is left out of the backward, so when the CLIP
hinge is inactive the VAE decoder and CLIP are not back-propagated; features are kept in
the compute dtype on the device (``offload_features=true`` moves them to the CPU); and the
whole loop is written without the reference's one-step lag.

Memory savers (config switches, off by default; each leaves the edit unchanged, tested on the
tiny model; measured at 512 px with ``experiments/bench_memory.py``, table in experiments/README),
applied to the guided pass, where the memory peak is: ``vae_checkpointing`` (gradient
checkpointing of the VAE decoder blocks that the CLIP term back-propagates through: their
activations are recomputed during the backward instead of kept; bit-identical; -2.6 GB of an
8.0 GB step working set, +15% time), ``unet_checkpointing`` (the same for the U-Net blocks of the
back-propagated CFG copy; bit-identical; -1.0 GB, +11%), ``offload_features`` (above; the
reconstruction's features, 45 MB per step at 512 px, off the device), and ``attention_slicing``
(diffusers' sliced attention, ``auto`` | ``max`` | a slice size, head slice by head slice with an
explicit softmax: equal up to float rounding). Sliced attention is *not* a saver under PyTorch 2:
it replaces the memory-efficient scaled-dot-product kernels with explicit attention matrices that
autograd keeps, and an OIG step at 512 px went from 13.5 GB to over 24 GB (killed); it is kept for
runtimes without those kernels, with a warning.

Differences that can, each a config switch: the VAE posterior *mean* is encoded
(``encode=mean``; the reference draws an unseeded sample: ``encode=sample`` draws a seeded
one); the aspect ratio is kept (``resize_mode=keep_aspect``; the reference resizes to a
square: ``square``); the guidance CLIP runs in the model's dtype (the reference: fp16 CLIP
on CUDA with SD in fp32; run OIG with ``dtype=fp32``, as ``experiment=table1`` does: its
gradients underflow in fp16); no safety checker blacks out outputs. The CLIP resize is
bicubic without antialiasing (torchvision < 0.17 tensor semantics).
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .clip import load_clip
from .diffusion import Timer
from .editor import Editor
from .features import FeatureHooks, resnet_layers
from .registry import register_editor
from .types import EditRequest, EditResult

log = logging.getLogger(__name__)


@dataclass
class PointWeights:
    """Per-point weights of the n points guided as one batch (a batched sweep; n = 1 for one edit):
    [n] tensors, ``eta`` and ``guided`` [steps, n]. ``struct_on`` / ``clip_on``: the term acts on the
    point (its weight and switch are on); ``struct_rec`` / ``clip_rec``: the point's own run would
    compute (and report) the term."""

    lambda1: torch.Tensor
    lambda2: torch.Tensor
    beta_p: torch.Tensor
    beta_f: torch.Tensor
    eta: torch.Tensor
    guided: torch.Tensor
    struct_on: torch.Tensor
    clip_on: torch.Tensor
    struct_rec: list
    clip_rec: list
    lambda4: torch.Tensor | None = None
    lambda3: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.lambda1.shape[0])


def official_lr(i: int, total: int) -> float:
    """The reference's ``get_lr``: linear warm-up over ``total // 10`` steps, then 2·1.05^−(i+1)."""
    w = total // 10
    if i + 1 < w:
        return 2 * ((i + 1) / w)
    return 2 * (1 / 1.05) ** (i + 1)


def step_sizes(total: int, schedule: str = "official", lr: float = 1.0) -> list[float]:
    """η_k for k = 0..total−1 (un-lagged: η(min(k+1, total−1)))."""
    if schedule == "official":
        return [official_lr(min(k + 1, total - 1), total) for k in range(total)]
    if schedule == "constant":
        return [float(lr)] * total
    raise ValueError(f"unknown step-size schedule {schedule!r}; use official or constant")


@register_editor("oig")
class OIG(Editor):
    """OIG with every knob of the reference and the ablation switches.

    Ablations: ``clip_term`` triplet | target_only (1 − cos(v, E_T(y_tgt))) | off;
    ``struct_term`` triplet | positive_only (Σ β_f MSE(f, S)) | off; ``layers`` all | down |
    up | list of ResnetBlock2D names; ``grad_branch`` negative (reference) | conditional |
    both (sum); ``lr_schedule`` official | constant (``lr``); ``guide_range`` [start, end) as
    fractions of the steps (steps outside are plain DDIM steps).

    Memory savers (see the module docstring): ``vae_checkpointing``, ``unet_checkpointing``,
    ``attention_slicing`` (None | ``auto`` | ``max`` | slice size), ``offload_features``.

    Batched sweeps (:meth:`edit_points`): the points of a sweep over ``batched_params`` run as one
    batch, ``sweep_batch`` points per pass (``auto`` | a number).
    """

    has_reconstruction = True

    def __init__(self, lambda1: float = 0.1, lambda2: float = 1.0, beta_p: float = 0.5, beta_f: float = 2.5,
                 steps: int = 50, guidance: float = 5.0, negative: str = "auto", inversion: str = "p2pzero",
                 clip_model: str = "toy", clip_pretrained: str | None = None,
                 clip_term: str = "triplet", struct_term: str = "triplet", layers="all",
                 grad_branch: str = "negative", lr_schedule: str = "official", lr: float = 1.0,
                 guide_range: tuple = (0.0, 1.0), offload_features: bool = False, cache_features_mb: float = 256.0,
                 resize_mode: str = "keep_aspect", encode: str = "mean", vae_checkpointing: bool = False,
                 unet_checkpointing: bool = False, attention_slicing: str | int | None = None,
                 sweep_batch: str | int = "auto"):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        self.lambda1, self.lambda2, self.beta_p, self.beta_f = lambda1, lambda2, beta_p, beta_f
        self.inversion = inversion
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        for k, v, ok in (("clip_term", clip_term, ("triplet", "target_only", "off")),
                         ("struct_term", struct_term, ("triplet", "positive_only", "off")),
                         ("grad_branch", grad_branch, ("negative", "conditional", "both"))):
            if v not in ok:
                raise ValueError(f"{k} must be one of {ok}, got {v!r}")
        self.clip_term, self.struct_term, self.grad_branch = clip_term, struct_term, grad_branch
        self.layers = layers if isinstance(layers, str) else list(layers)
        self.lr_schedule, self.lr = lr_schedule, lr
        self.guide_range = tuple(float(x) for x in guide_range)
        self.offload_features = offload_features
        self.cache_features_mb = cache_features_mb
        size_ok = isinstance(attention_slicing, int) and not isinstance(attention_slicing, bool) and attention_slicing > 0
        if not (attention_slicing is None or attention_slicing in ("auto", "max") or size_ok):
            raise ValueError(f"attention_slicing must be null, auto, max or a positive slice size, "
                             f"got {attention_slicing!r}")
        self.vae_checkpointing, self.unet_checkpointing = bool(vae_checkpointing), bool(unet_checkpointing)
        self.attention_slicing = attention_slicing
        if not (sweep_batch == "auto" or (isinstance(sweep_batch, int) and not isinstance(sweep_batch, bool)
                                          and sweep_batch > 0)):
            raise ValueError(f"sweep_batch must be auto or a positive number of points, got {sweep_batch!r}")
        self.sweep_batch = sweep_batch
        step_sizes(steps, lr_schedule, lr)  # validate early

    # ------------------------------------------------------------------ setup
    def bind(self, models, cache=None, progress=False):
        super().bind(models, cache, progress)
        self.clip = None
        if self.lambda1 != 0 and self.clip_term != "off":
            self.clip = load_clip(self.clip_model, self.clip_pretrained, models.device, models.dtype)
        self.layer_names = resnet_layers(models.unet, self.layers)
        if self.lambda2 == 0 or self.struct_term == "off":
            self.layer_names = []  # nothing to capture: no hooks, no feature memory
        return self

    def negative_text(self, req: EditRequest) -> str:
        # the reference: the source caption for real images, "" for synthetic ones
        if self.negative == "auto":
            return "" if req.init_noise is not None else req.source_prompt
        return super().negative_text(req)

    @contextmanager
    def memory_savers(self):
        """The guided pass's memory savers, switched on for the block and restored after (the models
        are shared with other editors)."""
        vae, unet = self.models.vae, self.models.unet
        undo = []
        try:
            for on, model in ((self.vae_checkpointing, vae), (self.unet_checkpointing, unet)):
                if on and not model.is_gradient_checkpointing:
                    model.enable_gradient_checkpointing()  # only acts where autograd records (the guided copy)
                    undo.append(model.disable_gradient_checkpointing)
            if self.attention_slicing is not None:
                if hasattr(F, "scaled_dot_product_attention"):
                    log.warning("attention_slicing=%s replaces PyTorch's memory-efficient attention kernels with "
                                "explicit attention matrices, which autograd keeps: OIG needs more memory, not less "
                                "(experiments/README.md, memory table)", self.attention_slicing)
                original = dict(unet.attn_processors)
                unet.set_attention_slice(self.attention_slicing)
                undo.append(lambda: unet.set_attn_processor(original))
            yield
        finally:
            for fn in reversed(undo):
                fn()

    def _guided(self, k: int) -> bool:
        a, b = self.guide_range
        return a * self.steps <= k < b * self.steps

    # ------------------------------------------------------------------ pieces
    def _start(self, req, src, timer):
        c = self.core
        if req.init_noise is not None:  # synthetic source: start from its generation noise
            xT = req.init_noise.to(c.m.device, c.m.dtype)
            cached = False
        else:
            with timer("inversion"):
                inv = c.invert_image(src, req.source_prompt, self.steps, convention=self.inversion, seed=req.seed)
            xT, cached = inv.xT, inv.from_cache
        return xT, cached

    @torch.no_grad()
    def _reconstruct(self, xT, emb_src2, ts, d):
        """Reconstruction pass with the source prompt; returns (x0 latent, S[k][layer]).

        When the negative prompt is the source prompt (real images), both CFG halves are the
        same forward, ε̂ = ε(x, y_src) exactly, so one batch-1 forward per step is run and one
        copy of the features is kept (the structure loss broadcasts it over both halves).
        """
        c, unet = self.core, self.models.unet
        same = torch.equal(emb_src2[:1], emb_src2[1:])
        feats = []
        x = xT
        with FeatureHooks(unet, self.layer_names) as fh:
            for k, t in enumerate(tqdm(ts, desc="reconstruct", disable=not c.progress, leave=False)):
                if same:
                    eps = c.eps(x, t, emb_src2[1:])
                else:
                    eps = c.eps(x, t, emb_src2[1:], emb_src2[:1], self.guidance)
                f = fh.pop()
                if self.offload_features:
                    f = {n: v.to("cpu") for n, v in f.items()}
                feats.append(f if self._guided(k) else None)
                x, _ = c.ddim_step(x, eps, t, t - d)
        return x, feats

    def _cached_reconstruct(self, req, src, neg, xT, emb_src2, ts, d):
        """The reconstruction pass through the content-keyed cache (real images only), so sweeps
        over λ, β and the ablation switches compute it once. Entries larger than
        ``cache_features_mb`` are not stored (SD-1.4's 20 layers x 50 steps are ~4.7 GB)."""
        c = self.core
        key = None
        if c.cache is not None and req.init_noise is None:
            key = c.cache.key(kind="oig_reconstruction", model=c.m.fingerprint(), dtype=str(c.m.dtype),
                              image=c.image_key(src), resize=self.resize_mode, encode=self.encode,
                              seed=req.seed if self.encode == "sample" else None, prompt=req.source_prompt,
                              negative=neg, guidance=self.guidance, steps=self.steps, inversion=self.inversion,
                              layers=self.layer_names, guide_range=list(self.guide_range))
            hit = c.cache.get(key, "cpu" if self.offload_features else c.m.device, kind="reconstruction")
            if hit is not None:
                S = [None] * len(ts)
                for name, v in hit.items():
                    if "|" in name:
                        k, layer = name.split("|")
                        S[int(k)] = S[int(k)] or {}
                        S[int(k)][layer] = v.to(c.m.dtype)
                for k in range(len(ts)):
                    if S[k] is None and self._guided(k):
                        S[k] = {}
                return hit["z_src"].to(c.m.device, c.m.dtype), S, True
        z_src, S = self._reconstruct(xT, emb_src2, ts, d)
        if key is not None:
            size = sum(v.numel() * v.element_size() for f in S if f for v in f.values())
            if size <= self.cache_features_mb * 2**20:
                t = {"z_src": z_src}
                t.update({f"{k}|{n}": v for k, f in enumerate(S) if f for n, v in f.items()})
                c.cache.put(key, t)
        return z_src, S, False

    def _clip_loss(self, x0, e_src, e_tgt, w: PointWeights):
        """Per point: (L_clip before the hinge, L_clip), each [n]; the pre-hinge value tells whether
        the term has a gradient."""
        img = self.core.decode(x0) / 2 + 0.5  # no clamp, as the reference
        v = self.clip.encode_image(img.to(self.clip.dtype), normalize=True)
        cos_t = (v * e_tgt).sum(-1)
        if self.clip_term == "target_only":
            pre = 1 - cos_t
            return pre, pre
        cos_s = (v * e_src).sum(-1)
        pre = cos_s - cos_t + w.beta_p.to(cos_s.dtype)
        return pre, torch.clamp(pre, min=0)

    def _struct_loss(self, F_now, S, P, w: PointWeights, on, has_prev):
        """L_struct per point ([n], summed over layers) and its value: each point's MSEs run over its
        two CFG copies ([neg..., cond...] in ``F_now``). Layers whose hinge is at 0 are left out of
        a point's sum (their value and gradient are exactly 0), and out of the graph when they are
        at 0 for every point, so their backward is never run. ``on``: the points this term acts on;
        ``has_prev``: the points whose previous step was guided (the others get the positive term)."""
        n = w.n
        dev = self.models.device
        total = None
        for name in self.layer_names:
            fv = F_now[name].reshape(2, n, -1)
            s = S[name].to(dev)
            s = s.reshape(s.shape[0], 1, -1)  # a batch-1 S (same-prompt reconstruction) covers both halves
            pos = w.beta_f.to(fv.dtype) * (fv - s).pow(2).mean(dim=(0, 2))
            if self.struct_term == "positive_only" or P is None:
                term, act = pos, on
            else:
                pre = pos - (fv - P[name].reshape(2, n, -1)).pow(2).mean(dim=(0, 2))
                term = torch.where(has_prev, pre, pos)
                act = on & (~has_prev | (pre.detach() >= 0))
            if bool(act.any()):
                t_ = torch.where(act, term, torch.zeros_like(term))
                total = t_ if total is None else total + t_
        return total

    def _cfg_features(self, x_neg, x_cond, t, emb2, fh):
        """ε(x_neg, y_neg), ε(x_cond, y_cond) and the hooked features of both ([neg..., cond...]).
        One forward of the whole batch when both copies (or neither) need a gradient; otherwise
        the copy whose gradient is discarded runs without autograd, so only one copy is
        back-propagated (same values and gradient, about half the backward cost and memory)."""
        unet = self.models.unet
        n = x_neg.shape[0]
        fh.pop()
        if x_neg.requires_grad == x_cond.requires_grad:
            out = unet(torch.cat([x_neg, x_cond]), t, encoder_hidden_states=emb2.repeat_interleave(n, 0)).sample
            e_neg, e_cond = out.chunk(2)
            return e_neg, e_cond, fh.pop()
        outs, feats = [], []
        for x, emb in ((x_neg, emb2[:1]), (x_cond, emb2[1:])):
            with torch.set_grad_enabled(x.requires_grad and torch.is_grad_enabled()):
                outs.append(unet(x, t, encoder_hidden_states=emb.expand(n, *emb.shape[1:])).sample)
            feats.append(fh.pop())
        return outs[0], outs[1], {k: torch.cat([feats[0][k], feats[1][k]]) for k in feats[0]}

    def loss_at(self, x_neg, x_cond, t, emb2, S, P, e_src, e_tgt, fh, extra_loss=None, w=None, on=None,
                has_prev=None):
        """L_dist at the CFG pair: the reference's input ``[x_t, x_t]`` as its two copies
        ``x_neg`` (negative prompt) and ``x_cond`` (target prompt), differentiable w.r.t. each
        copy that requires grad. ``x̂0`` uses ``x_neg`` explicitly, as the reference's
        ``_x.chunk(2)[0]``. The batch holds n sweep points (n = 1 for one edit), each with the
        weights of ``w`` (default: this editor's); ``on`` the points guided at this step,
        ``has_prev`` those with a previous guided step (defaults: all; all when ``P`` is given).

        Returns ``(loss, eps, features, x0_hat, parts)``; ``fh`` is the active FeatureHooks.
        ``loss`` is the sum over points of the terms that have a gradient (hinges at 0 are left
        out: their value and gradient are 0); ``parts`` the value of each term per point ([n]).
        """
        c = self.core
        w = w if w is not None else self.point_weights([self])
        n = x_neg.shape[0]
        on = on if on is not None else torch.ones(n, dtype=torch.bool, device=x_neg.device)
        if has_prev is None:
            has_prev = torch.full((n,), P is not None, dtype=torch.bool, device=x_neg.device)
        e_neg, e_cond, F_now = self._cfg_features(x_neg, x_cond, t, emb2, fh)
        eps = e_neg + self.guidance * (e_cond - e_neg)
        a = c.abar(t)
        x0 = (x_neg - (1 - a) ** 0.5 * eps) / a**0.5
        parts = {}
        loss = x_neg.new_zeros(())  # stays without a graph when every term is inactive
        if self.layer_names:
            term = self._struct_loss(F_now, S, P, w, on & w.struct_on, has_prev)
            parts["struct"] = term.detach() if term is not None else x_neg.new_zeros(n)
            if term is not None:
                loss = loss + (w.lambda2 * term).sum()
        if self.clip is not None:
            pre, parts["clip"] = self._clip_loss(x0, e_src, e_tgt, w)
            act = on & w.clip_on & (pre.detach() >= 0)
            if bool(act.any()):
                loss = loss + torch.where(act, w.lambda1 * pre, torch.zeros_like(pre, dtype=w.lambda1.dtype)).sum()
            parts["clip"] = parts["clip"].detach()
        if extra_loss is not None:
            cyc = extra_loss(x0)
            parts["cycle_tgt"] = cyc.detach()
            loss = loss + cyc.sum()
        return loss, eps, F_now, x0, parts

    def _has_guidance(self, extra_loss, w: PointWeights | None = None, on=None) -> bool:
        """Whether any point has a term to differentiate at this step."""
        w = w if w is not None else self.point_weights([self])
        acts = w.struct_on | w.clip_on
        return bool((acts & on).any() if on is not None else acts.any()) or extra_loss is not None

    def _guided_step(self, x, k, t, d, emb2, S, P, e_src, e_tgt, w: PointWeights, fh, extra_loss=None):
        """One guided step at τ_k for the n points of ``x``. Returns (x_next, features for the next
        negative, x̂0, loss parts per point)."""
        on = w.guided[k]
        if not self._has_guidance(extra_loss, w, on):  # λ1 = λ2 = 0: nothing to differentiate, a plain CFG step
            with torch.no_grad():
                eps = self.core.eps(x, t, emb2[1:], emb2[:1], self.guidance)
                F_now = fh.pop()
                x_next, x0 = self.core.ddim_step(x, eps, t, t - d)
            return x_next, F_now, x0, {}
        has_prev = w.guided[k - 1] if (P is not None and k > 0) else torch.zeros_like(on)
        x_neg = x.detach().requires_grad_(self.grad_branch in ("negative", "both"))
        x_cond = x.detach().requires_grad_(self.grad_branch in ("conditional", "both"))
        inputs = [v for v in (x_neg, x_cond) if v.requires_grad]
        with torch.enable_grad():
            loss, eps, F_now, x0, parts = self.loss_at(x_neg, x_cond, t, emb2, S, P, e_src, e_tgt, fh, extra_loss,
                                                       w=w, on=on, has_prev=has_prev)
            if loss.requires_grad:
                g = sum(torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))
                fh.pop()  # with unet_checkpointing the backward re-ran the hooked blocks: drop those copies
            else:  # every hinge at 0: no gradient, no backward
                g = torch.zeros_like(x)
        with torch.no_grad():
            x_next, _ = self.core.ddim_step(x, eps.detach(), t, t - d)
            eta = torch.where(on, w.eta[k], torch.zeros_like(w.eta[k]))
            x_next = x_next - eta.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) * g
        P_next = {n: v.detach() for n, v in F_now.items()}
        return x_next, P_next, x0.detach(), parts

    # ------------------------------------------------------------------ sweep points
    #: hyperparameters whose values may differ between the points of one batched sweep (the
    #: others, apart from the memory-only ones, must be equal)
    batched_params = ("lambda1", "lambda2", "beta_p", "beta_f", "guide_range", "lr_schedule", "lr")
    memory_params = ("offload_features", "cache_features_mb", "vae_checkpointing", "unet_checkpointing",
                     "attention_slicing", "sweep_batch")

    def point_weights(self, points: list[OIG]) -> PointWeights:
        """The per-point loss weights of ``points`` (bound editors of this class), on the device."""
        dev = self.models.device
        vec = lambda name: torch.tensor([float(getattr(p, name)) for p in points], device=dev)  # noqa: E731
        flags = lambda fn: torch.tensor([bool(fn(p)) for p in points], device=dev)  # noqa: E731
        return PointWeights(
            lambda1=vec("lambda1"), lambda2=vec("lambda2"), beta_p=vec("beta_p"), beta_f=vec("beta_f"),
            eta=torch.tensor([step_sizes(self.steps, p.lr_schedule, p.lr) for p in points], device=dev).T.contiguous(),
            guided=torch.tensor([[p._guided(k) for p in points] for k in range(self.steps)], device=dev),
            struct_on=flags(lambda p: p.layer_names and p.lambda2 != 0),
            clip_on=flags(lambda p: p.clip is not None and p.lambda1 != 0),
            struct_rec=[bool(p.layer_names) for p in points], clip_rec=[p.clip is not None for p in points])

    def batchable(self, points: list[Editor]) -> str | None:
        """None when ``points`` can share one batched pass with this editor leading it; else why not."""
        if any(type(p) is not type(self) for p in points):
            return "the points are not all the same editor class"
        skip = set(self.batched_params) | set(self.memory_params)
        mine = {k: v for k, v in self.hparams().items() if k not in skip}
        for p in points:
            theirs = {k: v for k, v in p.hparams().items() if k not in skip}
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            if diff:
                return f"the points differ in {diff}, which one batched pass cannot vary (only {list(self.batched_params)})"
            if p.models is not self.models:
                return "the points are bound to different models"
        return None

    def edit_points(self, req: EditRequest, points: list[Editor]) -> list[EditResult]:
        """Every point of a sweep on one request in one pass: inversion and reconstruction once, the
        guided latents of the points stacked as one batch through each U-Net / VAE / CLIP call, each
        with its own weights and step sizes; chunks of ``sweep_batch`` points (``auto``: all; a pass
        that runs out of CUDA memory is retried with half the points, and the editor keeps that size
        for the next samples). Each result's timings are the chunk's divided
        by its points, ``info['sweep_batch']`` the chunk size."""
        why = self.batchable(points)
        if why is not None:
            log.info("OIG sweep: one pass per point (%s)", why)
            return super().edit_points(req, points)
        if self.sweep_batch == "auto":  # all points, or the size an earlier out-of-memory left
            size = min(len(points), getattr(self, "_fitting_batch", len(points)))
        else:
            size = int(self.sweep_batch)
        out, i = [], 0
        while i < len(points):
            chunk = points[i : i + size]
            try:
                out += self._call_chunk(req, chunk)
            except torch.cuda.OutOfMemoryError:
                if size == 1 or self.sweep_batch != "auto":
                    raise
                size = max(1, size // 2)
                self._fitting_batch = size  # kept for the next samples of the run
                log.warning("OIG sweep: out of memory with %d points per pass; trying %d", len(chunk), size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            i += len(chunk)
        return out

    def _call_chunk(self, req: EditRequest, chunk: list[OIG]) -> list[EditResult]:
        lead = copy.copy(self)  # the chunk's union: every hooked layer and the CLIP any point needs
        lead.layer_names = next((p.layer_names for p in chunk if p.layer_names), [])
        lead.clip = next((p.clip for p in chunk if p.clip is not None), None)
        lead.guide_range = (min(p.guide_range[0] for p in chunk), max(p.guide_range[1] for p in chunk))
        results = lead.call_with(req, lambda r, src, timer: lead._edit_points(r, src, timer, chunk))
        n = len(chunk)
        for r in results:
            r.timings = {k: v / n for k, v in r.timings.items()}
            r.info["sweep_batch"] = n
        return results

    # ------------------------------------------------------------------ edit
    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        return self._edit_points(req, src, timer, [self])[0]

    def _edit_points(self, req: EditRequest, src, timer: Timer, points: list[OIG]) -> list[EditResult]:
        c = self.core
        ts = c.timesteps(self.steps)
        d = c.step_size(self.steps)
        w = self.point_weights(points)
        xT, cached = self._start(req, src, timer)
        neg = self.negative_text(req)
        emb_neg, emb_src, emb_tgt = c.encode_text([neg]), c.encode_text([req.source_prompt]), c.encode_text([req.target_prompt])
        e_src = e_tgt = None
        if self.clip is not None:
            with torch.no_grad():
                e_src = self.clip.encode_text([req.source_prompt])
                e_tgt = self.clip.encode_text([req.target_prompt])
        with timer("reconstruction"):
            z_src, S, recon_cached = self._cached_reconstruct(req, src, neg, xT, torch.cat([emb_neg, emb_src]), ts, d)
        feat_bytes = sum(v.numel() * v.element_size() for s in S if s for v in s.values())
        emb2 = torch.cat([emb_neg, emb_tgt])
        stats = [{"clip": [], "struct": [], "cycle_tgt": []} for _ in points]
        with timer("editing"), self.memory_savers():
            x = self._edit_loop(xT, z_src, ts, d, emb2, torch.cat([emb_neg, emb_src]), S, e_src, e_tgt, w, stats)
        self.check_finite(x, "guided sampling")
        with torch.no_grad():  # one decode per point: the same computation as a single edit's
            outs = [c.decode_pil(x[i : i + 1]) for i in range(len(points))]
            recon = c.decode_pil(z_src)
        results = []
        for i in range(len(points)):
            info = {"inversion_cached": cached, "reconstruction_cached": recon_cached,
                    "source_feature_mb": round(feat_bytes / 2**20, 3)}
            for k_, v in stats[i].items():
                if v:
                    info[f"loss_{k_}_mean"] = sum(v) / len(v)
            results.append(EditResult(image=outs[i], source=src, reconstruction=recon, info=info))
        return results

    def _record(self, stats, parts, w: PointWeights, k: int):
        """Append step k's loss values to the stats of each point guided there, for the terms that
        point's own run would report."""
        for i in range(w.n):
            if not bool(w.guided[k, i]):
                continue
            for name, v in parts.items():
                if (name == "struct" and not w.struct_rec[i]) or (name == "clip" and not w.clip_rec[i]):
                    continue
                stats[i][name].append(float(v[i]))

    def _edit_loop(self, xT, z_src, ts, d, emb2, emb_src2, S, e_src, e_tgt, w: PointWeights, stats):
        c, unet = self.core, self.models.unet
        x, P = xT.repeat(w.n, *([1] * (xT.ndim - 1))), None
        with FeatureHooks(unet, self.layer_names) as fh:
            for k, t in enumerate(tqdm(ts, desc="oig", disable=not c.progress, leave=False)):
                if not bool(w.guided[k].any()):
                    with torch.no_grad():
                        e = c.eps(x, t, emb2[1:], emb2[:1], self.guidance)
                        fh.pop()
                        x, _ = c.ddim_step(x, e, t, t - d)
                    P = None
                    continue
                x, P, _, parts = self._guided_step(x, k, t, d, emb2, S[k], P, e_src, e_tgt, w, fh)
                self._record(stats, parts, w, k)
                S[k] = None  # free as we go
        return x


@register_editor("oig_plus")
class OIGPlus(OIG):
    """OIG+ : OIG plus the reference's cycle-consistency guidance (λ4, λ3 = ``lambda3_ratio`` · λ4)."""

    batched_params = OIG.batched_params + ("lambda4", "lambda3_ratio")

    def __init__(self, lambda4: float = 0.1, lambda3_ratio: float = 0.2, **kw):
        super().__init__(**kw)
        if tuple(self.guide_range) != (0.0, 1.0):
            raise ValueError("oig_plus guides every step (its cycle chain runs in lock-step); guide_range must be [0, 1]")
        self.lambda4 = lambda4
        self.lambda3_ratio = lambda3_ratio

    def point_weights(self, points):
        w = super().point_weights(points)
        dev = self.models.device
        w.lambda4 = torch.tensor([float(p.lambda4) for p in points], device=dev)
        w.lambda3 = torch.tensor([float(p.lambda3_ratio * p.lambda4) for p in points], device=dev)
        return w

    def _jump_to_T(self, x, a_T, a_s, eps):
        return (a_T / a_s) ** 0.5 * x + ((1 - a_T) ** 0.5 - (a_T * (1 - a_s) / a_s) ** 0.5) * eps

    def _cfg(self, X2, t, emb2):
        n = X2.shape[0] // 2
        e_neg, e_cond = self.models.unet(X2, t, encoder_hidden_states=emb2.repeat_interleave(n, 0)).sample.chunk(2)
        return e_neg + self.guidance * (e_cond - e_neg)

    @staticmethod
    def _norms(x):
        """‖x_i‖₂ of each point (one norm over all of a point's elements, as ``torch.norm`` of a batch of 1)."""
        return x.flatten(1).norm(dim=1)

    def _source_step(self, x_src, s, i, x0_tgt, emb_src2, emb2, d, a_T, w: PointWeights):
        """One step of the source re-inversion at timestep ``s`` with the source cycle loss (per point)."""
        c = self.core
        N = self.steps
        n = x_src.shape[0]
        grad = bool((w.lambda3 != 0).any())
        Xs = torch.cat([x_src, x_src]).detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            eps_s = self._cfg(Xs, s, emb_src2)
            g = 0.0
            if grad:
                xT_hat = self._jump_to_T(Xs[:n], a_T, float(c.alphas[s]), eps_s)
                with torch.no_grad():  # one-shot inversion of the current target x̂0 at the first timestep
                    s0 = c.timesteps(N)[-1]
                    e0 = self._cfg(torch.cat([x0_tgt, x0_tgt]), s0, emb2)
                    pseudo_T = self._jump_to_T(x0_tgt, a_T, 1.0, e0)
                loss = ((1.0 - i / N) * w.lambda3 * self._norms(pseudo_T - xT_hat)).sum()
                (gX,) = torch.autograd.grad(loss, Xs)
                g = gX.chunk(2)[0]
        with torch.no_grad():
            a_t = float(c.alphas[s - 1])
            a_n = float(c.alphas[s + d - 1]) if s + d <= c.T else c.final_alpha
            x0 = (x_src - (1 - a_t) ** 0.5 * eps_s.detach()) / a_t**0.5
            return a_n**0.5 * x0 + (1 - a_n) ** 0.5 * eps_s.detach() - g

    @torch.no_grad()
    def _next_jump(self, x_src, s_next, emb_src2, a_T):
        eps = self._cfg(torch.cat([x_src, x_src]), s_next, emb_src2)
        return self._jump_to_T(x_src, a_T, float(self.core.alphas[s_next]), eps)

    def _edit_loop(self, xT, z_src, ts, d, emb2, emb_src2, S, e_src, e_tgt, w: PointWeights, stats):
        c, unet = self.core, self.models.unet
        N, n = self.steps, w.n
        a_T = float(c.alphas[ts[0]])
        rep = lambda v: v.repeat(n, *([1] * (v.ndim - 1)))  # noqa: E731  (one copy per point)
        with torch.no_grad():  # i = 0 of the reference: the first source step, against x̂0 of x_T
            x0_t = c.x0_hat(xT, c.eps(xT, ts[0], emb2[1:], emb2[:1], self.guidance), ts[0])
        x_src = self._source_step(rep(z_src), ts[-1], 0, rep(x0_t), emb_src2, emb2, d, a_T, w)
        xT_hat = self._next_jump(x_src, ts[-2], emb_src2, a_T)
        x, P = rep(xT), None

        def cycle_tgt(i, k, target_T):
            def fn(x0):
                if not bool((w.lambda4 != 0).any()):
                    return x0.new_zeros(n)  # no graph: nothing to back-propagate
                with torch.no_grad():
                    pseudo = c.sample(target_T, emb2[1:], emb2[:1], self.guidance, N, desc="cycle")
                return (1.0 / w.eta[k]) * (1.0 - i / N) * w.lambda4 * self._norms(x0 - pseudo)
            return fn

        with FeatureHooks(unet, self.layer_names) as fh:
            for k, t in enumerate(tqdm(ts, desc="oig+", disable=not c.progress, leave=False)):
                i = min(k + 1, N - 1)  # the reference's iteration index for this step
                x, P, _, parts = self._guided_step(x, k, t, d, emb2, S[k], P, e_src, e_tgt, w, fh,
                                                   extra_loss=cycle_tgt(i, k, xT_hat))
                self._record(stats, parts, w, k)
                S[k] = None
                if k == N - 1:
                    break
                with torch.no_grad():
                    t1 = ts[k + 1]
                    x0_t = c.x0_hat(x, c.eps(x, t1, emb2[1:], emb2[:1], self.guidance), t1)
                    fh.pop()
                s = ts[-(k + 1) - 1]
                x_src = self._source_step(x_src, s, k + 1, x0_t, emb_src2, emb2, d, a_T, w)
                fh.pop()
                if k + 1 != N - 1:
                    xT_hat = self._next_jump(x_src, ts[-(k + 1) - 2], emb_src2, a_T)
                    fh.pop()
                else:
                    xT_hat = x_src.detach().clone()
        return x
