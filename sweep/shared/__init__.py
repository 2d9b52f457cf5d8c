"""The work trials share, computed once: what it is keyed on (:mod:`.keys`), what a sweep needs and what it
costs (:mod:`.needs`), the computation on a loaded model (:mod:`.compute`), the Ray tasks that run it
(:mod:`.tasks`), fulfilment of a plan (:mod:`.fulfil`) and the service that hands trials their inputs on
demand (:mod:`.service`). See ``docs/SHARED_WORK.md``.
"""
