"""InstructPix2Pix (Brooks et al., CVPR'23) through diffusers' ``StableDiffusionInstructPix2PixPipeline``.

No inversion: an image-conditioned U-Net (8 input channels: the noisy latent and the source's
VAE latent) denoises from seeded noise under dual classifier-free guidance,
``eps = eps_uncond + guidance * (eps_text - eps_image) + image_guidance * (eps_image - eps_uncond)``
(text 7.5, image 1.5, 100 steps by default, as the original CLI).

Model. The editor loads its U-Net in :meth:`InstructPix2Pix.bind` with
``oig.models.load_sd(base, device, dtype, unet=self.unet)``, so the VAE / text encoder come
from ``base`` and only the U-Net from ``unet``: ``base`` is the bound model (the toy SD with the
default ``unet: toy_ip2p``) unless ``pretrained`` names one (real data: ``pretrained: ip2p`` and
``unet: ip2p``, the whole ``timbrooks/instruct-pix2pix`` repository). With ``unet: null`` and
``pretrained: null`` the bound model itself must have an 8-channel U-Net.

Scheduler. ``scheduler: euler_ancestral`` (default) is the original sampler: the CLI
(``edit_cli.py``) and PIE-Bench's runner call k-diffusion's ``sample_euler_ancestral`` on
``CompVisDenoiser.get_sigmas(steps)``, i.e. ``steps`` timesteps evenly spaced from 999 to 0.
The wrapper builds diffusers' ``EulerAncestralDiscreteScheduler`` from the model's beta schedule
with ``timestep_spacing="linspace"`` (that grid; the model's DDIM config says ``leading``, which
would give 981, 961, ..., 1 and a larger starting sigma). diffusers interpolates sigma linearly
between integer timesteps where k-diffusion interpolates log sigma: the grids agree to a relative
1e-4 (tested against a transcription of ``get_sigmas``). The initial noise and each ancestral step's
noise come from the generator seeded with ``req.seed``. ``ddim`` is deterministic DDIM from the
model's scheduler config (``leading`` grid, ``clip_sample`` and ``set_alpha_to_one`` off).

Image. The prepared source (shared preprocessing, aspect kept, sides multiples of the model's
pixel multiple) is passed as is; the pipeline encodes it with the VAE posterior mode (= mean,
unscaled, as the model was trained), so ``encode`` must be ``mean``. The output size is the
source size (the pipeline takes height and width from the image latent).

Instruction. ``req.instruction`` when the dataset has one; otherwise
:func:`instruction_from_prompts` builds one from the two prompts: the prompts are split into
lower-case words and aligned with :class:`difflib.SequenceMatcher`; each differing span gives
one clause, joined with " and ":

* replaced span X -> Y: ``turn the X into a Y`` (``an`` before a vowel; no article when Y starts
  with a determiner or number: a/an/the/two/some/...; leading articles are dropped from X);
* inserted span Y: ``make it Y``, or ``add Z`` when Y is ``with Z`` (article added as above);
* deleted span X: ``remove the X`` (leading articles, conjunctions and prepositions dropped from X);
* identical prompts: the target prompt itself (with a warning).

E.g. "a red circle on a gray background" -> "a red square on a gray background" gives
"turn the circle into a square"; "a red circle ..." -> "a striped red circle ..." gives
"make it striped".
"""

from __future__ import annotations

import difflib
import logging
import re

import torch

from oig.diffusion import Timer
from oig.editor import Editor
from oig.models import SDModels, load_sd, sd_scheduler
from oig.registry import register_editor
from oig.types import EditRequest, EditResult

from .diffedit import seeded

log = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "euler_ancestral")
_ARTICLES = {"a", "an", "the"}
_DETERMINERS = _ARTICLES | {"one", "two", "three", "four", "five", "some", "many", "several", "this", "that",
                            "these", "those", "his", "her", "its", "their", "my", "our", "your"}
_LINKS = _ARTICLES | {"and", "with", "of", "in", "on", "at", "by", "near", "or"}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


def _with_article(words: list[str]) -> str:
    phrase = " ".join(words)
    if words[0] in _DETERMINERS or words[0].isdigit():
        return phrase
    return ("an " if words[0][0] in "aeiou" else "a ") + phrase


def _strip(words: list[str], leading: set[str]) -> list[str]:
    """Drop leading words in ``leading`` (keeping at least one word)."""
    while len(words) > 1 and words[0] in leading:
        words = words[1:]
    return words


