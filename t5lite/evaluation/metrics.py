"""Temporary shim: the metric functions moved to t5lite/metrics.py (a leaf that data tasks import).
Delete once nothing imports t5lite.evaluation.metrics."""
from t5lite.metrics import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
