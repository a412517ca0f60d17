"""Prompt tuning's soft prompt (Lester et al. 2021, *The Power of Scale for Parameter-Efficient
Prompt Tuning*): `model.prompt_length` learned vectors, the param `prompt/embedding`
[prompt_length, d_model], put in front of the embedded encoder input (decoder-only: the embedded
sequence) of every example, so that the model reads [prompt; tokens].

The prompt starts as copies of token-embedding rows (Lester et al.'s "sampled vocab" init): rows
drawn without replacement from ids FIRST_ID .. FIRST_ID + model.prompt_init_vocab - 1, after pad,
EOS and UNK (SentencePiece numbers its pieces by score, so low ids are common tokens; the paper
drew from the 5,000 most frequent). `model.init` draws them from the embedding it initialises; a
fine-tune from a checkpoint without a prompt draws them again from the loaded embedding
(trainer.initial_state), so that the prompt starts as real tokens of the pretrained model.

The prompt positions belong to the one example of their row (segment id 1), so a packed row,
which holds several examples, would share one prompt: config_rules refuses data.pack=True.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite.models import layers

FIRST_ID = 3  # ids 0, 1, 2: pad, EOS, UNK (t5lite/data/vocab.py)
PROMPT_KEY = 0x50524f4d  # 'PROM': folded into train.seed's key for `resample`


def sample_rows(rng: jax.Array, table: jax.Array, length: int, init_vocab: int) -> jax.Array:
  """`length` rows of `table` [vocab, embed], float32, drawn without replacement from ids
  FIRST_ID .. FIRST_ID + init_vocab - 1 (config_rules checks that they exist)."""
  ids = FIRST_ID + jax.random.choice(rng, init_vocab, (length,), replace=False)
  return jnp.take(table, ids, axis=0).astype(jnp.float32)


def resample(params, seed: int, cfg, sharding=None):
  """`params` with the prompt drawn again (`sample_rows`) from their token embedding, with a key
  of its own derived from `seed` (train.seed), placed on `sharding`: for a fine-tune whose
  embedding came from a checkpoint after model.init drew the prompt from a random one."""
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), PROMPT_KEY)
  rows = sample_rows(rng, params['token_embedder']['embedding'], cfg.prompt_length,
                     cfg.prompt_init_vocab)
  rows = jax.device_put(rows, sharding) if sharding is not None else rows
  return {**params, 'prompt': {'embedding': rows}}


class SoftPrompt(nn.Module):
  """The prompt param; called with the token embedding's table, which its init samples."""
  length: int
  init_vocab: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, table: jax.Array) -> jax.Array:
    init = lambda rng, shape: sample_rows(rng, table, shape[0], self.init_vocab)
    # Small and read whole by every example: replicated over the rows, `embed` as the table's.
    prompt = self.param('embedding', nn.with_logical_partitioning(init, (None, 'embed')),
                        (self.length, table.shape[1]))
    return prompt.astype(self.dtype)  # as Embed casts its rows


def prepend(prompt: jax.Array, embedded: jax.Array) -> jax.Array:
  """[prompt; embedded] for every row: [P, E], [B, L, E] -> [B, P + L, E]."""
  rows = jnp.broadcast_to(prompt[None].astype(embedded.dtype), (embedded.shape[0],) + prompt.shape)
  return layers.constrain(jnp.concatenate([rows, embedded], axis=1),
                          ('act_batch', 'act_length', 'act_embed'))


def extend(ids: jax.Array | None, length: int) -> jax.Array | None:
  """Segment ids (or a 0/1 flag such as decoder_causal_attention) [B, L] -> [B, length + L], the
  prompt's columns 1: the prompt is part of the row's (one) example."""
  if ids is None or not length:
    return ids
  ids = jnp.asarray(ids)
  return jnp.concatenate([jnp.ones((ids.shape[0], length), ids.dtype), ids], axis=1)