def instruction_from_prompts(source: str, target: str) -> str:
    """An edit instruction from a source and a target caption (rule in the module docstring)."""
    s, t = _words(source), _words(target)
    clauses = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=s, b=t, autojunk=False).get_opcodes():
        x, y = s[i1:i2], t[j1:j2]
        if op == "replace":
            clauses.append(f"turn the {' '.join(_strip(x, _ARTICLES))} into {_with_article(y)}")
        elif op == "insert":
            if y[0] == "with" and len(y) > 1:
                clauses.append(f"add {_with_article(_strip(y[1:], _ARTICLES))}")
            else:
                clauses.append(f"make it {' '.join(y)}")
        elif op == "delete":
            clauses.append(f"remove the {' '.join(_strip(x, _LINKS))}")
    if not clauses:
        log.warning("source and target prompts have the same words (%r); using the target prompt as the instruction",
                    target)
        return target
    return " and ".join(clauses)


def _base_id(models: SDModels) -> str:
    # load_sd names a model with a replaced U-Net "<base>+<unet>"; hub ids never contain "+"
    return models.model_id.split("+", 1)[0]


@register_editor("instruct_pix2pix")
class InstructPix2Pix(Editor):
    """InstructPix2Pix with the original CLI's sampler (Euler ancestral), guidance (text 7.5, image 1.5) and
    100 steps."""

    def __init__(
        self,
        steps: int = 100,
        guidance: float = 7.5,
        image_guidance: float = 1.5,
        negative: str = "empty",
        unet: str | None = "toy_ip2p",
        pretrained: str | None = None,
        scheduler: str = "euler_ancestral",
        resize_mode: str = "keep_aspect",
        encode: str = "mean",
    ):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        if scheduler not in SCHEDULERS:
            raise ValueError(f"instruct_pix2pix scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if encode != "mean":
            raise ValueError("instruct_pix2pix conditions on the VAE posterior mode, as the model was trained; "
                             f"encode must be 'mean', got {encode!r}")
        self.image_guidance = image_guidance
        self.unet = unet
        self.pretrained = pretrained
        self.scheduler = scheduler
        self.pipe = None

    def bind(self, models: SDModels, cache=None, progress: bool = False) -> InstructPix2Pix:
        from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

        if self.unet is None and self.pretrained is None:
            ip = models
        else:
            base = self.pretrained or _base_id(models)
            ip = load_sd(base, device=str(models.device), dtype=_DTYPE_NAMES[models.dtype],
                         revision=None if self.pretrained else models.revision, unet=self.unet)
        need = 2 * int(ip.vae.config.latent_channels)
        if int(ip.unet.config.in_channels) != need:
            raise ValueError(
                f"instruct_pix2pix needs an image-conditioned U-Net with {need} input channels; {ip.model_id} has "
                f"{ip.unet.config.in_channels}. Set method.unet to an InstructPix2Pix U-Net (toy_ip2p, ip2p or a folder "
                "with unet/)."
            )
        super().bind(ip, cache, progress)
        if self.scheduler == "ddim":
            sched = sd_scheduler(DDIMScheduler.from_config(ip.scheduler.config), "instruct_pix2pix")
        else:  # k-diffusion's get_sigmas grid: linspace(999, 0, steps)
            sched = EulerAncestralDiscreteScheduler.from_config(ip.scheduler.config, timestep_spacing="linspace")
        self.pipe = StableDiffusionInstructPix2PixPipeline(
            vae=ip.vae, text_encoder=ip.text_encoder, tokenizer=ip.tokenizer, unet=ip.unet,
            scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        return self

    def instruction(self, req: EditRequest) -> tuple[str, str]:
        """(instruction, where it came from: ``dataset`` or ``template``)."""
        if req.instruction:
            return req.instruction, "dataset"
        return instruction_from_prompts(req.source_prompt, req.target_prompt), "template"

    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        text, origin = self.instruction(req)
        with timer("sampling"):
            out = self.pipe(
                prompt=text, image=src, num_inference_steps=self.steps, guidance_scale=self.guidance,
                image_guidance_scale=self.image_guidance, negative_prompt=self.negative_text(req),
                generator=seeded(req.seed),
            ).images[0]
        if out.size != src.size:
            raise RuntimeError(f"instruct_pix2pix returned {out.size}, expected the source size {src.size}")
        return EditResult(image=out, source=src, info={"instruction": text, "instruction_source": origin})
