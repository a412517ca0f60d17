"""Metric functions against values computed independently: by hand (the arithmetic is in the
comments), by a different formula (numpy / the definition), or a library's documented value."""
import math

import numpy as np
import pytest

from t5lite import metrics as M


def test_accuracy_and_sequence_accuracy():
  # 3 of 4 labels equal -> 75.
  assert M.accuracy(['a', 'b', 'c', 'd'], ['a', 'x', 'c', 'd']) == {'accuracy': 75.0}
  assert M.accuracy([0, 1, 1], [0, 1, 1])['accuracy'] == 100.0
  # Exact string equality: case and a trailing space count -> only 'dog' matches: 1/3.
  got = M.sequence_accuracy(['The cat', 'dog', 'x'], ['the cat', 'dog', 'x '])
  assert got['sequence_accuracy'] == pytest.approx(100 / 3)
  # Token sequences compare element-wise whatever their container: 1 of 2.
  got = M.sequence_accuracy([[5, 6], [7]], [np.array([5, 6]), [8]])
  assert got['sequence_accuracy'] == 50.0
  with pytest.raises(ValueError, match='2 targets but 1 predictions'):
    M.accuracy([1, 2], [1])


def test_matthews_binary_by_hand():
  targets = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
  predictions = [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
  # Confusion: TP=3 (first three), FN=1, TN=4, FP=2 (last two).
  # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(5*4*6*5)
  #     = 10 / sqrt(600) = 0.4082483
  expected = 100 * 10 / math.sqrt(600)
  assert M.matthews_corrcoef(targets, predictions)['matthews_corrcoef'] == pytest.approx(expected)
  # Perfect and inverted predictions: +100 and -100.
  assert M.matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1])['matthews_corrcoef'] == pytest.approx(100)
  assert M.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0])['matthews_corrcoef'] == pytest.approx(-100)
  # One predicted class only: a zero factor in the denominator, defined as 0 (sklearn's rule).
  assert M.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1])['matthews_corrcoef'] == 0.0


def _mcc_by_definition(targets, predictions):
  """Gorodkin's R_K as the correlation of the one-hot target and prediction matrices:
  cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)), cov(X, Y) = sum_n sum_k (X_nk - mean_k X)(Y_nk - mean_k Y).
  A different computation from the confusion-matrix formula the library uses."""
  labels = sorted(set(targets) | set(predictions))
  x = np.array([[t == k for k in labels] for t in targets], float)
  y = np.array([[p == k for k in labels] for p in predictions], float)
  x, y = x - x.mean(0), y - y.mean(0)
  return 100 * (x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum())


@pytest.mark.parametrize(
    'targets,predictions',
    [
        ([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]),  # three classes
        ([1, 0, 1, 0, 1], [1, -1, 1, 0, 0]),  # an invalid prediction (-1) is its own class
    ])
def test_matthews_multiclass_matches_definition(targets, predictions):
  got = M.matthews_corrcoef(targets, predictions)['matthews_corrcoef']
  assert got == pytest.approx(_mcc_by_definition(targets, predictions))


def test_multiclass_matthews_by_hand():
  # C = [[1,1,0],[0,2,0],[1,0,1]] (rows targets); c = 4, s = 6, t = (2,2,2), p = (2,3,1).
  # (c*s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) = (24 - 12) / sqrt((36 - 14)(36 - 12)) = 12/sqrt(528)
  got = M.matthews_corrcoef([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0])['matthews_corrcoef']
  assert got == pytest.approx(100 * 12 / math.sqrt(528))


def test_binary_f1_by_hand_with_invalid():
  targets = [1, 1, 1, 0, 0, 0]
  predictions = [1, 1, 0, 1, 0, -1]
  # TP = 2, FN = 1 (third), FP = 1 (fourth) + 1 (the invalid -1 on a negative counts as wrong).
  # F1 = 2TP / (2TP + FP + FN) = 4 / (4 + 2 + 1) = 4/7.
  assert M.f1(targets, predictions)['f1'] == pytest.approx(100 * 4 / 7)
  # Without the invalid one: P = 2/3, R = 2/3 -> F1 = 2/3.
  assert M.f1([1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0])['f1'] == pytest.approx(100 * 2 / 3)
  # String labels with a chosen positive class; no true positive -> 0.
  assert M.f1(['yes', 'no'], ['no', 'no'], positive='yes')['f1'] == 0.0


