"""Evaluation: the evaluator (evaluator.py) and log-likelihood scoring / rank classification
(scoring.py, imported on its own since it brings in the model stack). The metric functions live in
t5lite/metrics.py (a leaf, so data tasks can name them); they are re-exported here."""
from t5lite.metrics import (METRICS, UnknownMetricError, accuracy, bleu, f1, get_metric,
                            glue_average, macro_f1, matthews_corrcoef, pearson_corrcoef,
                            rank_accuracy, register_metric, resolve, rouge, sequence_accuracy,
                            spearman_corrcoef, squad, superglue_average, takes_scores)

__all__ = [
    'METRICS', 'UnknownMetricError', 'accuracy', 'bleu', 'f1', 'get_metric', 'glue_average',
    'macro_f1', 'matthews_corrcoef', 'pearson_corrcoef', 'rank_accuracy', 'register_metric',
    'resolve', 'rouge', 'sequence_accuracy', 'spearman_corrcoef', 'squad', 'superglue_average',
    'takes_scores'
]
