"""Temporary shim: the offline downstream tasks moved to t5lite/data/catalog/downstream.py.
Delete once infer.py, evaluation/evaluator.py and tests import the catalog module instead."""
# pylint: disable=wildcard-import,unused-wildcard-import,unused-import
from t5lite.data.catalog.downstream import *  # noqa: F401,F403
from t5lite.data.catalog.downstream import RANK_OPTIONS  # noqa: F401  (the evaluator reads it)
from t5lite.data.vocab import encode_with_sentinels  # noqa: F401  (infer.py calls it from here)