def test_macro_f1_by_hand():
  targets, predictions = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
  # class 0: TP1 FP1 FN1 -> 2/4; class 1: TP2 FP1 FN0 -> 4/5; class 2: TP1 FP0 FN1 -> 2/3.
  per_class = [2 / 4, 4 / 5, 2 / 3]
  assert M.macro_f1(targets, predictions)['macro_f1'] == pytest.approx(100 * np.mean(per_class))
  # A fixed label set with an unseen class 3 (F1 0) averages over 4 classes.
  got = M.macro_f1(targets, predictions, labels=range(4))['macro_f1']
  assert got == pytest.approx(100 * sum(per_class) / 4)
  # CB's registered form fixes labels 0..2; an invalid prediction -1 is only a miss for class 0:
  # class 0: TP0 FP0 FN1 -> 0; class 1: TP1 -> 2/2 = 1; class 2: 1 -> mean 2/3.
  assert M.METRICS['mean_3class_f1']([0, 1, 2], [-1, 1, 2])['macro_f1'] == pytest.approx(200 / 3)


def test_correlations():
  # Pearson by hand: t = (1,2,3), p = (1,3,2); deviations (-1,0,1), (-1,1,0):
  # sum of products 1, sums of squares 2 and 2 -> r = 1/2.
  assert M.pearson_corrcoef([1, 2, 3], [1, 3, 2])['pearson_corrcoef'] == pytest.approx(50.0)
  # Spearman by hand without ties: d = rank differences (-1,1,0,-1,1), sum d^2 = 4,
  # rho = 1 - 6 * 4 / (5 * (25 - 1)) = 0.8.
  got = M.spearman_corrcoef([1, 2, 3, 4, 5], [2, 1, 3, 5, 4])['spearman_corrcoef']
  assert got == pytest.approx(80.0)
  # Against numpy on random data; Spearman with ties against Pearson of average ranks written
  # out by hand: targets (1, 2, 2, 4, 5) rank (1, 2.5, 2.5, 4, 5).
  rng = np.random.RandomState(0)
  a, b = rng.randn(50), rng.randn(50)
  assert M.pearson_corrcoef(a,
                            b)['pearson_corrcoef'] == pytest.approx(100 * np.corrcoef(a, b)[0, 1])
  got = M.spearman_corrcoef([1.0, 2.0, 2.0, 4.0, 5.0], [2.0, 1.0, 3.0, 5.0, 4.0])
  expected = 100 * np.corrcoef([1, 2.5, 2.5, 4, 5], [2, 1, 3, 5, 4])[0, 1]
  assert got['spearman_corrcoef'] == pytest.approx(expected)
  # Constant predictions: undefined -> NaN.
  assert math.isnan(M.pearson_corrcoef([1, 2, 3], [1, 1, 1])['pearson_corrcoef'])


def test_squad_normalisation_and_scores_by_hand():
  # Lowercase, drop punctuation (the hyphen too, joining the words), drop articles, squash spaces.
  assert M.normalize_squad('  The  Quick,  brown-fox!  An apple ') == 'quick brownfox apple'
  targets = [
      ['eiffel tower', 'Paris'],  # 1: "The Eiffel Tower!" -> "eiffel tower": EM 1, F1 1
      ['Paris', 'the city of Paris, France'],  # 2: see below
      'apple day',  # 3: "an apple a day" -> "apple day": EM 1, F1 1
      ['red'],  # 4: "blue": EM 0, F1 0
  ]
  predictions = ['The Eiffel Tower!', 'in the city of Paris', 'an apple a day', 'blue']
  # Example 2: prediction -> "in city of paris" (4 tokens).
  #   vs "paris": 1 common, P = 1/4, R = 1 -> F1 = 2(1/4)/(5/4) = 0.4
  #   vs "city of paris france": 3 common, P = R = 3/4 -> F1 = 0.75; max = 0.75, EM 0.
  # EM = (1 + 0 + 1 + 0)/4 = 50; F1 = (1 + 0.75 + 1 + 0)/4 = 68.75.
  got = M.squad(targets, predictions)
  assert got['em'] == pytest.approx(50.0)
  assert got['f1'] == pytest.approx(68.75)
  # Repeated tokens count at most as often as in both: "paris paris" vs "paris":
  # 1 common, P = 1/2, R = 1 -> F1 = 2/3.
  assert M.squad([['paris']], ['Paris Paris'])['f1'] == pytest.approx(200 / 3)
  # An answer made only of an article normalises to empty: empty vs empty is a match.
  assert M.squad([['The']], ['a']) == {'em': 100.0, 'f1': 100.0}


