"""How strongly OIG's guidance moves the latent on a given model: the scale behind λ1 / λ2.

For each guided step the script records the DDIM displacement ``|x_{t-1} - x_t|`` (what sampling
alone would do), the guidance displacement ``|η·∇L|`` of each term (λ2·L_struct and λ1·L_clip,
computed separately at the same point) and the structural term's per-layer feature MSE, and prints
their medians over steps and samples. The paper's λ values were tuned on SD v1.4, where they give
a guidance displacement of some fraction of the DDIM step; on another model the same λ can be
orders of magnitude weaker or stronger, which is why the toy model needs its own λ2.

    python -m experiments.oig_scale                       # toy model, 8 toy samples, 20 steps
    python -m experiments.oig_scale --model /w/sd14 --dataset folder --path DIR   # another model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics

import torch

log = logging.getLogger("oig.scale")


def measure(editor, requests) -> dict:
    """Run ``editor`` (an OIG instance, bound) on ``requests`` and collect the per-step scales."""
    rec = {"ddim": [], "struct": [], "clip": [], "feat_mse": [], "ratio_struct": [], "ratio_clip": []}
    orig_step = editor._guided_step

    def step(x, k, t, d, emb2, S, P, e_src, e_tgt, w, fh, extra_loss=None):
        c = editor.core
        with torch.no_grad():
            eps = c.eps(x, t, emb2[1:], emb2[:1], editor.guidance)
            fh.pop()
            x_plain, _ = c.ddim_step(x, eps, t, t - d)
        ddim = float((x_plain - x).norm())
        zero = torch.zeros_like(w.lambda1)
        for term in ("struct", "clip"):
            # one term alone (the other's weight and switch off), then the same with step size 0
            alone = dataclasses.replace(w, **({"lambda2": zero, "struct_on": zero.bool()} if term == "clip" else
                                              {"lambda1": zero, "clip_on": zero.bool()}))
            if not editor._has_guidance(None, alone, alone.guided[k]):
                continue
            x_g, _, _, _ = orig_step(x, k, t, d, emb2, S, P, e_src, e_tgt, alone, fh)
            x_n, _, _, _ = orig_step(x, k, t, d, emb2, S, P, e_src, e_tgt,
                                     dataclasses.replace(alone, eta=torch.zeros_like(w.eta)), fh)
            g = float((x_g - x_n).norm())
            rec[term].append(g)
            rec[f"ratio_{term}"].append(g / max(ddim, 1e-12))
        rec["ddim"].append(ddim)
        out = orig_step(x, k, t, d, emb2, S, P, e_src, e_tgt, w, fh, extra_loss)
        if S is not None and editor.layer_names:
            with torch.no_grad():
                F_now = out[1]
                rec["feat_mse"].append(statistics.fmean(
                    float(torch.nn.functional.mse_loss(F_now[n], S[n].to(F_now[n]).expand_as(F_now[n])))
                    for n in editor.layer_names))
        return out

    editor._guided_step = step
    try:
        for r in requests:
            editor(r)
    finally:
        del editor._guided_step
    return {k: statistics.median(v) if v else None for k, v in rec.items()} | {
        "layers": len(editor.layer_names), "steps": editor.steps, "lambda1": editor.lambda1,
        "lambda2": editor.lambda2}


def main(argv=None):
    from oig.data.toyworld import ToyWorld
    from oig.models import load_sd
    from oig.oig_editor import OIG
    from oig.types import EditRequest

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--clip-model", default="toy")
    p.add_argument("--clip-pretrained", default=None)
    p.add_argument("--n-per-task", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lambda1", type=float, default=0.1)
    p.add_argument("--lambda2", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=2_000_000, help="toy dataset seed (validation split)")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    models = load_sd(a.model, device="cpu", dtype="fp32")
    ed = OIG(lambda1=a.lambda1, lambda2=a.lambda2, steps=a.steps, clip_model=a.clip_model,
             clip_pretrained=a.clip_pretrained).bind(models)
    reqs = [EditRequest.from_sample(s, 0) for s in ToyWorld(n_per_task=a.n_per_task, seed=a.seed)]
    res = measure(ed, reqs)
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
