"""The linear algebra behind two findings of docs/RESULTS.md on SmolLM2: why EMMET with μ = 0 degrades at
large batches (the conditioning of D = Kᵀ(λC)⁻¹K, arXiv 2405.00664 Eq. 7), and how much room AlphaEdit's
null-space projection leaves the edited keys, for the first B facts of the study.

    python -m bench.conditioning --sizes 16,64,256 --layer 0

EMMET meets every edit exactly: Δ = R D⁻¹ Kᵀ(λC)⁻¹, so ‖Δ‖ grows like 1/λ_min(D). Two keys that are
nearly parallel in the C⁻¹ metric but ask for different values force a large update. For each B this
prints D's condition number and the eigenvalues of its scale-free form Dn = diag(D)^-1/2 D diag(D)^-1/2
(the C⁻¹-cosines of the keys), the number of key pairs with cosine above 0.9/0.95/0.99, and how many of
those pairs share the subject's last token (the token whose MLP input is the key). AlphaEdit
(arXiv 2410.02355) moves only the part P k of each key inside C's null space (eigenvalues below
``--threshold``): printed are that space's dimension and the mean of ‖P k‖/‖k‖ over the edited keys.
The statistics come from the study's store (``.cache/stats``; computed once if missing), the keys from
the same facts, layer and templates as the sweep; the model is not edited. CPU, about a minute for 256
facts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch


def trial_config(layer: int, n: int, facts: str, store: str, max_tokens: int) -> dict[str, Any]:
    """The batch study's settings (sweep/configs/smollm2-batch.yaml) for EMMET at ``layer``, n facts."""
    return {
        "algorithm": "emmet",
        "hparams": "smollm2-135m",
        "layers": [layer],
        "n_edits": n,
        "batch_size": n,
        "mode": "batch",
        "model": {"device": "cpu"},
        "dataset": {"source": facts, "unique_subjects_seed": 37},
        "stats": {"corpus": "embedded:wiki", "max_tokens": max_tokens, "store": store},
    }


def conditioning(keys: torch.Tensor, cov: torch.Tensor, last_tokens: Sequence[int]) -> dict[str, Any]:
    """Conditioning of D = Kᵀ C⁻¹ K for keys [d_key, n] and C [d_key, d_key] (float64 inside).

    λ (``mom2_update_weight``) only scales D, so it is left out; the cosines and condition numbers do
    not depend on it.
    """
    k = keys.double()
    d = k.T @ torch.linalg.solve(cov.double(), k)
    d = (d + d.T) / 2
    diag = d.diagonal().clamp_min(1e-300)
    dn = d / torch.sqrt(diag[:, None] * diag[None, :])
    ev = torch.linalg.eigvalsh(dn)
    n = d.shape[0]
    iu = torch.triu_indices(n, n, 1)
    cos = dn[iu[0], iu[1]]
    same = torch.tensor([last_tokens[i] == last_tokens[j] for i, j in zip(iu[0].tolist(), iu[1].tolist())])
    out: dict[str, Any] = {
        "n": n,
        "cond_D": float(torch.linalg.cond(d)),
        "mean_diag_D": float(diag.mean()),
        "min_eig_Dn": float(ev[0]),
        "max_eig_Dn": float(ev[-1]),
        "max_cos": float(cos.max()) if len(cos) else None,
    }
    for t in (0.9, 0.95, 0.99):
        hit = cos > t
        out[f"pairs_cos>{t}"] = int(hit.sum())
        out[f"pairs_cos>{t}_same_last_token"] = int((hit & same).sum())
    out["pairs_same_last_token"] = int(same.sum())
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Print one JSON line per batch size and return the rows."""
    ap = argparse.ArgumentParser(prog="python -m bench.conditioning", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16,64,256", help="batch sizes: the first B facts (default: %(default)s)")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--facts", default="../shared/data/counterfact/counterfact-edit.json")
    ap.add_argument("--store", default=".cache/stats", help="statistics store of the sweeps")
    ap.add_argument("--stats-tokens", type=int, default=50000)
    ap.add_argument("--threshold", type=float, default=2e-2, help="AlphaEdit's nullspace_threshold")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sizes = sorted({int(s) for s in args.sizes.split(",")})

    from editors import load_model, spec_for
    from editors.requests import encode
    from editors.solvers import null_space_projector
    from editors.stats import StatsStore, get_or_compute
    from editors.targets import compute_keys
    from editors.templates import context_templates
    from sweep.config import parse_config
    from sweep.evals.data import load_counterfact, select
    from sweep.shared.compute import compute_stats
    from sweep.shared.keys import model_identity, stats_keys

    cfg = parse_config(trial_config(args.layer, sizes[-1], args.facts, args.store, args.stats_tokens))
    hp = cfg.edit_hparams
    records = select(load_counterfact(args.facts), n=sizes[-1], unique_subjects_seed=37)
    model, tok = load_model(None, device="cpu")
    spec = spec_for(model)
    keys_by_layer = stats_keys(cfg, [args.layer], model_identity(cfg.model))
    got = get_or_compute(StatsStore(args.store), keys_by_layer, lambda ls: compute_stats(cfg, model, tok, ls))
    cov = got[args.layer].mom2
    templates = context_templates(model, tok, hp.context_templates, hp.template_seed)
    requests = [r.request() for r in records]
    keys = compute_keys(model, tok, spec, args.layer, requests, templates)  # [d_key, n]
    last = [encode(tok, " " + r.subject)[0][-1] for r in records]
    proj = null_space_projector(cov.double(), args.threshold)
    null_dims = round(float(proj.trace()))
    inside = (proj @ keys.double()).norm(dim=0) / keys.double().norm(dim=0)  # [n]
    rows = []
    for b in sizes:
        row = {"layer": args.layer, **conditioning(keys[:, :b], cov, last[:b])}
        row["alphaedit_null_dims"] = f"{null_dims}/{cov.shape[0]}"
        row["alphaedit_mean_Pk_over_k"] = float(inside[:b].mean())
        rows.append(row)
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
