"""Pix2Pix-Zero (Parmar et al., SIGGRAPH'23): regularised DDIM inversion, an edit direction in
text-embedding space, cross-attention guidance.

The edit pass (and the ``diffusers`` inversion) is diffusers' ``StableDiffusionPix2PixZeroPipeline``,
built from the bound :class:`~oig.models.SDModels` components (no second load), with DDIM and
DDIM-inverse schedulers made from the model's scheduler config with ``clip_sample=False`` and
``set_alpha_to_one=False`` forced (:data:`oig.models.SD_SCHEDULER_SETTINGS`, as SD and the
reference codes; a config that says otherwise is overridden with a warning), and no captioner
inside the pipeline. Per sample:

0. **caption** (``caption``): ``dataset`` uses the sample's source prompt; ``blip`` captions the
   prepared source image with BLIP (:class:`oig.data.prompts.Captioner`, ``captioner``: a hub id,
   a local folder or a mapping of Captioner arguments; null = its default
   ``Salesforce/blip-image-captioning-base``), as the official ``inversion.py`` and PIE-Bench's
   ``run_editing_pix2pix_zero.py`` do. The caption is the inversion prompt, the prompt of the
   reference pass, the edit base and (``negative: source``) the negative prompt; with ``blip`` it
   is reported in ``EditResult.info["caption"]``.
1. **inversion** (``inversion``) of the source latent with the caption (CFG ``invert_guidance``,
   against ``""`` when > 1), each noise prediction regularised towards white noise:
   ``num_reg_steps`` times, ``num_auto_corr_rolls`` gradient steps of size ``lambda_auto_corr /
   num_auto_corr_rolls`` on the auto-correlation loss (per channel and per 2x2-average-pooled level
   down to 8 px, squared means of the noise times itself rolled by a random amount along H and
   along W), then one step of size ``lambda_kl`` on ``var + mean^2 - 1 - log(var + 1e-7)``.
   Every roll is drawn from a CPU ``torch.Generator`` seeded with ``req.seed``.

   * ``diffusers``: ``pipe.invert`` (``DDIMInverseScheduler``: ``steps`` U-Net calls at
     t = 1, 21, ..., 981, each moving from abar(t - 20) to abar(t); rolls in [0, H//2)).
   * ``official``: the official ``src/utils/ddim_inv.py`` loop, written here on the shared core:
     ``steps - 2`` U-Net calls over ``timesteps.flip(0)[1:-1]`` (t = 21, ..., 961 for 50 steps),
     each moving from abar(t - 1) to abar(t + 19) (its ``DDIMInverseScheduler.step(reverse=True)``),
     landing at abar(980); rolls in [1, H//2) (``randrange(1, H//2)``).
   * ``pie_bench``: PIE-Bench's patched copy (``models/pix2pix_zero/ddim_inv.py``,
     ``scheduler.py``): all ``steps`` timesteps t = 1, ..., 981 with the same abar(t - 1) ->
     abar(t + 19) step, the last one (t + 20 > 1000) moving to abar(999); rolls in [0, H//2)
     (``randrange(H//2)``).

   Both own loops keep the latent, the regularisation and the step (with the scheduler's fp32
   abar, as the references) in fp32 (the U-Net runs in the model's dtype), and need a latent side
   of at least 4 (``official``) or 2 (``pie_bench``) px for the range the roll is drawn from.
2. **edit direction** (``directions``) = mean text embedding of the target concept's sentences
   minus that of the source concept's (``construct_direction``), added to the caption's embedding:

   * ``prompts``: one sentence each, the sample's source and target prompts (as PIE-Bench);
   * ``files``: two global sentence files, ``source_sentences`` / ``target_sentences`` (one
     sentence per line), for every sample; giving both files selects ``files``;
   * ``sentences``: per-concept sentence files ``<sentences_dir>/<concept>.txt`` (the paper's
     ~1000 generated sentences per concept; ``sentences_dir: toy`` is the shipped
     ``oig/toy/sentences``);
   * ``embeddings``: per-concept precomputed mean embeddings ``<embeddings_dir>/<concept>.pt`` in
     the official format (pix2pix-zero's ``assets/embeddings_sd_1.4/{cat,dog,horse,zebra}.pt``:
     a tensor (N, tokens, dim), N = 1 for the shipped mean; used as stored, dtype included, so the
     direction is the official ``construct_direction``'s ``(b.mean(0) - a.mean(0)).unsqueeze(0)``).

   The concepts of a sample are ``req.edit_words()`` (``source_word`` / ``target_word`` of its
   metadata, or PIE-Bench's ``blended_word``); see :func:`concept_stem` for the file name of a
   word. A sample without edit words, or a missing or malformed concept file, is an
   :class:`~oig.editor.EditError` naming the file and the concept (an error row; the run goes on).
   Each concept is encoded (or loaded) once per bound editor and kept in memory.
3. **edit** (``pipe.__call__`` with ``latents`` = the inverted latent): a reference pass with the
   caption records the cross-attention maps, then the edit pass with caption + direction takes,
   at every step, an SGD step of size ``xa_guidance`` (``cross_attention_guidance_amount``) on x_t
   towards those maps; CFG ``guidance`` with the ``negative`` prompt.

The pipeline swaps the U-Net's attention processors and turns on gradients of its
cross-attention modules (``prepare_unet``). The U-Net is shared with every other editor bound
to the same models, so the wrapper restores the original processors and ``requires_grad``
flags and drops the accumulated parameter gradients after each pipeline call.

As for DiffEdit, the latent comes from the shared encoder (``encode``), not the pipeline's
sampled VAE encoding, and each phase gets a fresh CPU generator seeded with ``req.seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import oig.toy
from oig.diffusion import Timer
from oig.editor import EditError, Editor
from oig.registry import register_editor
from oig.types import EditRequest, EditResult

from .diffedit import TESTED_DIFFUSERS, diffusers_pipeline, seeded

log = logging.getLogger(__name__)

PIX2PIX_ZERO_AVAILABILITY = (
    "StableDiffusionPix2PixZeroPipeline was deprecated in diffusers v0.25.0 (moved to "
    "diffusers/pipelines/deprecated, docs removed) but is still importable from `diffusers` up to at least "
    f"{TESTED_DIFFUSERS}, the version this wrapper is tested with"
)
DIRECTIONS = ("prompts", "files", "sentences", "embeddings")
INVERSIONS = ("diffusers", "official", "pie_bench")
CAPTIONS = ("dataset", "blip")
#: file stem of the empty word (the toy ``appearance_change`` adds "striped" to nothing)
EMPTY_CONCEPT = "_empty"
#: ``sentences_dir: toy``: the sentence sets shipped for the toy world's concepts
TOY_SENTENCES_DIR = Path(oig.toy.__file__).resolve().parent / "sentences"


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


def concept_stem(word: str) -> str:
    """The file stem of a concept: lower case, runs of whitespace -> ``_`` ("cat wearing glasses" ->
    ``cat_wearing_glasses``, "Tree in fall" -> ``tree_in_fall``); the empty word -> :data:`EMPTY_CONCEPT`."""
    stem = "_".join((word or "").lower().split())
    if not stem:
        return EMPTY_CONCEPT
    if "/" in stem or "\\" in stem or stem.startswith("."):
        raise EditError(f"pix2pix_zero: the concept {word!r} cannot name a file (path separator or leading dot)")
    return stem


def load_embedding_file(path: Path, concept: str, tokens: int, dim: int) -> torch.Tensor:
    """An official-format concept embedding: a tensor (N, tokens, dim), loaded on the CPU as stored."""
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a damaged or foreign file
        raise EditError(f"pix2pix_zero embeddings: {path} (concept {concept!r}): not a readable torch file "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(t, torch.Tensor):
        raise EditError(f"pix2pix_zero embeddings: {path} (concept {concept!r}): holds a {type(t).__name__}, "
                        f"expected a tensor (N, {tokens}, {dim}) as pix2pix-zero's make_edit_direction.py saves")
    if t.ndim != 3 or tuple(t.shape[1:]) != (tokens, dim) or t.shape[0] < 1 or not t.is_floating_point():
        raise EditError(f"pix2pix_zero embeddings: {path} (concept {concept!r}): tensor {tuple(t.shape)} "
                        f"{t.dtype}, expected a float tensor (N, {tokens}, {dim}): this model's text embeddings")
    if not torch.isfinite(t).all():
        raise EditError(f"pix2pix_zero embeddings: {path} (concept {concept!r}): non-finite values")
    return t


# ------------------------------------------------------------------ noise regularisation
class RollDraw:
    """Random roll amounts of the auto-correlation loss from a seeded ``torch.Generator``: an integer in
    ``[low, side // 2)``; ``low`` = 1 as the official ``randrange(1, H//2)``, 0 as PIE-Bench's
    ``randrange(H//2)`` and diffusers' ``torch.randint(H//2)``."""

    def __init__(self, generator: torch.Generator, low: int):
        self.generator = generator
        self.low = int(low)

    def __call__(self, side: int) -> int:
        high = side // 2
        if high <= self.low:
            raise EditError(f"pix2pix_zero inversion: a latent side of {side} px is too small for the "
                            f"auto-correlation regulariser (its roll is drawn from [{self.low}, {side}//2))")
        return int(torch.randint(self.low, high, (1,), generator=self.generator).item())


def auto_corr_loss(noise: torch.Tensor, draw: Callable[[int], int]) -> torch.Tensor:
    """pix2pix-zero's auto-correlation loss of a (1, C, H, W) noise map: for each channel, at each level
    of a 2x2 average-pooling pyramid (down to a side of 8), one random roll k and the squared means of
    ``n * roll(n, k)`` along H and along W."""
    if noise.shape[0] != 1:
        raise ValueError(f"auto_corr_loss takes one noise map (1, C, H, W), got {tuple(noise.shape)}")
    loss = noise.new_zeros(())
    for c in range(noise.shape[1]):
        n = noise[:, c : c + 1]
        while True:
            k = draw(n.shape[2])
            loss = loss + (n * torch.roll(n, shifts=k, dims=2)).mean() ** 2
            loss = loss + (n * torch.roll(n, shifts=k, dims=3)).mean() ** 2
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, kernel_size=2)
    return loss


def kl_divergence(noise: torch.Tensor) -> torch.Tensor:
    """KL of N(mean, var) of all values (unbiased variance) to N(0, 1), up to constants: var + mean^2 - 1 - log var."""
    mu, var = noise.mean(), noise.var()
    return var + mu**2 - 1 - torch.log(var + 1e-7)


def regularise_noise(eps: torch.Tensor, lambda_auto_corr: float, lambda_kl: float, num_reg_steps: int,
                     num_auto_corr_rolls: int, draw: Callable[[int], int]) -> torch.Tensor:
    """Gradient steps pulling a noise prediction towards white noise (see the module docstring)."""
    with torch.enable_grad():
        for _ in range(num_reg_steps):
            if lambda_auto_corr > 0:
                for _ in range(num_auto_corr_rolls):
                    v = eps.detach().clone().requires_grad_(True)
                    (g,) = torch.autograd.grad(auto_corr_loss(v, draw), v)
                    eps = eps - lambda_auto_corr * (g / num_auto_corr_rolls)
            if lambda_kl > 0:
                v = eps.detach().clone().requires_grad_(True)
                (g,) = torch.autograd.grad(kl_divergence(v), v)
                eps = eps - lambda_kl * g
            eps = eps.detach()
    return eps


def inversion_schedule(kind: str, steps: int, num_train_timesteps: int,
                       steps_offset: int) -> list[tuple[int, int, int]]:
    """``(t, i_from, i_to)`` per U-Net call of the ``official`` / ``pie_bench`` inversion: the U-Net
    runs at ``t`` and the step moves the latent from ``abar[i_from]`` to ``abar[i_to]``.

    The timesteps are the official scheduler's ``arange(steps) * (T // steps) + steps_offset``,
    ascending (``timesteps.flip(0)``); ``official`` drops the first and the last. Both step from
    ``abar[t - 1]`` to ``abar[t + T // steps - 1]``; ``pie_bench`` moves to ``abar[T - 1]`` when
    ``t + T // steps > T``. (``abar[-1]``, from ``t = 0`` with ``steps_offset = 0``, is
    ``abar[T - 1]`` as the references' tensor indexing gives.)
    """
    ratio = num_train_timesteps // steps
    ts = [i * ratio + steps_offset for i in range(steps)]
    if kind == "official":
        ts = ts[1:-1]
    elif kind != "pie_bench":
        raise ValueError(f"unknown inversion schedule {kind!r}; use official or pie_bench")
    out = []
    for t in ts:
        nxt = t + ratio
        to = nxt - 1 if (kind == "official" or nxt <= num_train_timesteps) else num_train_timesteps - 1
        out.append((t, t - 1, to))
    return out


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
    """Pix2Pix-Zero: CFG 5 against the caption, cross-attention guidance 0.1, regularised inversion,
    50 steps. The defaults run offline on any dataset (directions from the sample's prompts, the
    dataset's caption, diffusers' inversion); see the module docstring for the paper's settings."""

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
        inversion: str = "diffusers",
        directions: str = "prompts",
        source_sentences: str | None = None,
        target_sentences: str | None = None,
        sentences_dir: str | None = None,
        embeddings_dir: str | None = None,
        caption: str = "dataset",
        captioner=None,
        resize_mode: str = "keep_aspect",
        encode: str = "mean",
    ):
        super().__init__(steps, guidance, negative, resize_mode, encode)
        if (source_sentences is None) != (target_sentences is None):
            raise ValueError("pix2pix_zero: give both source_sentences and target_sentences, or neither "
                             f"(got source_sentences={source_sentences!r}, target_sentences={target_sentences!r})")
        if num_reg_steps < 0 or num_auto_corr_rolls < 0:
            raise ValueError("pix2pix_zero num_reg_steps and num_auto_corr_rolls must be >= 0")
        if inversion not in INVERSIONS:
            raise ValueError(f"pix2pix_zero inversion={inversion!r}: use one of {', '.join(INVERSIONS)}")
        if inversion == "official" and steps < 3:
            raise ValueError(f"pix2pix_zero inversion=official runs steps - 2 U-Net calls; steps={steps} leaves none")
        if directions not in DIRECTIONS:
            raise ValueError(f"pix2pix_zero directions={directions!r}: use one of {', '.join(DIRECTIONS)}")
        if source_sentences is not None:
            if directions == "prompts":
                directions = "files"
            elif directions != "files":
                raise ValueError(f"pix2pix_zero: source_sentences/target_sentences are the directions=files setting; "
                                 f"directions={directions!r} does not read them")
        elif directions == "files":
            raise ValueError("pix2pix_zero directions=files needs source_sentences and target_sentences")
        if caption not in CAPTIONS:
            raise ValueError(f"pix2pix_zero caption={caption!r}: use one of {', '.join(CAPTIONS)}")
        if captioner is not None and caption != "blip":
            raise ValueError("pix2pix_zero: captioner is only used with caption=blip "
                             f"(caption={caption!r}, captioner={captioner!r})")
        self.xa_guidance = xa_guidance
        self.invert_guidance = invert_guidance
        self.lambda_auto_corr = lambda_auto_corr
        self.lambda_kl = lambda_kl
        self.num_reg_steps = num_reg_steps
        self.num_auto_corr_rolls = num_auto_corr_rolls
        self.inversion = inversion
        self.directions = directions
        self.source_sentences = source_sentences
        self.target_sentences = target_sentences
        self.sentences_dir = sentences_dir
        self.embeddings_dir = embeddings_dir
        self.caption = caption
        self.captioner = captioner
        self._sentences = None
        if directions == "files":
            self._sentences = (read_sentences(source_sentences, "source_sentences"),
                               read_sentences(target_sentences, "target_sentences"))
        self._concept_dir = None
        if directions in ("sentences", "embeddings"):
            key = "sentences_dir" if directions == "sentences" else "embeddings_dir"
            d = sentences_dir if directions == "sentences" else embeddings_dir
            if d is None:
                raise ValueError(f"pix2pix_zero directions={directions} needs {key} (a folder of <concept>."
                                 f"{'txt' if directions == 'sentences' else 'pt'} files)")
            p = TOY_SENTENCES_DIR if (directions == "sentences" and str(d) == "toy") else Path(d).expanduser()
            if not p.is_dir():
                raise ValueError(f"pix2pix_zero {key}={d!r}: {p}: folder not found")
            self._concept_dir = p
        self._captioner = None
        if caption == "blip":
            from oig.data.prompts import Captioner, make_captioner

            self._captioner = Captioner() if captioner is None else make_captioner(captioner)
        self._file_embeds = None
        self._concepts: dict[str, torch.Tensor] = {}
        self._pipeline_cls = diffusers_pipeline("StableDiffusionPix2PixZeroPipeline", "pix2pix_zero",
                                                PIX2PIX_ZERO_AVAILABILITY)
        self.pipe = None

    # -------------------------------------------------------------- setup
    def bind(self, models, cache=None, progress: bool = False) -> Pix2PixZero:
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        from oig.models import SD_SCHEDULER_SETTINGS

        super().bind(models, cache, progress)
        # diffusers' from_config drops the keys listed in "_use_default_values" (those the loaded config lacked)
        # and re-defaults them, so that list must go before the overrides
        config = {k: v for k, v in models.scheduler.config.items() if k != "_use_default_values"}
        wrong = {k: config.get(k) for k, v in SD_SCHEDULER_SETTINGS.items() if config.get(k) != v}
        if wrong:
            log.warning("pix2pix_zero: the model's scheduler config has %s; its DDIM and DDIM-inverse schedulers "
                        "use %s", wrong, SD_SCHEDULER_SETTINGS)
        config.update(SD_SCHEDULER_SETTINGS)
        self.pipe = self._pipeline_cls(
            vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
            scheduler=DDIMScheduler.from_config(config),
            inverse_scheduler=DDIMInverseScheduler.from_config(config),
            caption_generator=None, caption_processor=None,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        self._file_embeds = None
        self._concepts = {}
        if self._captioner is not None and hasattr(self._captioner, "load"):
            self._captioner.load()  # fail at bind, not on every sample, when BLIP is not available
        return self

    # -------------------------------------------------------------- caption
    def caption_text(self, req: EditRequest, src) -> str:
        """The caption: the sample's source prompt (``dataset``) or BLIP's caption of the prepared source."""
        if self.caption == "dataset":
            return req.source_prompt
        text = self._captioner(src)
        if not isinstance(text, str) or not text.strip():
            raise EditError(f"pix2pix_zero caption=blip: the captioner returned an empty caption ({text!r})")
        return text.strip()

    # -------------------------------------------------------------- directions
    def concept_embeds(self, word: str) -> torch.Tensor:
        """Embeddings (N, tokens, dim) of one concept from ``<sentences_dir>/<concept>.txt`` (mean over its
        sentences, N = 1) or ``<embeddings_dir>/<concept>.pt`` (as stored); memoised per bound editor."""
        stem = concept_stem(word)
        if stem in self._concepts:
            return self._concepts[stem]
        ext = ".txt" if self.directions == "sentences" else ".pt"
        path = self._concept_dir / f"{stem}{ext}"
        if not path.is_file():
            raise EditError(f"pix2pix_zero directions={self.directions}: no file {path} for the concept {word!r} "
                            f"(expected <{'sentences' if ext == '.txt' else 'embeddings'}_dir>/<concept>{ext}; "
                            f"concept file names: lower case, spaces -> _, the empty word -> {EMPTY_CONCEPT})")
        if ext == ".txt":
            try:
                lines = read_sentences(path, f"concept {word!r}")
            except ValueError as e:
                raise EditError(str(e)) from None
            emb = self.pipe.get_embeds(lines)
            log.info("pix2pix_zero: concept %r: mean of %d sentence embeddings from %s", word, len(lines), path)
        else:
            tok = self.models.tokenizer.model_max_length
            dim = int(self.models.text_encoder.config.hidden_size)
            emb = load_embedding_file(path, word, tok, dim).to(self.models.device)
            log.info("pix2pix_zero: concept %r: embeddings %s %s from %s", word, tuple(emb.shape), emb.dtype, path)
        self._concepts[stem] = emb
        return emb

    def direction_embeds(self, req: EditRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) sentence embeddings, each (N, tokens, dim), for ``construct_direction``."""
        if self.directions == "prompts":
            return self.pipe.get_embeds([req.source_prompt]), self.pipe.get_embeds([req.target_prompt])
        if self.directions == "files":
            if self._file_embeds is None:
                self._file_embeds = (self.pipe.get_embeds(self._sentences[0]), self.pipe.get_embeds(self._sentences[1]))
            return self._file_embeds
        words = req.edit_words()
        if words is None:
            raise EditError(f"pix2pix_zero directions={self.directions}: sample {req.id or '<unnamed>'} has no edit "
                            f"words (meta source_word/target_word or PIE-Bench's blended_word)")
        return self.concept_embeds(words[0]), self.concept_embeds(words[1])

    def edit_direction(self, req: EditRequest) -> torch.Tensor:
        """The direction (1, tokens, dim) added to the caption embedding (the pipeline's ``construct_direction``)."""
        return self.pipe.construct_direction(*self.direction_embeds(req))

    # -------------------------------------------------------------- inversion
    def invert_latent(self, z0: torch.Tensor, prompt: str, seed: int) -> torch.Tensor:
        """The inverted latent x_T of ``z0`` with ``prompt`` (see ``inversion``)."""
        if self.inversion == "diffusers":
            with restored_unet(self.pipe.unet):
                return self.pipe.invert(
                    prompt=prompt, image=z0, num_inference_steps=self.steps,
                    guidance_scale=self.invert_guidance, generator=seeded(seed),
                    cross_attention_guidance_amount=self.xa_guidance, lambda_auto_corr=self.lambda_auto_corr,
                    lambda_kl=self.lambda_kl, num_reg_steps=self.num_reg_steps,
                    num_auto_corr_rolls=self.num_auto_corr_rolls, output_type="latent",
                ).latents
        return self.regularised_inversion(z0, prompt, seed)

    def regularised_inversion(self, z0: torch.Tensor, prompt: str, seed: int) -> torch.Tensor:
        """The ``official`` / ``pie_bench`` inversion loop on the shared core (module docstring, item 1)."""
        core, m = self.core, self.models
        cond = core.encode_text([prompt])
        cfg = self.invert_guidance > 1.0  # the references' do_classifier_free_guidance
        neg = core.encode_text([""]) if cfg else None
        draw = RollDraw(seeded(seed), low=1 if self.inversion == "official" else 0)
        sched = inversion_schedule(self.inversion, self.steps, core.T,
                                   int(m.scheduler.config.get("steps_offset", 0) or 0))
        alphas = m.scheduler.alphas_cumprod.to(device=z0.device, dtype=torch.float32)
        x = z0.float()
        for t, i_from, i_to in tqdm(sched, desc="invert", disable=not core.progress, leave=False):
            with torch.no_grad():
                e = core.eps(x.to(m.dtype), t, cond, neg, self.invert_guidance if cfg else 1.0).float()
            e = regularise_noise(e, self.lambda_auto_corr, self.lambda_kl, self.num_reg_steps,
                                 self.num_auto_corr_rolls, draw)
            a_t, a_n = alphas[i_from], alphas[i_to]  # 0-d fp32 tensors, as the references' scheduler step
            x0 = (x - (1 - a_t) ** 0.5 * e) / a_t.sqrt()
            x = a_n.sqrt() * x0 + (1 - a_n).sqrt() * e
        return x.to(m.dtype)

    # -------------------------------------------------------------- edit
    def edit(self, req: EditRequest, src, timer: Timer) -> EditResult:
        pipe = self.pipe
        w, h = src.size
        info = {}
        with timer("caption"):
            caption = self.caption_text(req, src)
        if self.caption == "blip":
            info["caption"] = caption
        negative = caption if self.negative == "source" else self.negative_text(req)
        with timer("direction"):
            src_emb, tgt_emb = self.direction_embeds(req)
        if self.directions in ("sentences", "embeddings"):
            s, t = req.edit_words()
            info["direction"] = f"{concept_stem(s)}->{concept_stem(t)}"
        with timer("encode"):
            z0 = self.core.encode_image(src, req.seed)
        with timer("inversion"):
            xT = self.invert_latent(z0, caption, req.seed)
            self.check_finite(xT, "inversion")
        with timer("sampling"), restored_unet(pipe.unet):
            out = pipe(
                prompt=caption, source_embeds=src_emb, target_embeds=tgt_emb, height=h, width=w,
                num_inference_steps=self.steps, guidance_scale=self.guidance, negative_prompt=negative,
                generator=seeded(req.seed), latents=xT, cross_attention_guidance_amount=self.xa_guidance,
            ).images[0]
        if out.size != src.size:
            raise RuntimeError(f"pix2pix_zero returned {out.size}, expected the source size {src.size}")
        return EditResult(image=out, source=src, info=info)
