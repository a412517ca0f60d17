"""Log-likelihood scoring and rank classification with a t5lite model.

`score_batch(model, params, batch)` returns, per row, sum_t w_t log p(target_t | inputs, targets_<t)
over a converter batch (the seqio/T5X feature names): encoder-decoder batches score the decoder
targets given the encoder inputs; decoder-only / prefix-LM batches score the positions whose
`decoder_loss_weights` are 1 (the targets), the rest being the conditioning prefix. Padding has
weight 0 and never changes a score. It is the quantity T5X's `score_batch` returns (without
length normalisation), computed in float32 from the model's float32 logits.

`rank_classification(model, params, inputs, options, vocab)` answers multiple-choice questions by
likelihood: it scores every (example, option) pair as one row of a batch and picks each example's
best option. Examples may have different numbers of options. The ranking score is the option's
total log-likelihood by default (seqio's `rank_classification` metric defaults to
`normalize_by_target_length=False`): that is log p(option | input), the model's own comparison of
the candidate strings. `length_normalize=True` ranks by the mean per-token log-likelihood instead,
a heuristic that stops long options losing only for having more tokens to pay for; it changes
what is compared, so it is opt-in.

Batches are built with the same feature converters the training pipeline uses
(`t5lite.data.converters`), so a scored pair looks exactly like a training example: EOS appended
to inputs and targets (`add_eos`), decoder inputs shifted right with 0 as BOS, prefix LM inputs
attended bidirectionally. Every batch has the same shape (the longest pair, rounded up to a
multiple of 8, and `batch_size` rows, the last batch padded with all-zero rows), so scoring
compiles once.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from t5lite import losses, partitioning
from t5lite.data import converters
from t5lite.data.vocab import EOS_ID


def token_log_likelihoods(model: nn.Module, params, batch: Mapping[str, jax.Array]) -> jax.Array:
  """[B, L] float32: log p(decoder_target_tokens) at every position times decoder_loss_weights.

  `losses.token_log_likelihoods` of the model's logits: the same float32 arithmetic as the
  training loss (`losses.cross_entropy_sums`), so scores and training loss agree.
  """
  logits = model.apply({'params': params}, **losses.model_inputs(batch), deterministic=True)
  return losses.token_log_likelihoods(logits, batch['decoder_target_tokens'],
                                      batch['decoder_loss_weights'])


def _sums(model, params, batch):
  per_token = token_log_likelihoods(model, params, batch)
  return per_token.sum(axis=-1), batch['decoder_loss_weights'].astype(jnp.float32).sum(axis=-1)


@functools.lru_cache(maxsize=32)
def _jitted(model: nn.Module, mesh, rules) -> partitioning.Partitioned:
  # One compiled function per (model, mesh, rules); jit then caches per batch shape. Keyed on
  # the module object (flax modules hash by identity), so a new model gets a new function.
  if mesh is None:
    return partitioning.jit(functools.partial(_sums, model), None, None)
  # Replicated outputs: every process can read all the scores back to the host.
  replicated = NamedSharding(mesh, P())
  return partitioning.jit(functools.partial(_sums, model), mesh, rules,
                          out_shardings=(replicated, replicated))


def _place(batch: Mapping[str, Any], mesh, rules) -> dict[str, jax.Array]:
  """Host batch -> global arrays split over the batch axes of the mesh.

  Every process passes the *same* full batch (scoring is driven identically on each host), and
  each device takes its own rows from it via make_array_from_callback, which works on one
  process and on many.
  """
  sharding = partitioning.batch_sharding(mesh, rules)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
  return out


def _score(model, params, batch, mesh, rules):
  batch = {k: np.asarray(v) for k, v in batch.items()}
  if mesh is None:
    return _jitted(model, None, None)(params, batch)
  if rules is None:
    raise ValueError('score_batch: pass the logical axis `rules` together with `mesh`.')
  rules = partitioning.rules_tuple(rules)
  return _jitted(model, mesh, rules)(params, _place(batch, mesh, rules))


def score_batch(model: nn.Module, params, batch: Mapping[str, Any], mesh=None,
                rules=None) -> np.ndarray:
  """float32 [B]: each row's summed log-likelihood of its weighted target tokens (<= 0).

  `params` is the parameter tree (TrainState.params, not {'params': ...}); `batch` a converter
  batch with at least decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, plus
  encoder_input_tokens for an encoder-decoder model (and segment ids / decoder_causal_attention
  when present). With `mesh` and `rules` the step runs under those logical axis rules with
  the batch split over the data axes, so B must divide by their size and `params` should already
  be laid out on that mesh (e.g. the train state's). A packed batch scores each row, not each
  segment: split packed rows yourself if you need per-example scores.
  """
  sums, _ = _score(model, params, batch, mesh, rules)
  return np.asarray(jax.device_get(sums))


# --- rank classification -------------------------------------------------------------------------


@dataclasses.dataclass
class RankResult:
  """predictions[i]: index of example i's best option. scores[i][j]: the ranking score of option j
  (the log-likelihood, or its per-token mean with length_normalize). log_likelihoods[i][j] and
  num_tokens[i][j]: the summed log-likelihood and the number of scored target tokens (EOS
  included)."""
  predictions: np.ndarray
  scores: list[np.ndarray]
  log_likelihoods: list[np.ndarray]
  num_tokens: list[np.ndarray]


def _tokens(x, vocab, add_eos: bool, what: str) -> np.ndarray:
  if isinstance(x, str):
    if vocab is None:
      raise ValueError(f'rank_classification: {what} is text; pass a `vocab` to encode it.')
    ids = list(vocab.encode(x))
  else:
    ids = [int(i) for i in x]
  if add_eos:
    ids.append(EOS_ID)
  if not ids:
    raise ValueError(f'rank_classification: {what} is empty.')
  return np.asarray(ids, np.int32)


def round_up(n: int, multiple: int = 8) -> int:
  return -(-n // multiple) * multiple


def build_pair_batches(model: nn.Module, inputs: Sequence, options: Sequence[Sequence], vocab=None,
                       *, batch_size: int = 32, add_eos: bool = True, prefix_lm: bool = True,
                       inputs_length: int | None = None, targets_length: int | None = None):
  """(batches, pairs): padded feature batches of every (example, option) pair, and the
  (example, option) index of each real row in order. See `rank_classification` for the args."""
  if len(inputs) != len(options):
    raise ValueError(f'{len(inputs)} inputs but {len(options)} option lists.')
  examples, pairs = [], []
  for i, (x, opts) in enumerate(zip(inputs, options)):
    if len(opts) == 0:
      raise ValueError(f'rank_classification: example {i} has no options.')
    x_ids = _tokens(x, vocab, add_eos, f'input {i}')
    for j, o in enumerate(opts):
      examples.append({'inputs': x_ids, 'targets': _tokens(o, vocab, add_eos, f'option {i}/{j}')})
      pairs.append((i, j))
  longest_in = max(len(e['inputs']) for e in examples)
  longest_tg = max(len(e['targets']) for e in examples)
  inputs_length = inputs_length or round_up(longest_in)
  targets_length = targets_length or round_up(longest_tg)
  if longest_in > inputs_length or longest_tg > targets_length:
    # Truncating an option would score a different string; refuse rather than mis-rank.
    raise ValueError(f'rank_classification: longest input/option has {longest_in}/{longest_tg} '
                     f'tokens, more than inputs_length={inputs_length} / '
                     f'targets_length={targets_length}.')
  architecture = model.cfg.architecture
  batches = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    if architecture == 'encoder_decoder':
      features = converters.encdec_features(chunk, inputs_length, targets_length, pack=False)
    else:
      features = converters.prefix_lm_features(chunk, inputs_length, targets_length, pack=False)
      if not prefix_lm:  # a causal LM reads its inputs left to right like everything else
        del features['decoder_causal_attention']
    batches.append(converters.pad_rows(features, batch_size))
  return batches, pairs


def rank_classification(model: nn.Module, params, inputs: Sequence[str | Sequence[int]],
                        options: Sequence[Sequence[str | Sequence[int]]], vocab=None, *,
                        length_normalize: bool = False, batch_size: int = 32, add_eos: bool = True,
                        prefix_lm: bool = True, inputs_length: int | None = None,
                        targets_length: int | None = None, mesh=None, rules=None) -> RankResult:
  """Picks each example's most likely option.

  inputs[i]: text (encoded with `vocab`) or token ids. options[i]: that example's candidate
  answers, text or ids, any number >= 1. `add_eos` appends EOS (id 1) to every input and option,
  text or ids, as the tasks' output features do (pass ids without EOS). For a decoder-only model
  the input is the prefix: attended bidirectionally (`prefix_lm=True`, the prefix-LM converter's
  layout) or causally (`prefix_lm=False`, for a model trained as a plain causal LM); only the
  option's tokens are scored. `length_normalize` ranks by mean per-token log-likelihood instead of
  the sum (see the module docstring for why the sum is the default). Ties go to the first option.
  `mesh`/`rules`: as in `score_batch` (`batch_size` must divide by the data-parallel size).
  Each (example, option) pair is one row, so an input is encoded once per option: simple and
  exact; caching the encoder output would save compute on long inputs with many options.
  """
  batches, pairs = build_pair_batches(model, inputs, options, vocab, batch_size=batch_size,
                                      add_eos=add_eos, prefix_lm=prefix_lm,
                                      inputs_length=inputs_length, targets_length=targets_length)
  sums, counts = [], []
  for batch in batches:
    s, c = _score(model, params, batch, mesh, rules)
    sums.append(np.asarray(jax.device_get(s)))
    counts.append(np.asarray(jax.device_get(c)))
  sums, counts = np.concatenate(sums)[:len(pairs)], np.concatenate(counts)[:len(pairs)]
  ranking = sums / counts if length_normalize else sums
  n = len(inputs)
  log_likelihoods = [np.zeros(len(o), np.float32) for o in options]
  num_tokens = [np.zeros(len(o), np.int32) for o in options]
  scores = [np.zeros(len(o), np.float32) for o in options]
  for (i, j), total, count, rank in zip(pairs, sums, counts, ranking):
    log_likelihoods[i][j], num_tokens[i][j], scores[i][j] = total, count, rank
  predictions = np.array([int(np.argmax(scores[i])) for i in range(n)], np.int64)
  return RankResult(predictions, scores, log_likelihoods, num_tokens)
