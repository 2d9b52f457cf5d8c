"""The shared work itself, on a loaded model: no Ray, no store, no claim.

What :mod:`sweep.shared.fulfil`'s backends run (in this process, or inside :mod:`sweep.shared.tasks`'s Ray tasks):
second moments of some layers in one pass over the corpus (or a part's raw sums), target values v* of batch-mode facts,
pre-edit scores of facts, and the unedited model's held-out perplexity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from editors import spec_for, traits
from editors.corpus import CorpusSpec, iter_texts
from editors.stats import MomentSums, SecondMoment, StreamSlice, collect_second_moments, second_moment_sums

if TYPE_CHECKING:
    from ..config import TrialConfig
    from ..evals.data import Record


def compute_stats(
    cfg: TrialConfig, model: Any, tok: Any, layers: Sequence[int], progress: bool = True
) -> dict[int, SecondMoment]:
    """The second moments of ``layers`` in one pass over the configured corpus."""
    return collect_second_moments(
        model, tok, spec_for(model), list(layers), **_pass(cfg), tolerance=cfg.stats.tolerance, progress=progress
    )


def compute_stats_part(
    cfg: TrialConfig, model: Any, tok: Any, layers: Sequence[int], part: StreamSlice, progress: bool = True
) -> dict[int, MomentSums]:
    """The raw sums Σ k kᵀ [d_key, d_key] and key count of ``part`` of the configured pass's stream
    (a pass split over workers; ``stats.tolerance`` is not applied: such a pass is not split)."""
    return second_moment_sums(model, tok, spec_for(model), list(layers), **_pass(cfg), part=part, progress=progress)


def _pass(cfg: TrialConfig) -> dict[str, Any]:
    """What every part of one statistics pass reads alike: the corpus's texts, the caps, the dtype."""
    s = cfg.stats
    return {
        "texts": iter_texts(CorpusSpec(s.corpus, max_texts=s.max_texts, sample_seed=s.sample_seed)),
        "max_tokens": s.max_tokens,
        "max_seq_len": s.max_seq_len,
        "batch_tokens": s.batch_tokens,
        "dtype": s.dtype,
    }


def compute_values(cfg: TrialConfig, model: Any, tok: Any, records: Sequence[Record]) -> torch.Tensor:
    """Batch-mode target values v* [n, d_model] float32 of ``records`` on the unedited model."""
    from editors.targets import optimize_values
    from editors.templates import TemplateCache, flat

    hp = cfg.edit_hparams
    tpl = TemplateCache().get(model, tok, hp.context_templates, hp.template_seed)
    v = optimize_values(
        model,
        tok,
        spec_for(model),
        hp.layers[-1],
        [r.request() for r in records],
        flat(tpl),
        hp,
        at=traits(cfg.algorithm).value_site,
        max_requests=hp.value_batch,
    )
    return v.values.float().cpu()


def compute_scores(cfg: TrialConfig, model: Any, tok: Any, records: Sequence[Record]) -> list[dict[str, Any]]:
    """The score fields (``RecordScores.fields()``) of ``records`` on the model as it is; under
    ``scoring.generated`` each row also holds ``gen_ref``, the model's neighbourhood generations (token
    ids per prompt) that an edited model's ``gen_ns`` is compared with (so its own ``gen_ns`` is 1)."""
    from ..evals.metrics import gen_settings, score_records

    gs = gen_settings(cfg.scoring)
    scores = score_records(model, tok, spec_for(model), records, batch_size=cfg.scoring.batch_size)
    rows: list[dict[str, Any]] = [s.fields() for s in scores]
    if gs is not None:
        from ..evals.metrics import generated_scores

        for row, g in zip(rows, generated_scores(model, tok, records, gs, None)):
            row.update(gen_es=g.gen_es, gen_ps=g.gen_ps, gen_ns=1.0, gen_ref=[list(ids) for ids in g.neighbour_ids])
    return rows


def compute_ppl(cfg: TrialConfig, model: Any, tok: Any) -> float:
    """Held-out perplexity on the configured slice of the statistics corpus."""
    from ..evals.metrics import heldout_perplexity

    sc = cfg.scoring
    return heldout_perplexity(
        model, tok, spec_for(model), cfg.stats.corpus, sc.ppl_offset, sc.ppl_texts, sc.ppl_max_len
    )


def compute_probes(cfg: TrialConfig, model: Any, tok: Any) -> dict[str, float]:
    """The capability probes (``scoring.probes``) of the model as it is: ``probe_<task>_<metric>``."""
    from ..evals.probes import probe_folder, run_probes

    sc = cfg.scoring
    folder = probe_folder(sc.probe_data, sc.probes)
    return run_probes(
        model, tok, list(sc.probes), folder, n_items=sc.probe_items, batch_size=sc.gen_batch_size
    ).metrics()
