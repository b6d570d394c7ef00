"""Pix2Pix-Zero (Parmar et al., SIGGRAPH'23) through diffusers' ``StableDiffusionPix2PixZeroPipeline``.

The pipeline is built from the bound :class:`~oig.models.SDModels` components (no second load),
with DDIM and DDIM-inverse schedulers made from the model's scheduler config and no captioner
(``caption_generator``/``caption_processor`` = None: the dataset's source prompt is the caption).
Per sample:

1. ``invert``: DDIM inversion of the source latent with the source prompt (CFG
   ``invert_guidance`` = 1) and the noise regularisation on (``lambda_auto_corr`` = 20,
   ``lambda_kl`` = 20, ``num_reg_steps`` = 5, ``num_auto_corr_rolls`` = 5; the auto-correlation
   roll offsets are drawn from the seeded generator);
2. edit direction: ``construct_direction`` = mean text embedding of the target sentences minus
   that of the source sentences, each from ``get_embeds``. By default the sentences are the
   sample's single source and target prompt (as PIE-Bench runs it); with ``source_sentences`` /
   ``target_sentences`` (text files, one sentence per line, as the paper's ~1000 generated
   sentences per concept) the same two files serve every sample;
3. ``__call__``: a reference pass with the caption records the cross-attention maps, then the
   edit pass with caption + direction takes, at every step, an SGD step of size ``xa_guidance``
   (``cross_attention_guidance_amount``) on x_t towards those maps; CFG ``guidance`` = 5 with
   the caption as negative prompt (``negative: source``).

The pipeline swaps the U-Net's attention processors and turns on gradients of its
cross-attention modules (``prepare_unet``). The U-Net is shared with every other editor bound
to the same models, so the wrapper restores the original processors and ``requires_grad``
flags and drops the accumulated parameter gradients after each pipeline call.

As for DiffEdit, the latent comes from the shared encoder (``encode``), not the pipeline's
sampled VAE encoding, and each phase gets a fresh CPU generator seeded with ``req.seed``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from oig.diffusion import Timer
from oig.editor import Editor
from oig.registry import register_editor
from oig.types import EditRequest, EditResult

from .diffedit import TESTED_DIFFUSERS, diffusers_pipeline, seeded

log = logging.getLogger(__name__)

PIX2PIX_ZERO_AVAILABILITY = (
    "StableDiffusionPix2PixZeroPipeline was deprecated in diffusers v0.25.0 (moved to "
    "diffusers/pipelines/deprecated, docs removed) but is still importable from `diffusers` up to at least "
    f"{TESTED_DIFFUSERS}, the version this wrapper is tested with"
)


def read_sentences(path: str | Path, what: str) -> list[str]:
    """One sentence per line; blank lines are skipped. Errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pix2pix_zero {what}: {p}: file not found")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise ValueError(f"pix2pix_zero {what}: {p}: not a UTF-8 text file ({e})") from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"pix2pix_zero {what}: {p}: no sentences (expected one sentence per line)")
    return lines


@contextmanager
def restored_unet(unet: torch.nn.Module):
    """Undo ``prepare_unet``: restore attention processors and ``requires_grad``; drop gradients."""
    procs = dict(unet.attn_processors)
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    try:
        yield
    finally:
        unet.set_attn_processor(procs)
        for p, f in flags:
            p.requires_grad_(f)
            p.grad = None


@register_editor("pix2pix_zero")
class Pix2PixZero(Editor):
    """Pix2Pix-Zero with the authors' defaults (CFG 5 against the caption, cross-attention
    guidance 0.1, regularised inversion, 50 steps)."""

    def __init__(
        self,
        steps: int = 50,
        guidance: float = 5.0,
        negative: str = "source",
        xa_guidance: float = 0.1,
        invert_guidance: float = 1.0,
        lambda_auto_corr: float = 20.0,
        lambda_kl: float = 20.0,
        num_reg_steps: int = 5,
        num_auto_corr_rolls: int = 5,
        source_sentences: str | None = None,
        target_sentences: str | None = None,
        resize_mode: str = "keep_aspect",
        encode: str = "mean",
    ):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        if (source_sentences is None) != (target_sentences is None):
            raise ValueError("pix2pix_zero: give both source_sentences and target_sentences, or neither "
                             f"(got source_sentences={source_sentences!r}, target_sentences={target_sentences!r})")
        if num_reg_steps < 0 or num_auto_corr_rolls < 0:
            raise ValueError("pix2pix_zero num_reg_steps and num_auto_corr_rolls must be >= 0")
        self.xa_guidance = xa_guidance
        self.invert_guidance = invert_guidance
        self.lambda_auto_corr = lambda_auto_corr
        self.lambda_kl = lambda_kl
        self.num_reg_steps = num_reg_steps
        self.num_auto_corr_rolls = num_auto_corr_rolls
        self.source_sentences = source_sentences
        self.target_sentences = target_sentences
        self._sentences = None
        if source_sentences is not None:
            self._sentences = (read_sentences(source_sentences, "source_sentences"),
                               read_sentences(target_sentences, "target_sentences"))
        self._file_embeds = None
        self._pipeline_cls = diffusers_pipeline("StableDiffusionPix2PixZeroPipeline", "pix2pix_zero",
                                                PIX2PIX_ZERO_AVAILABILITY)
        self.pipe = None

    def bind(self, models, cache=None, progress: bool = False) -> Pix2PixZero:
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        super().bind(models, cache, progress)
        self.pipe = self._pipeline_cls(
            vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
            scheduler=DDIMScheduler.from_config(models.scheduler.config),
            inverse_scheduler=DDIMInverseScheduler.from_config(models.scheduler.config),
            caption_generator=None, caption_processor=None,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        self._file_embeds = None
        return self

    def direction_embeds(self, req: EditRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) mean sentence embeddings, each (1, tokens, dim), for ``construct_direction``."""
        if self._sentences is None:
            return self.pipe.get_embeds([req.source_prompt]), self.pipe.get_embeds([req.target_prompt])
        if self._file_embeds is None:
            self._file_embeds = (self.pipe.get_embeds(self._sentences[0]), self.pipe.get_embeds(self._sentences[1]))
        return self._file_embeds

    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        pipe = self.pipe
        w, h = src.size
        with timer("encode"):
            z0 = self.core.encode_image(src, req.seed)
        with timer("inversion"), restored_unet(pipe.unet):
            xT = pipe.invert(
                prompt=req.source_prompt, image=z0, num_inference_steps=self.steps,
                guidance_scale=self.invert_guidance, generator=seeded(req.seed),
                cross_attention_guidance_amount=self.xa_guidance, lambda_auto_corr=self.lambda_auto_corr,
                lambda_kl=self.lambda_kl, num_reg_steps=self.num_reg_steps,
                num_auto_corr_rolls=self.num_auto_corr_rolls, output_type="latent",
            ).latents
            self.check_finite(xT, "inversion")
        with timer("sampling"), restored_unet(pipe.unet):
            src_emb, tgt_emb = self.direction_embeds(req)
            out = pipe(
                prompt=req.source_prompt, source_embeds=src_emb, target_embeds=tgt_emb, height=h, width=w,
                num_inference_steps=self.steps, guidance_scale=self.guidance, negative_prompt=self.negative_text(req),
                generator=seeded(req.seed), latents=xT, cross_attention_guidance_amount=self.xa_guidance,
            ).images[0]
        if out.size != src.size:
            raise RuntimeError(f"pix2pix_zero returned {out.size}, expected the source size {src.size}")
        return EditResult(image=out, source=src)
