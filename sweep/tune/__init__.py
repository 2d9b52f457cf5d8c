"""Running a sweep on Ray Tune and tracking it in MLflow: the trainable (:mod:`.trainable`), the search and
the scheduler (:mod:`.search`), and one MLflow run per trial (:mod:`.tracking`). See ``docs/SEARCH.md``.
"""