def test_bleu_by_formula():
  # Tokens (no punctuation, so the intl tokenizer just splits on spaces):
  #   hyp1 "the cat sat on the mat" / ref1 "the cat sat on a mat" (6 / 6 tokens)
  #     1-grams: 5 of 6 match (the second "the" is clipped: ref has one)
  #     2-grams: the cat, cat sat, sat on -> 3 of 5;  3-grams: 2 of 4;  4-grams: 1 of 3
  #   hyp2 "hello there" / ref2 "hello there general kenobi" (2 / 4 tokens)
  #     1-grams 2 of 2, 2-grams 1 of 1, no 3- or 4-grams.
  # Corpus totals: p1 = 7/8, p2 = 4/6, p3 = 2/4, p4 = 1/3; hyp length 8, ref length 10.
  # BLEU = BP * (p1 p2 p3 p4)^(1/4), BP = exp(1 - 10/8)   (Papineni et al. 2002)
  expected = 100 * math.exp(1 - 10 / 8) * (7 / 8 * 4 / 6 * 2 / 4 * 1 / 3)**0.25  # 43.488
  got = M.bleu(['the cat sat on a mat', 'hello there general kenobi'],
               ['the cat sat on the mat', 'hello there'])
  assert got['bleu'] == pytest.approx(expected, abs=1e-6)
  # One sentence: equal lengths (BP = 1): (5/6 * 3/5 * 1/2 * 1/3)^(1/4) = (1/12)^(1/4).
  got = M.bleu(['the cat sat on a mat'], ['the cat sat on the mat'])
  assert got['bleu'] == pytest.approx(100 * (1 / 12)**0.25, abs=1e-6)


def test_bleu_sacrebleu_documented_example_multi_reference():
  # sacrebleu's README example (two reference streams) gives "BLEU = 48.53" with its default
  # 13a tokenizer; here the references are given per example, so this also checks the
  # per-example -> stream transposition.
  targets = [['The dog bit the man.', 'The dog had bit the man.'],
             ['It was not unexpected.', 'No one was surprised.'],
             ['The man bit him first.', 'The man had bitten the dog.']]
  predictions = ['The dog bit the man.', "It wasn't surprising.", 'The man had just bitten him.']
  assert M.bleu(targets, predictions, tokenize='13a')['bleu'] == pytest.approx(48.53, abs=0.005)
  # A variable number of references: example 2 has just one.
  ragged = [targets[0], targets[1][:1], targets[2]]
  assert 0 < M.bleu(ragged, predictions)['bleu'] < 100


def test_rouge_by_hand():
  # Example 1: target "the cat sat on the mat", prediction "the cat lay on the mat".
  #   rouge1: overlap the x2, cat, on, mat = 5; P = R = 5/6 -> F = 5/6
  #   rouge2: the cat, on the, the mat = 3 of 5 each side -> F = 3/5
  #   rougeL: LCS "the cat on the mat" = 5 -> F = 5/6
  # Example 2: target "hello world foo bar", prediction "hello world".
  #   rouge1: 2 common, P = 1, R = 1/2 -> F = 2/3; rouge2: 1 common, P = 1, R = 1/3 -> F = 1/2
  #   rougeL: LCS 2 -> F = 2/3
  # Mean over examples: rouge1 = (5/6 + 2/3)/2 = 0.75, rouge2 = (0.6 + 0.5)/2 = 0.55, rougeL 0.75.
  got = M.rouge(['the cat sat on the mat', 'hello world foo bar'],
                ['the cat lay on the mat', 'hello world'])
  assert got['rouge1'] == pytest.approx(75.0)
  assert got['rouge2'] == pytest.approx(55.0)
  assert got['rougeL'] == pytest.approx(75.0)
  assert got['rougeLsum'] == pytest.approx(75.0)  # one sentence each: the same as rougeL


