"""Evaluation: the bounded-memory ranking engine, cross-modal and label metrics, evaluate, paired comparison, seeds
and plots."""
