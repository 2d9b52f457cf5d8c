"""CounterFact data and metrics, single trials, and Ray Tune sweeps with MLflow tracking."""