def test_rouge_lsum_splits_sentences():
  # Sentences swapped: "the cat sat . the dog ran" vs "the dog ran . the cat sat" (the "." is not
  # a token). rougeL over the whole text: LCS of (the cat sat the dog ran) and
  # (the dog ran the cat sat) is 3 -> F = 3/6 = 0.5. rougeLsum splits at " . ": each target
  # sentence is matched in full by a predicted sentence: union LCS 3 + 3 = 6 of 6 -> F = 1.
  # rouge2: target bigrams (the cat, cat sat, sat the, the dog, dog ran), 4 of 5 shared -> 0.8.
  got = M.rouge(['the cat sat . the dog ran'], ['the dog ran . the cat sat'])
  assert got['rougeL'] == pytest.approx(50.0)
  assert got['rougeLsum'] == pytest.approx(100.0)
  assert got['rouge2'] == pytest.approx(80.0)
  assert got['rouge1'] == pytest.approx(100.0)


def test_rank_accuracy():
  scores = [[-1.0, -0.5], [-3.0, -2.0, -9.0], [-4.0]]
  # argmax: 1, 1, 0. Targets: 1 (right), 0 (wrong), 0 (right) -> 2/3. A set of correct answers
  # {0, 1} makes example 2 right too.
  assert M.rank_accuracy([1, 0, 0], scores)['accuracy'] == pytest.approx(200 / 3)
  assert M.rank_accuracy([1, {0, 1}, 0], scores)['accuracy'] == pytest.approx(100.0)
  assert M.takes_scores(M.rank_accuracy) and not M.takes_scores(M.accuracy)


def _glue_results(cola, sst2, mrpc, stsb, qqp, mnli_m, mnli_mm, qnli, rte, wnli):
  return {
      'cola': {'matthews_corrcoef': cola}, 'sst2': {'accuracy': sst2},
      'mrpc': {'f1': mrpc[0], 'accuracy': mrpc[1]},
      'stsb': {'pearson_corrcoef': stsb[0],
               'spearman_corrcoef': stsb[1]}, 'qqp': {'f1': qqp[0], 'accuracy': qqp[1]},
      'mnli_matched': {'accuracy': mnli_m}, 'mnli_mismatched': {'accuracy': mnli_mm},
      'qnli': {'accuracy': qnli}, 'rte': {'accuracy': rte}, 'wnli': {'accuracy': wnli}
  }


def test_glue_average_by_hand():
  results = _glue_results(50, 90, (80, 70), (88, 86), (70, 90), 84, 82, 91, 65, 60)
  # Task scores: CoLA 50, SST-2 90, MRPC (80+70)/2 = 75, STS-B 87, QQP 80, MNLI (84+82)/2 = 83,
  # QNLI 91, RTE 65, WNLI 60. Sum 681 over 9 tasks = 75.666...; without WNLI 621/8 = 77.625.
  got = M.glue_average(results)
  assert got['glue_average'] == pytest.approx(681 / 9)
  assert got['mrpc'] == 75 and got['mnli'] == 83 and got['stsb'] == 87
  assert M.glue_average(results, include_wnli=False)['glue_average'] == pytest.approx(621 / 8)
  del results['qqp']['f1']
  with pytest.raises(ValueError, match='qqp/f1'):
    M.glue_average(results)


