"""The quickstart's pretraining input pipeline: embedded corpus -> span-corrupted batches.

    corpus_documents()  tokenize (once per process)  concatenate + split into raw chunks
      -> shuffle (seeded, reshuffled every epoch) -> repeat forever
      -> span corruption, rng = f(seed, global element index)
      -> this process's slice [process_index::process_count]
      -> batch `rows` examples -> encdec_features (+ packing) -> pad to exactly `rows`

Everything is a grain `MapDataset`, i.e. random access by index, so the
pipeline is a pure function of (seed, step): the iterator's state is just the
next index, `get_state()`/`set_state()` resume exactly, and the result does not
depend on thread or worker counts. Because randomness is keyed by the *global*
element index before per-process slicing, process p of P sees elements
p, p+P, p+2P... and the union over processes of one step's batches is the same
set of examples whatever P is.

Transforms are top-level classes (no lambdas) so grain worker processes can
pickle them.
"""

from __future__ import annotations

import functools
import grain
import numpy as np

from t5lite.data import converters, embedded, preprocessors
from t5lite.data.vocab import SentencePieceVocabulary, embedded_vocabulary


@functools.lru_cache(maxsize=4)
def _tokenized_corpus(vocab_path: str, extra_ids: int) -> tuple[np.ndarray, ...]:
    """Token ids of every corpus document, cached per vocabulary file."""
    vocab = SentencePieceVocabulary(vocab_path, extra_ids=extra_ids)
    return tuple(np.asarray(vocab.encode(doc), np.int32)
                 for doc in embedded.corpus_documents())


def _derived_seed(seed: int, stream: int) -> int:
    """A 32-bit seed for one use of the user's seed.

    grain's shuffle uses seed + epoch for each epoch, so feeding it `seed`
    directly would make seed 1's first epoch equal seed 0's second.
    """
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class SpanCorrupt(grain.transforms.MapWithIndex):
    """Span-corrupts one raw chunk with an rng keyed by (seed, element index)."""

    def __init__(self, seed: int, vocab_size: int, noise_density: float,
                 mean_noise_span_length: float):
        self.seed = seed
        self.vocab_size = vocab_size
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length

    def map_with_index(self, index: int, element: np.ndarray) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 2, index])
        return preprocessors.span_corruption(
            element, rng, self.vocab_size, noise_density=self.noise_density,
            mean_noise_span_length=self.mean_noise_span_length)


class ToFeatures:
    """grain batch_fn: a list of examples -> an encdec feature batch of exactly `rows` rows.

    With pack=True the `rows` examples of a batch are packed greedily and the
    freed rows are zero padding. Full-length chunks fill a row on their own, so
    with this corpus packing only ever merges the one short final chunk; the
    point is the fixed scheme (fixed examples per batch, fixed shapes), which
    keeps batches a pure function of the step.
    """

    def __init__(self, inputs_length: int, targets_length: int, pack: bool, rows: int):
        self.inputs_length = inputs_length
        self.targets_length = targets_length
        self.pack = pack
        self.rows = rows

    def __call__(self, examples) -> dict[str, np.ndarray]:
        features = converters.encdec_features(
            list(examples), self.inputs_length, self.targets_length, pack=self.pack)
        return converters.pad_rows(features, self.rows)


def _resolve_processes(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel  (only when not given)
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count}).")
    return process_index, process_count


def make_span_corruption_dataset(*, inputs_length: int, global_batch_size: int, seed: int,
                                 pack: bool = True, noise_density: float = 0.15,
                                 mean_noise_span_length: float = 3.0,
                                 vocabulary: SentencePieceVocabulary | None = None,
                                 process_index: int | None = None,
                                 process_count: int | None = None) -> grain.MapDataset:
    """The infinite MapDataset of host-local batches behind `make_span_corruption_iterator`.

    Element i is batch (step) i. Arguments as for the iterator.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}.")
    rows = global_batch_size // process_count
    if rows < 1:
        raise ValueError(f"global_batch_size={global_batch_size} must be >= 1.")
    vocabulary = vocabulary or embedded_vocabulary()
    raw_length, targets_length = preprocessors.random_spans_helper(
        inputs_length, noise_density, mean_noise_span_length)
    # Fail here rather than deep inside an iterator thread.
    _, num_spans = preprocessors.noise_span_counts(
        raw_length, noise_density, mean_noise_span_length)
    if num_spans > min(vocabulary.extra_ids, preprocessors.NUM_SENTINELS):
        raise ValueError(f"inputs_length={inputs_length} needs {num_spans} sentinels per "
                         f"example; the vocabulary has {vocabulary.extra_ids}.")

    docs = _tokenized_corpus(vocabulary.path, vocabulary.extra_ids)
    # Span corruption needs >= 2 tokens; only the final chunk can be shorter.
    chunks = [c for c in preprocessors.split_tokens(docs, raw_length) if len(c) >= 2]

    ds = grain.MapDataset.source(chunks)
    ds = ds.shuffle(seed=_derived_seed(seed, 1))  # index // len = epoch: new order each epoch
    ds = ds.repeat()  # infinite
    ds = ds.map_with_index(SpanCorrupt(seed, vocabulary.vocab_size, noise_density,
                                       mean_noise_span_length))
    ds = ds[process_index::process_count]
    return ds.batch(rows, batch_fn=ToFeatures(inputs_length, targets_length, pack, rows))


def make_span_corruption_iterator(*, inputs_length: int, global_batch_size: int, seed: int,
                                  pack: bool = True, noise_density: float = 0.15,
                                  mean_noise_span_length: float = 3.0,
                                  vocabulary: SentencePieceVocabulary | None = None,
                                  process_index: int | None = None,
                                  process_count: int | None = None,
                                  read_options: grain.ReadOptions | None = None,
                                  ) -> grain.DatasetIterator:
    """Endless iterator of host-local span-corruption batches, with exact resumption.

    Each `next()` returns a dict of int32 numpy arrays of shape
    [global_batch_size // process_count, length]: `encoder_*` features have
    length `inputs_length`, `decoder_*` features have length
    `random_spans_helper(inputs_length, ...)[1]` (114 for 512). pack=True adds
    segment ids and positions. `vocabulary` defaults to `embedded_vocabulary()`;
    process_index/process_count default to JAX's. The returned grain
    `DatasetIterator` has `get_state()` / `set_state(state)`: a fresh iterator
    given a saved state yields exactly the batches the original would have.
    `read_options` defaults to a small prefetch (2 threads, 4 batches).
    """
    ds = make_span_corruption_dataset(
        inputs_length=inputs_length, global_batch_size=global_batch_size, seed=seed,
        pack=pack, noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length, vocabulary=vocabulary,
        process_index=process_index, process_count=process_count)
    # grain's default (16 threads, 500 elements) would compute hundreds of
    # batches ahead on a 2-core machine; a few batches of lookahead is plenty.
    read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return iter(ds.to_iter_dataset(read_options))

