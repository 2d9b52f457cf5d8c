"""GPU checks (marked ``gpu``: off by default; ``python -m pytest -m gpu`` on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch

from editors import compute_deltas, load_hparams, spec_for
from editors.stats import collect_second_moments
from tests.conftest import corpus_text, make_model
from tests.editors.test_editors import REQUESTS, TEMPLATES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_statistics_and_deltas_on_gpu_match_cpu(tok):
    cpu = make_model(len(tok))
    gpu = make_model(len(tok)).to("cuda")
    texts = corpus_text(20_000).split("\n")
    st_cpu = collect_second_moments(cpu, tok, spec_for(cpu), [1], texts, max_tokens=2000, progress=False)
    st_gpu = collect_second_moments(gpu, tok, spec_for(gpu), [1], texts, max_tokens=2000, progress=False)
    assert st_gpu[1].mom2.device.type == "cuda"
    torch.testing.assert_close(st_gpu[1].mom2.cpu(), st_cpu[1].mom2, rtol=1e-4, atol=1e-6)
    hp = load_hparams("memit", None, layers=[1], v_num_grad_steps=5, mom2_update_weight=10.0)
    snap = {k: v.clone() for k, v in gpu.state_dict().items()}
    d_gpu = compute_deltas("memit", gpu, tok, REQUESTS, hp, {1: st_gpu[1].mom2}, templates=TEMPLATES)
    assert all(torch.equal(v, snap[k]) for k, v in gpu.state_dict().items())
    d_cpu = compute_deltas("memit", cpu, tok, REQUESTS, hp, {1: st_cpu[1].mom2}, templates=TEMPLATES)
    name = spec_for(cpu).rewrite_name(1)
    torch.testing.assert_close(d_gpu.deltas[name].cpu(), d_cpu.deltas[name], rtol=1e-3, atol=1e-5)