def test_glue_average_reproduces_a_published_row():
  # T5-11B's GLUE test-set row (Raffel et al. 2020, Table 14, as recalled; not re-checked
  # offline): reported average 90.3. The leaderboard convention gives 90.31; counting MNLI-m and
  # MNLI-mm as two tasks would give 90.48, dropping WNLI 89.78, so the row pins the convention.
  results = _glue_results(71.6, 97.5, (92.8, 90.4), (93.1, 92.8), (75.1, 90.6), 92.2, 91.9, 96.9,
                          92.8, 94.5)
  assert M.glue_average(results)['glue_average'] == pytest.approx(90.3, abs=0.05)


def test_superglue_average_by_hand():
  results = {
      'boolq': {'accuracy': 80}, 'cb': {'macro_f1': 70, 'accuracy': 90}, 'copa': {'accuracy': 60},
      'multirc': {'f1': 70, 'exact_match': 30}, 'record': {'f1': 72, 'em': 70},
      'rte': {'accuracy': 75}, 'wic': {'accuracy': 65}, 'wsc': {'accuracy': 62}
  }
  # Task scores: 80, CB 80, 60, MultiRC 50, ReCoRD 71, 75, 65, 62 -> sum 543 / 8 = 67.875.
  got = M.superglue_average(results)
  assert got['superglue_average'] == pytest.approx(67.875)
  assert got['cb'] == 80 and got['multirc'] == 50
  # T5's SuperGLUE leaderboard row (as recalled): BoolQ 91.2, CB 93.9/96.8, COPA 94.8,
  # MultiRC 88.1/63.3, ReCoRD 94.1/93.4, RTE 92.5, WiC 76.9, WSC 93.8; reported score 89.3.
  row = {
      'boolq': {'accuracy': 91.2}, 'cb': {'macro_f1': 93.9,
                                          'accuracy': 96.8}, 'copa': {'accuracy': 94.8},
      'multirc': {'f1': 88.1, 'exact_match': 63.3}, 'record': {'f1': 94.1, 'em': 93.4},
      'rte': {'accuracy': 92.5}, 'wic': {'accuracy': 76.9}, 'wsc': {'accuracy': 93.8}
  }
  assert M.superglue_average(row)['superglue_average'] == pytest.approx(89.3, abs=0.05)


def test_registry_and_unknown_name():
  assert M.METRICS['squad'] is M.squad
  assert M.resolve(['bleu', M.accuracy]) == [M.bleu, M.accuracy]
  with pytest.raises(M.UnknownMetricError, match="Did you mean 'squad'") as e:
    M.METRICS['sqaud']
  assert isinstance(e.value, KeyError)
  with pytest.raises(M.UnknownMetricError, match='matthews_corrcoef'):
    M.get_metric('matthews')
  with pytest.raises(ValueError, match='already registered'):
    M.register_metric('bleu', M.bleu)


def test_multirc_grouped_exact_match_and_f1_over_all_answers_by_hand():
  # Three questions (groups): answers [T, F, T], [F, T], [T]; 1 = True, -1 = unparseable output.
  targets = [{'value': v, 'group': g}
             for v, g in [(1, 'a'), (0, 'a'), (1, 'a'), (0, 'b'), (1, 'b'), (1, 'c')]]
  predictions = [{'value': v} for v in [1, 0, 1, 0, 0, -1]]
  # Exact match per question: a all right (100), b one wrong (0), c invalid (0): mean 100/3.
  grouped = M.METRICS['multirc_exact_match'](targets, predictions)
  assert grouped == {'exact_match': pytest.approx(100 / 3)}
  # F1a over all six answers: TP = 2 (a's two Trues), FN = 2 (b's True predicted False, c's
  # invalid), FP = 0: F1 = 2*2 / (2*2 + 0 + 2) = 4/6.
  assert M.METRICS['multirc_f1_over_all_answers'](targets,
                                                  predictions) == {'f1': pytest.approx(400 / 6)}
  # Groups are averaged unweighted: one big right group and one small wrong one give 50.
  big = [{'value': 1, 'group': 0}] * 5 + [{'value': 1, 'group': 1}]
  assert M.mean_group_metric(M.all_match)(big, [{'value': 1}] * 5
                                          + [{'value': 0}]) == {'exact_match': 50.0}
  assert M.all_match([1, 2], [1, 2]) == {'exact_match': 100.0}
