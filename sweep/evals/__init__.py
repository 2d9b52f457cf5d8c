"""The benchmarks and their metrics: records, loading and selection (CounterFact, ZsRE, QAEdit, MQuAKE), the
teacher-forced and generated scores, the capability probes, and the registry that declares every metric.

No Ray, no MLflow, no shared work: a trial's stages (:mod:`sweep.stages`) and the shared work
(:mod:`sweep.shared`) call on it. See ``docs/ARCHITECTURE.md``.
"""
