"""The shared diffusion core: prompt encoding, VAE encode/decode, DDIM sampling and inversion.

Every editor composes these pieces; none re-implements them. Notation: ``abar(t)`` is
the scheduler's cumulative alpha product, ``x_t`` a latent at timestep ``t``, CFG batches
are ordered ``[negative, conditional]`` and guided noise is
``eps = eps_neg + w * (eps_cond - eps_neg)``.

DDIM (eta = 0) from ``t`` to ``t_prev``::

    x0_hat = (x_t - sqrt(1 - abar(t)) * eps) / sqrt(abar(t))
    x_prev = sqrt(abar(t_prev)) * x0_hat + sqrt(1 - abar(t_prev)) * eps

with ``abar(t_prev < 0)`` = ``abar(0)`` (SD's ``set_alpha_to_one=False``).

Inversion runs the same update backwards. Two index conventions:

* ``standard`` (null-text inversion, diffusers' ``DDIMInverseScheduler``): for t in
  1, 21, ..., 981: ``x_t = DDIM(x_{t-20} -> t)`` with ``eps(x_{t-20}, t)``; 50 U-Net calls,
  the result sits at ``abar(981)``, where sampling starts.
* ``p2pzero`` (pix2pix-zero and the official OIG code): for t in 21, ..., 961 (48 calls),
  ``eps(x, t)`` moves from ``abar(t-1)`` to ``abar(t+19)``; the clean latent is treated as
  if it were at ``abar(20)`` and the result lands at ``abar(980)``.

The U-Net always speaks ε. A model whose scheduler config declares ``prediction_type:
v_prediction`` (SD 2.x at 768) gets a forward hook at load time (:func:`install_epsilon_output`,
called by :func:`oig.models.load_sd`) that converts its output to the noise prediction of the
same input, ``eps = sqrt(abar(t)) * v + sqrt(1 - abar(t)) * x_t``, with ``abar`` of the timestep
the U-Net is given; the model's scheduler is then rebuilt with ``prediction_type: epsilon``. That
one place serves every call: this core's :meth:`Diffusion.eps`, the editors' own U-Net calls (OIG's
differentiated CFG pair, OIG+'s cycle, DiffEdit's mask) and the diffusers pipelines some editors
run (which read the rebuilt scheduler). Sampling is then exactly diffusers' ``DDIMScheduler.step``
with ``prediction_type="v_prediction"`` (tested). Inversion keeps both conventions above, run on the
ε-equivalent model: ``eps(x, t)`` is converted with ``abar(t)``, the timestep the U-Net is told,
while diffusers' ``DDIMInverseScheduler`` with ``v_prediction`` converts with ``abar(t - d)``, the
level the latent is at (with ``epsilon`` the two are the same inversion, tested). Measured on the
tiny random U-Net made to output a constant v (``tests/test_vprediction.py``): 50-step inversion
then sampling returns the latent within 0.8% (max |Δz| / std z) here, within 15% with diffusers'
``DDIMInverseScheduler`` + ``DDIMScheduler`` (``v_prediction``). Other prediction types are
refused at load time (:func:`oig.models.epsilon_unet`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .image import pil_to_tensor, preprocess, tensor_to_pil
from .models import SDModels

log = logging.getLogger(__name__)


#: what a model's scheduler config may declare as ``prediction_type``
PREDICTION_TYPES = ("epsilon", "v_prediction")


def epsilon_from_v(v: torch.Tensor, x: torch.Tensor, abar) -> torch.Tensor:
    """The noise prediction equal to a v-prediction ``v`` at input ``x_t`` and noise level ``abar``:
    ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` and ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` give
    ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``. ``abar`` is a float or a tensor broadcasting to ``v``."""
    return abar**0.5 * v + (1 - abar) ** 0.5 * x


class EpsilonOutput:
    """Forward hook that turns a ``v_prediction`` U-Net's output into ε (see the module docstring).

    Reads the U-Net's input ``sample`` (its first ``out_channels`` channels are ``x_t``: an
    InstructPix2Pix U-Net takes the image latent as extra channels) and ``timestep`` (int, float,
    0-d or per-sample tensor). ``abar`` of an integer timestep is the scheduler's
    ``alphas_cumprod[t]``; of a fractional one (Euler schedulers' ``linspace`` grid) it follows the
    schedulers' own rule, sigma interpolated linearly between integer timesteps,
    ``abar = 1 / (1 + sigma^2)``. The conversion runs in fp32 and returns the output's dtype; it is
    differentiable (OIG back-propagates through it).
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas = alphas_cumprod.detach().to("cpu", torch.float64)
        self.sigmas = ((1 - self.alphas) / self.alphas).sqrt()

    def abar(self, timestep, n: int) -> torch.Tensor:
        t = torch.as_tensor(timestep).detach().to("cpu", torch.float64).flatten()
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"U-Net called with {t.numel()} timesteps for a batch of {n}")
        if (t < 0).any() or (t > len(self.alphas) - 1).any():
            raise ValueError(f"timestep outside [0, {len(self.alphas) - 1}]: {t.tolist()}")
        if torch.equal(t, t.round()):
            return self.alphas[t.long()]
        lo = t.floor().long().clamp(max=len(self.alphas) - 2)
        w = t - lo
        sigma = (1 - w) * self.sigmas[lo] + w * self.sigmas[lo + 1]
        return 1 / (1 + sigma**2)

    def __call__(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        v = output[0] if isinstance(output, tuple) else output.sample
        a = self.abar(t, v.shape[0]).to(v.device, torch.float32).view(-1, *([1] * (v.ndim - 1)))
        eps = epsilon_from_v(v.float(), x[:, : v.shape[1]].float(), a).to(v.dtype)
        if isinstance(output, tuple):
            return (eps, *output[1:])
        return type(output)(sample=eps)


def install_epsilon_output(unet: torch.nn.Module, alphas_cumprod: torch.Tensor) -> None:
    """Make ``unet`` (trained for ``v_prediction``) return ε from now on; a second call does nothing."""
    if getattr(unet, "_oig_epsilon_output", None) is not None:
        return
    unet._oig_epsilon_output = unet.register_forward_hook(EpsilonOutput(alphas_cumprod), with_kwargs=True)


def outputs_epsilon(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` carries the ε conversion of :func:`install_epsilon_output`."""
    return getattr(unet, "_oig_epsilon_output", None) is not None


@dataclass
class Inversion:
    """An inverted source: ``z0`` the clean latent, ``xT`` the noise, ``trajectory[k]`` the
    latent at the k-th *sampling* timestep (``trajectory[0] == xT``) when kept."""

    z0: torch.Tensor
    xT: torch.Tensor
    trajectory: list[torch.Tensor] = field(default_factory=list)
    from_cache: bool = False


class Timer:
    """Accumulates wall seconds per phase (synchronising CUDA so GPU time is counted)."""

    def __init__(self):
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


class Diffusion:
    """Stateless helpers around an :class:`SDModels`; cheap to construct.

    ``resize_mode`` is ``keep_aspect`` (default: long side = model resolution, sides rounded
    to the U-Net's multiple) or ``square`` (the official codes' distorting resize).
    ``encode`` is ``mean`` (deterministic VAE posterior mean) or ``sample`` (seeded sample,
    as the reference codes do without a seed).
    """

    def __init__(self, models: SDModels, resize_mode: str = "keep_aspect", encode: str = "mean", cache=None,
                 progress: bool = False):
        self.m = models
        self.resize_mode = resize_mode
        self.encode_mode = encode
        self.cache = cache
        self.progress = progress
        pred = models.scheduler.config.get("prediction_type", "epsilon")
        if pred != "epsilon" and not outputs_epsilon(models.unet):
            raise ValueError(
                f"{models.model_id}: the scheduler declares prediction_type={pred!r} but the U-Net returns it "
                f"unconverted; load the model with oig.models.load_sd, which converts v_prediction to ε")
        self.alphas = models.scheduler.alphas_cumprod.to(torch.float64)
        self.final_alpha = float(models.scheduler.final_alpha_cumprod)
        self.T = int(models.scheduler.config.num_train_timesteps)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.m.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        full = tok(prompts, padding=False, truncation=False).input_ids
        for p, f in zip(prompts, full):
            if len(f) > tok.model_max_length:
                log.warning("prompt truncated to %d tokens: %r", tok.model_max_length, p)
        return self.m.text_encoder(ids.to(self.m.device))[0].to(self.m.dtype)

    def token_count(self, prompt: str) -> int:
        return len(self.m.tokenizer(prompt).input_ids)

    # ------------------------------------------------------------------ images
    def prepare(self, img: Image.Image) -> Image.Image:
        return preprocess(img, self.m.resolution, self.m.pixel_multiple, self.resize_mode)

    @torch.no_grad()
    def encode_image(self, img: Image.Image, seed: int = 0) -> torch.Tensor:
        x = pil_to_tensor(img).to(self.m.device, self.m.dtype)
        dist = self.m.vae.encode(x).latent_dist
        if self.encode_mode == "sample":
            g = torch.Generator(device="cpu").manual_seed(seed)
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(dist.mean)
        elif self.encode_mode == "mean":
            z = dist.mean
        else:
            raise ValueError(f"unknown encode mode {self.encode_mode!r}; use mean or sample")
        return z * self.m.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> image tensor in [-1, 1] (not clamped; differentiable)."""
        return self.m.vae.decode(z / self.m.scaling_factor).sample

    @torch.no_grad()
    def decode_pil(self, z: torch.Tensor) -> Image.Image:
        return tensor_to_pil(self.decode(z))[0]

    def noise(self, shape, seed: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(shape, generator=g).to(self.m.device, self.m.dtype)

    # ------------------------------------------------------------------ schedule
    def timesteps(self, steps: int) -> list[int]:
        """The scheduler's grid for ``steps`` steps, noisiest first. Every DDIM step here (and in
        diffusers' ``DDIMScheduler``) goes from ``t`` to ``t - T // steps``, so the grid must be
        evenly spaced by ``T // steps``: SD's ``leading`` spacing always is, ``trailing`` when
        ``steps`` divides ``T``; anything else is refused."""
        s = self.m.scheduler
        s.set_timesteps(steps)
        ts = [int(t) for t in s.timesteps]
        d = self.step_size(steps)
        if any(a - b != d for a, b in zip(ts, ts[1:])):
            raise ValueError(
                f"{self.m.model_id}: the scheduler's {s.config.get('timestep_spacing', 'leading')!r} grid for {steps} "
                f"steps is not evenly spaced by {d} ({ts[:4]}...), which DDIM's t -> t - {d} update needs; set "
                f"\"timestep_spacing\": \"leading\" in the model's scheduler/scheduler_config.json (what Stable "
                f"Diffusion ships) or use a step count that divides {self.T}")
        return ts

    def abar(self, t: int) -> float:
        return float(self.alphas[t]) if t >= 0 else self.final_alpha

    def step_size(self, steps: int) -> int:
        return self.T // steps

    # ------------------------------------------------------------------ U-Net
    def eps(self, x: torch.Tensor, t: int, cond: torch.Tensor, neg: torch.Tensor | None = None,
            guidance: float = 1.0, **unet_kwargs) -> torch.Tensor:
        """Noise prediction; with ``neg`` and guidance != 1 the CFG batch ``[neg, cond]``. Prompt
        embeddings of batch 1 serve every latent of a batch ``x``."""
        n = x.shape[0]
        if cond.shape[0] == 1 and n > 1:
            cond = cond.expand(n, *cond.shape[1:])
        if neg is not None and neg.shape[0] == 1 and n > 1:
            neg = neg.expand(n, *neg.shape[1:])
        if neg is None or guidance == 1.0:
            return self.m.unet(x, t, encoder_hidden_states=cond, **unet_kwargs).sample
        out = self.m.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, cond]), **unet_kwargs).sample
        e_neg, e_cond = out.chunk(2)
        return e_neg + guidance * (e_cond - e_neg)

    def x0_hat(self, x, eps, t):
        a = self.abar(t)
        return (x - (1 - a) ** 0.5 * eps) / a**0.5

    def ddim_step(self, x, eps, t: int, t_prev: int):
        """One deterministic DDIM step; returns ``(x_prev, x0_hat)``."""
        x0 = self.x0_hat(x, eps, t)
        ap = self.abar(t_prev)
        return ap**0.5 * x0 + (1 - ap) ** 0.5 * eps, x0

    # ------------------------------------------------------------------ loops
    @torch.no_grad()
    def sample(
        self,
        xT: torch.Tensor,
        cond: torch.Tensor,
        neg: torch.Tensor | None = None,
        guidance: float = 1.0,
        steps: int = 50,
        start: int = 0,
        callback: Callable | None = None,
        unet_kwargs: Callable[[int, int], dict] | None = None,
        desc: str = "sample",
    ) -> torch.Tensor:
        """DDIM from ``timesteps[start]`` to the clean latent.

        ``callback(i, t, x_prev, x0_hat)`` may return a replacement for ``x_prev`` (latent
        blending, guidance); ``unet_kwargs(i, t)`` supplies per-step U-Net keyword arguments.
        """
        ts = self.timesteps(steps)
        d = self.step_size(steps)
        x = xT
        for i in tqdm(range(start, len(ts)), desc=desc, disable=not self.progress, leave=False):
            t = ts[i]
            kw = unet_kwargs(i, t) if unet_kwargs else {}
            e = self.eps(x, t, cond, neg, guidance, **kw)
            x_new, x0 = self.ddim_step(x, e, t, t - d)
            if callback is not None:
                r = callback(i, t, x_new, x0)
                if r is not None:
                    x_new = r
            x = x_new
        return x

    @torch.no_grad()
    def invert(
        self,
        z0: torch.Tensor,
        cond: torch.Tensor,
        steps: int = 50,
        guidance: float = 1.0,
        neg: torch.Tensor | None = None,
        convention: str = "standard",
        stop: int | None = None,
        keep: bool = False,
    ) -> Inversion:
        """DDIM inversion of ``z0`` (see the module docstring for the two conventions).

        ``stop`` (standard only) ends after that many steps, for partial inversion (SDEdit-like
        editors); ``keep`` stores every latent, noisiest first: with the standard convention
        ``trajectory[k]`` is the latent at sampling timestep ``timesteps[k]`` and
        ``trajectory[-1]`` is ``z0`` (``steps + 1`` entries; ``p2pzero`` gives ``steps - 1``).
        """
        ts = self.timesteps(steps)
        d = self.step_size(steps)
        x = z0
        traj = [z0] if keep else []
        if convention == "standard":
            seq = list(reversed(ts))[: stop if stop is not None else len(ts)]
            for t in tqdm(seq, desc="invert", disable=not self.progress, leave=False):
                e = self.eps(x, t, cond, neg, guidance)
                x0 = self.x0_hat(x, e, t - d)
                a = self.abar(t)
                x = a**0.5 * x0 + (1 - a) ** 0.5 * e
                if keep:
                    traj.append(x)
        elif convention == "p2pzero":
            if stop is not None:
                raise ValueError("partial inversion is only defined for the standard convention")
            for t in tqdm(list(reversed(ts))[1:-1], desc="invert", disable=not self.progress, leave=False):
                e = self.eps(x, t, cond, neg, guidance)
                a_t = float(self.alphas[t - 1])
                a_n = float(self.alphas[t + d - 1]) if t + d <= self.T else self.final_alpha
                x0 = (x - (1 - a_t) ** 0.5 * e) / a_t**0.5
                x = a_n**0.5 * x0 + (1 - a_n) ** 0.5 * e
                if keep:
                    traj.append(x)
        else:
            raise ValueError(f"unknown inversion convention {convention!r}; use standard or p2pzero")
        traj.reverse()
        return Inversion(z0=z0, xT=x, trajectory=traj)

    # ------------------------------------------------------------------ cached inversion
    def image_key(self, img: Image.Image) -> str:
        a = np.asarray(img)
        return hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest()[:24]

    def invert_image(
        self,
        img: Image.Image,
        prompt: str,
        steps: int = 50,
        guidance: float = 1.0,
        negative: str = "",
        convention: str = "standard",
        keep: bool = False,
        seed: int = 0,
    ) -> Inversion:
        """Encode a *prepared* image and invert it, through the inversion cache when one is set."""
        key = None
        if self.cache is not None:
            key = self.cache.key(
                model=self.m.fingerprint(), dtype=str(self.m.dtype), image=self.image_key(img), size=img.size,
                resize=self.resize_mode, encode=self.encode_mode, seed=seed if self.encode_mode == "sample" else None,
                prompt=prompt, negative=negative if guidance != 1.0 else None, guidance=guidance, steps=steps,
                convention=convention, kind="ddim", keep=keep,
            )
            hit = self.cache.get(key, self.m.device)
            if hit is not None:
                traj = [hit[f"traj_{i}"] for i in range(int(hit["n_traj"].item()))]
                return Inversion(hit["z0"].to(self.m.dtype), hit["xT"].to(self.m.dtype),
                                 [t.to(self.m.dtype) for t in traj], from_cache=True)
        z0 = self.encode_image(img, seed)
        cond = self.encode_text([prompt])
        neg = self.encode_text([negative]) if guidance != 1.0 else None
        inv = self.invert(z0, cond, steps, guidance, neg, convention, keep=keep)
        if self.cache is not None:
            tensors = {"z0": inv.z0, "xT": inv.xT, "n_traj": torch.tensor(len(inv.trajectory))}
            tensors.update({f"traj_{i}": t for i, t in enumerate(inv.trajectory)})
            self.cache.put(key, tensors)
        return inv
