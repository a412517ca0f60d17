"""The public downstream catalog (GLUE, SuperGLUE, SQuAD, CNN/DailyMail, WMT) end to end.

Instead of the real datasets, stand-in TFDS builders with the same names, configs, versions,
feature keys and label names as TFDS's own (written out here from tensorflow_datasets' sources)
are prepared as array_record in a temporary TFDS_DATA_DIR, with a few hand-written examples each.
The registered tasks then read them as they would read the prepared datasets. CI has no
TensorFlow, so TFDS's own builders and tfds.testing.mock_data cannot be used.

Per task: the exact formatted input and target of one known example (before tokenization, and
decoded back from the pipeline's tokens), its postprocessed target, and the task's metrics
through the evaluator with an oracle in place of the model: predictions equal to the targets
score perfectly, and a deliberately wrong set scores a value computed by hand in the comments.
The embedded vocabulary replaces T5's gs:// one (as data.vocabulary='embedded' does).
"""
import dataclasses
import functools
import math
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from t5lite import config as config_lib
from t5lite import partitioning
from t5lite.data import catalog, pipeline, tasks, vocab as vocab_lib
from t5lite.data.catalog import common, glue, public
from t5lite.evaluation import evaluator as evaluator_lib

Text, Label = tfds.features.Text, tfds.features.ClassLabel
MNLI = ['entailment', 'neutral', 'contradiction']
BOOL = ['False', 'True']


def _pairs(a, b, rows):
  """Examples {a, b, 'label', 'idx'} of (a, b, label) rows; b None: rows are (a, label)."""
  return [
      dict(zip([a, b, 'label'] if b else [a, 'label'], row), idx=i) for i, row in enumerate(rows)
  ]


# --- stand-in data: TFDS (builder, config) -> (features, {split: examples}) ---------------------
# Features as in tensorflow_datasets/text/glue.py, text/super_glue.py, datasets/squad,
# summarization/cnn_dailymail.py, translate/wmt.py.


def glue_features(text_keys, labels):
  f = {k: Text() for k in text_keys}
  f['label'] = Label(names=labels) if labels else np.float32
  f['idx'] = np.int32
  return f


MNLI_M = [('a man is sleeping on a couch', 'a person is resting', 0),
          ('the children are playing outside', 'the kids are asleep indoors', 2),
          ('a woman is reading', 'she is reading a novel', 1)]
MNLI_MM = [('the band played loudly', 'music was played', 0),
           ('the store is closed', 'the store is open all night', 2),
           ('he bought a car', 'he bought a red car', 1)]
GLUE_DATA = {
    'cola': (glue_features(['sentence'], ['unacceptable', 'acceptable']), {
        'validation': _pairs('sentence', None, [('the book was read by the girl', 1),
                                                ('the boy quickly ran home', 1),
                                                ('ran the boy home quickly the', 0),
                                                ('book the girl the read', 0)])
    }),
    'sst2': (glue_features(['sentence'], ['negative', 'positive']), {
        'validation': _pairs('sentence', None, [('a charming and moving film', 1),
                                                ('the plot is dull', 0),
                                                ('great acting throughout', 1),
                                                ('a waste of time', 0)])
    }),
    'mrpc': (glue_features(['sentence1', 'sentence2'], ['not_equivalent', 'equivalent']), {
        'validation': _pairs(
            'sentence1', 'sentence2',
            [('the company raised its prices', 'prices were raised by the company', 1),
             ('he left early', 'she arrived late', 0),
             ('the team won the match', 'the match was won by the team', 1),
             ('it rained all day', 'the sun was out', 0)])
    }),
    'qqp': (glue_features(['question1', 'question2'], ['not_duplicate', 'duplicate']), {
        'validation': _pairs('question1', 'question2',
                             [('how do i learn python', 'what is the best way to learn python', 1),
                              ('why is the sky blue', 'how tall is the tower', 0),
                              ('how can i sleep better', 'what helps me sleep better', 1),
                              ('what is a cat', 'where is the river', 0)])
    }),
    'stsb': (glue_features(['sentence1', 'sentence2'], None), {
        'validation': _pairs('sentence1', 'sentence2',
                             [('a man is playing a guitar', 'a man plays the guitar', 3.8),
                              ('a dog runs', 'a cat sleeps', 0.0),
                              ('the woman is cooking', 'a woman cooks food', 4.07),
                              ('two kids play', 'children are playing', 2.5)])
    }),
    'mnli': (glue_features(['premise', 'hypothesis'], MNLI), {
        'validation_matched': _pairs('premise', 'hypothesis', MNLI_M),
        'validation_mismatched': _pairs('premise', 'hypothesis', MNLI_MM)
    }),
    'mnli_matched': (glue_features(['premise', 'hypothesis'],
                                   MNLI), {'validation': _pairs('premise', 'hypothesis', MNLI_M)}),
    'mnli_mismatched': (glue_features(['premise', 'hypothesis'], MNLI),
                        {'validation': _pairs('premise', 'hypothesis', MNLI_MM)}),
    'qnli': (glue_features(['question', 'sentence'], ['entailment', 'not_entailment']), {
        'validation': _pairs('question', 'sentence',
                             [('where is the tower', 'the tower is in the city center', 0),
                              ('who wrote the book', 'the weather was cold', 1),
                              ('when did the war end', 'the war ended in the spring', 0),
                              ('what is the capital', 'bananas are yellow', 1)])
    }),
    'rte': (glue_features(['sentence1', 'sentence2'], ['entailment', 'not_entailment']), {
        'validation': _pairs('sentence1', 'sentence2',
                             [('the dog chased the ball in the park', 'a dog chased a ball', 0),
                              ('the meeting was moved to friday', 'the meeting was cancelled', 1),
                              ('she sold her old bike', 'she sold a bike', 0),
                              ('the river flooded the town', 'the town is dry', 1)])
    }),
    'wnli': (glue_features(['sentence1', 'sentence2'], ['not_entailment', 'entailment']), {
        'validation': _pairs(
            'sentence1', 'sentence2',
            [('the trophy did not fit in the suitcase because it was too big',
              'the trophy was too big', 1),
             ('the trophy did not fit in the suitcase because it was too small',
              'the trophy was too small', 0),
             ('john thanked bill because he had helped him', 'bill had helped john', 1),
             ('the fish ate the worm because it was hungry', 'the worm was hungry', 0)])
    }),
    'ax': (glue_features(['premise', 'hypothesis'], MNLI), {
        'test': _pairs('premise', 'hypothesis', [('the cat is on the mat', 'there is a cat', -1)])
    }),
}


def super_glue_features(config, text_keys, labels=BOOL):
  f = {k: Text() for k in text_keys}
  if config.startswith('wsc'):
    f.update(span1_index=np.int32, span2_index=np.int32)
  if config == 'wic':
    f.update(start1=np.int32, start2=np.int32, end1=np.int32, end2=np.int32)
  if config == 'multirc':
    f['idx'] = tfds.features.FeaturesDict(
        {'paragraph': np.int32, 'question': np.int32, 'answer': np.int32})
  elif config == 'record':
    f['idx'] = tfds.features.FeaturesDict({'passage': np.int32, 'query': np.int32})
  else:
    f['idx'] = np.int32
  if config == 'record':
    f.update(entities=tfds.features.Sequence(Text()), answers=tfds.features.Sequence(Text()))
  else:
    f['label'] = Label(names=labels)
  return f


def _multirc(p, q, a, paragraph, question, answer, label):
  return {
      'paragraph': paragraph, 'question': question, 'answer': answer, 'label': label,
      'idx': {'paragraph': p, 'question': q, 'answer': a}
  }


def _record(p, q, passage, query, entities, answers):
  return {
      'passage': passage, 'query': query, 'entities': entities, 'answers': answers,
      'idx': {'passage': p, 'query': q}
  }


def _wic(i, word, s1, s2, label):
  return {
      'word': word, 'sentence1': s1, 'sentence2': s2, 'start1': 0, 'start2': 0, 'end1': 1,
      'end2': 1, 'idx': i, 'label': label
  }


def _wsc(i, text_, span1, i1, span2, i2, label):
  return {
      'text': text_, 'span1_text': span1, 'span1_index': i1, 'span2_text': span2, 'span2_index': i2,
      'idx': i, 'label': label
  }


TOM = 'Tom has a red bike.<br>He rides it to <b>school</b> every day.'
SUPER_GLUE_DATA = {
    'boolq': (super_glue_features('boolq', ['question', 'passage']), {
        'validation': _pairs(
            'passage', 'question',
            [('the river flows through the city and into the sea',
              'does the river flow into the sea', 1),
             ('the museum is closed on mondays', 'is the museum open on mondays', 0),
             ('cats are mammals', 'is a cat a mammal', 1),
             ('the bridge was built of wood', 'is the bridge made of steel', 0)])
    }),
    'cb':
        (super_glue_features('cb', ['premise', 'hypothesis'],
                             ['entailment', 'contradiction', 'neutral']),
         {
             'validation': _pairs('premise', 'hypothesis',
                                  [('it is raining heavily', 'it is raining', 0),
                                   ('the shop is empty', 'the shop is full of people', 1),
                                   ('he went to the party', 'he enjoyed the party', 2),
                                   ('the door is locked', 'the door is closed', 0)])
         }),
    'copa':
        (super_glue_features('copa', ['premise', 'choice1', 'choice2', 'question'],
                             ['choice1', 'choice2']),
         {
             'validation': [{
                 'premise': p, 'choice1': c1, 'choice2': c2, 'question': q, 'label': l, 'idx': i
             } for i, (p, c1, c2, q, l) in enumerate([(
                 'the man broke his toe',
                 'he dropped a hammer on his foot',
                 'he got a hole in his sock',
                 'cause',
                 0), ('the sun rose', 'the night began', 'the day began', 'effect',
                      1), ('the glass fell', 'it broke', 'it sang', 'effect',
                           0), ('she was thirsty', 'she ate bread', 'she drank water', 'effect',
                                1)])]
         }),
    # Question 0 of paragraph 0 and question 0 of paragraph 1 are different questions.
    'multirc': (super_glue_features('multirc', ['paragraph', 'question', 'answer']), {
        'validation': [
            _multirc(0, 0, 0, TOM, 'what does tom ride', 'a red bike', 1),
            _multirc(0, 0, 1, TOM, 'what does tom ride', 'a bus', 0),
            _multirc(0, 0, 2, TOM, 'what does tom ride', 'his bike', 1),
            _multirc(1, 0, 0, 'Ann lives near the lake.', 'where does ann live', 'near the lake',
                     1),
            _multirc(1, 0, 1, 'Ann lives near the lake.', 'where does ann live', 'in the desert', 0)
        ]
    }),
    'record': (super_glue_features('record', ['passage', 'query', 'entities', 'answers']), {
        'train': [
            _record(9, 0, 'Oslo is in Norway.', '@placeholder is a city', ['Oslo', 'Norway'],
                    ['Oslo', 'Norway']),
            _record(9, 1, 'No answer here.', '@placeholder is missing', ['here'], [])
        ], 'validation': [
            _record(0, 0, 'The summit was held in Paris.\n@highlight\nLeaders met in Paris',
                    'The meeting took place in @placeholder', ['Paris', 'Leaders'], ['Paris']),
            _record(1, 1, 'A storm hit Berlin\n@highlight\nThe city was flooded',
                    '@placeholder was flooded', ['Berlin', 'the Berlin city'],
                    ['Berlin', 'the Berlin city']),
            _record(2, 2, 'Rome is old.', '@placeholder is old', ['Rome'], ['Rome'])
        ]
    }),
    'rte':
        (super_glue_features('rte', ['premise', 'hypothesis'], ['entailment', 'not_entailment']), {
            'validation': _pairs(
                'premise',
                'hypothesis', [('the dog chased the ball in the park', 'a dog chased a ball', 0),
                               ('the meeting was moved to friday', 'the meeting was cancelled', 1),
                               ('she sold her old bike', 'she sold a bike', 0),
                               ('the river flooded the town', 'the town is dry', 1)])
        }),
    'wic': (super_glue_features(
        'wic', ['word', 'sentence1', 'sentence2', 'start1', 'start2', 'end1', 'end2']), {
            'validation': [
                _wic(0, 'bank', 'he sat on the bank of the river',
                     'she went to the bank to get money', 0),
                _wic(1, 'run', 'i run every morning', 'they run to the shop', 1),
                _wic(2, 'light', 'the box is light', 'turn on the light', 0),
                _wic(3, 'play', 'the kids play outside', 'we play in the garden', 1)
            ]
        }),
    'wsc.fixed':
        (super_glue_features('wsc.fixed',
                             ['text', 'span1_index', 'span2_index', 'span1_text', 'span2_text']),
         {
             'validation': [
                 _wsc(
                     0, 'The city councilmen refused the demonstrators a permit because they '
                     'feared violence .', 'The city councilmen', 0, 'they', 9, 1),
                 _wsc(1, 'The trophy would not fit in the suitcase because it was too small .',
                      'the suitcase', 6, 'it', 9, 1),
                 _wsc(2, 'He said that Bob was tired .', 'Bob', 3, 'He', 0, 0)
             ]
         }),
}


def _squad(i, context, question, answers):
  return {
      'id': f'q{i}', 'title': 'Title', 'context': context, 'question': question,
      'answers': {'text': answers, 'answer_start': [0] * len(answers)}
  }


SQUAD_FEATURES = {
    'id': np.str_, 'title': Text(), 'context': Text(), 'question': Text(),
    'answers': tfds.features.Sequence({'text': Text(), 'answer_start': np.int32})
}
SQUAD_DATA = {
    'train': [_squad(9, 'Oslo is a city.', 'What is Oslo?', ['a city'])], 'validation': [
        _squad(0, 'The Broncos beat the Panthers, 24-10, to win Super Bowl 50.',
               'Who won Super Bowl 50?', ['Broncos', 'the Denver Broncos']),
        _squad(1, 'The army had 1,000 soldiers in 1805.', 'How many soldiers did the army have?',
               ['1,000 soldiers', '1,000']),
        _squad(2, 'Paris is the capital of France.', 'What is the capital of France?', ['Paris'])
    ]
}
CNN_FEATURES = {k: Text() for k in ('article', 'highlights', 'publisher', 'id')}
CNN_DATA = {
    'validation': [{
        'article': 'The mayor opened a new park on Sunday. Children played all day.',
        'highlights': 'Mayor opens new park.\nChildren play all day.', 'publisher': 'cnn', 'id': 'a'
    }, {
        'article': 'It was sunny.', 'highlights': 'the cat sat on the mat', 'publisher': 'dm',
        'id': 'b'
    }]
}
EN = ('The house is very small today', 'I like green apples')
WMT_DATA = {  # (dataset, config) -> (language, the translations of EN)
    ('wmt14_translate', 'de-en'): ('de', ('Das Haus ist heute sehr klein',
                                          'Ich mag gruene Aepfel')),
    ('wmt14_translate', 'fr-en'): ('fr', ('La maison est tres petite aujourdhui',
                                          'J aime les pommes vertes')),
    ('wmt16_translate', 'ro-en'): ('ro', ('Casa este foarte mica astazi',
                                          'Imi plac merele verzi')),
}


class _StandIn(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generates DATA[config] = (features, {split: examples}); subclasses name the dataset."""
  DATA: dict = {}

  def _data(self):
    return self.DATA[self.builder_config.name if self.builder_config else None]

  def _info(self):
    features = self._data()[0]
    if isinstance(features, dict):
      features = tfds.features.FeaturesDict(features)
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(rows) for split, rows in self._data()[1].items()}

  def _generate_examples(self, rows):
    for i, row in enumerate(rows):
      yield i, row


def _configs(names, version):
  return [tfds.core.BuilderConfig(name=n, version=version) for n in names]


class Glue(_StandIn, skip_registration=True):
  DATA = GLUE_DATA
  BUILDER_CONFIGS = _configs(GLUE_DATA, '2.0.0')


class SuperGlue(_StandIn, skip_registration=True):
  DATA = SUPER_GLUE_DATA
  BUILDER_CONFIGS = _configs(SUPER_GLUE_DATA, '1.0.2')


class Squad(_StandIn, skip_registration=True):
  DATA = {'v1.1': (SQUAD_FEATURES, SQUAD_DATA)}
  BUILDER_CONFIGS = _configs(DATA, '3.0.0')


class CnnDailymail(_StandIn, skip_registration=True):
  VERSION = tfds.core.Version('3.4.0')
  DATA = {None: (CNN_FEATURES, CNN_DATA)}


def _wmt_data(year):
  out = {}
  for (name, config), (lang, rows) in WMT_DATA.items():
    if name == f'wmt{year}_translate':
      out[config] = (tfds.features.Translation(languages=(lang, 'en')),
                     {'validation': [{'en': en, lang: x} for en, x in zip(EN, rows)]})
  return out


class Wmt14Translate(_StandIn, skip_registration=True):
  DATA = _wmt_data(14)
  BUILDER_CONFIGS = _configs(DATA, '1.0.0')


class Wmt16Translate(_StandIn, skip_registration=True):
  DATA = _wmt_data(16)
  BUILDER_CONFIGS = _configs(DATA, '1.0.0')


@pytest.fixture(scope='module', autouse=True)
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  for builder in (Glue, SuperGlue, Squad, Wmt14Translate, Wmt16Translate):
    for config in builder.BUILDER_CONFIGS:
      builder(config=config.name, data_dir=data_dir,
              file_format='array_record').download_and_prepare()
  CnnDailymail(data_dir=data_dir, file_format='array_record').download_and_prepare()
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('TFDS_DATA_DIR', data_dir)
    yield data_dir


# --- the cases: one known example per task, and a wrong prediction set scored by hand -----------


@dataclasses.dataclass
class Case:
  inputs: str  # the known example's formatted inputs ...
  targets: str  # ... and target, before tokenization
  post: object  # its target after detokenization and postprocessing
  wrong: dict  # {text in an example's input: prediction}; the other examples are right
  wrong_metrics: dict  # what `wrong` scores (by hand); perfect predictions score 100 on each
  split: str = 'validation'


BIKE = ('multirc question: what does tom ride answer: a red bike paragraph: Tom has a red bike. '
        'He rides it to school every day.')
CASES = {
    # CoLA: TP=2 TN=1 FP=1 FN=0 (acceptable = positive): MCC = (2*1 - 1*0) / sqrt(3*2*2*1).
    'glue_cola_v002': Case('cola sentence: the book was read by the girl', 'acceptable', 1,
                           {'ran the boy': 'acceptable'},
                           {'matthews_corrcoef': 100 * 2 / math.sqrt(12)}),
    # 'neutral' is no SST-2 label: -1, wrong.
    'glue_sst2_v002': Case('sst2 sentence: a charming and moving film', 'positive', 1,
                           {'dull': 'neutral'}, {'accuracy': 75.0}),
    # One of two positives missed: TP=1 FN=1 FP=0, F1 = 2/3.
    'glue_mrpc_v002': Case(
        'mrpc sentence1: the company raised its prices sentence2: prices were '
        'raised by the company', 'equivalent', 1, {'the team won': 'not_equivalent'},
        {'f1': 200 / 3, 'accuracy': 75.0}),
    # A false positive and an invalid answer on a positive: TP=1 FP=1 FN=1, F1 = 2/4.
    'glue_qqp_v002': Case(
        'qqp question1: how do i learn python question2: what is the best way to '
        'learn python', 'duplicate', 1, {'sky blue': 'duplicate', 'sleep better': 'yes'},
        {'f1': 50.0, 'accuracy': 50.0}),
    # Targets 3.8, 0.0, 4.0 (4.07), 2.4 (2.5: half to even); 3.8 and 4.0 swapped: Pearson
    # = sum(dt*dp) / sum(dt^2) = 10.15 / 10.19 (means 2.55); Spearman 1 - 6*2 / (4*15) = 0.8.
    'glue_stsb_v002': Case(
        'stsb sentence1: a man is playing a guitar sentence2: a man plays the '
        'guitar', '3.8', 3.8, {'the woman is cooking': '3.8', 'a man is playing': '4.0'},
        {'pearson_corrcoef': 100 * 10.15 / 10.19, 'spearman_corrcoef': 80.0}),
    'glue_mnli_v002': Case(
        'mnli hypothesis: a person is resting premise: a man is sleeping on a '
        'couch', 'entailment', 0, {'kids are asleep': 'neutral'}, {'accuracy': 200 / 3},
        split='validation_matched'),
    'glue_mnli_matched_v002': Case(
        'mnli hypothesis: a person is resting premise: a man is '
        'sleeping on a couch', 'entailment', 0, {'kids are asleep': 'neutral'},
        {'accuracy': 200 / 3}),
    'glue_mnli_mismatched_v002': Case(
        'mnli hypothesis: music was played premise: the band played '
        'loudly', 'entailment', 0, {'red car': 'contradiction'}, {'accuracy': 200 / 3}),
    'glue_qnli_v002': Case(
        'qnli question: where is the tower sentence: the tower is in the city '
        'center', 'entailment', 0, {'bananas': 'entailment'}, {'accuracy': 75.0}),
    'glue_rte_v002': Case(
        'rte sentence1: the dog chased the ball in the park sentence2: a dog '
        'chased a ball', 'entailment', 0, {'the meeting': 'entailment'}, {'accuracy': 75.0}),
    'glue_wnli_v002': Case(
        'wnli sentence1: the trophy did not fit in the suitcase because it was '
        'too big sentence2: the trophy was too big', 'entailment', 1,
        {'the worm was hungry': 'entailment'}, {'accuracy': 75.0}),
    'glue_ax_v002': Case('mnli hypothesis: there is a cat premise: the cat is on the mat', '<unk>',
                         -1, {}, {}, split='test'),
    'super_glue_boolq_v102': Case(
        'boolq passage: the river flows through the city and into the '
        'sea question: does the river flow into the sea', 'True', 1, {'museum': 'True'},
        {'accuracy': 75.0}),
    # Classes 0/1/2: F1 4/5 (TP 2, FP 1), 1, 0 (the neutral one missed): mean 0.6.
    'super_glue_cb_v102': Case('cb hypothesis: it is raining premise: it is raining heavily',
                               'entailment', 0, {'enjoyed the party': 'entailment'},
                               {'macro_f1': 60.0, 'accuracy': 75.0}),
    'super_glue_copa_v102': Case(
        'copa choice1: he dropped a hammer on his foot choice2: he got a '
        'hole in his sock premise: the man broke his toe question: cause', 'choice1', 0,
        {'the glass fell': 'choice2'}, {'accuracy': 75.0}),
    # Values [1,0,1 | 1,0], predicted [1,0,1 | 0,0]: F1 over answers 2*2/(2*2+1) = 0.8; exact
    # match per question (paragraph, question): 100 and 0 (grouped by question index alone the
    # two would be one question: 0).
    'super_glue_multirc_v102': Case(BIKE, 'True', {'value': 1, 'group':
        (0, 0)}, {'answer: near the lake': 'False'}, {'f1': 80.0, 'exact_match': 50.0}),
    # 'Paris France' vs 'Paris': EM 0, F1 2/3; 'Berlin city' is the second answer 'the Berlin
    # city' (EM 1; against the first alone it would be EM 0, F1 2/3); Rome right.
    'super_glue_record_v102': Case(
        'record query: The meeting took place in @placeholder entities: Paris, Leaders passage: '
        'The summit was held in Paris. Leaders met in Paris', 'Paris', ['Paris'],
        {'Leaders met': 'Paris France', 'storm hit': 'Berlin city'},
        {'em': 200 / 3, 'f1': 100 * (2 / 3 + 1 + 1) / 3}),
    'super_glue_rte_v102': Case(
        'rte hypothesis: a dog chased a ball premise: the dog chased the '
        'ball in the park', 'entailment', 0, {'the meeting': 'entailment'}, {'accuracy': 75.0}),
    'super_glue_wic_v102': Case(
        'wic sentence1: he sat on the bank of the river sentence2: she '
        'went to the bank to get money word: bank', 'False', 0, {'word: light': 'True'},
        {'accuracy': 75.0}),
    'super_glue_wsc_v102': Case(
        'wsc text: * The city councilmen * refused the demonstrators a '
        'permit because # they # feared violence .', 'True', 1, {'Bob': 'True'},
        {'accuracy': 200 / 3}),
    # Padded punctuation. 'Denver Broncos' = the second answer without its article (EM 1);
    # '1 , 000' = the second answer (EM 1); 'Paris France' vs 'Paris': EM 0, F1 2/3.
    'squad_v010_allanswers': Case(
        'question: Who won Super Bowl 50 ? context: The Broncos beat the Panthers , 24 - 10 , to '
        'win Super Bowl 50 .', 'Broncos', ['Broncos', 'the Denver Broncos'], {
            'Super Bowl': 'Denver Broncos', 'soldiers did': '1 , 000',
            'capital of France': 'Paris France'
        }, {'em': 200 / 3, 'f1': 100 * (1 + 1 + 2 / 3) / 3}),
    # 'the cat sat' vs 'the cat sat on the mat': ROUGE-1 P 1, R 1/2 -> 2/3; ROUGE-2 P 1, R 2/5
    # -> 4/7; LCS 3 -> 2/3 (one sentence: Lsum = L); the other summary is right (1).
    'cnn_dailymail_v002': Case(
        'summarize: The mayor opened a new park on Sunday. Children played all day.',
        'Mayor opens new park.\nChildren play all day.',
        'Mayor opens new park. Children play all day.', {'It was sunny': 'the cat sat'}, {
            'rouge1': 50 * (1 + 2 / 3), 'rouge2': 50 * (1 + 4 / 7), 'rougeL': 50 * (1 + 2 / 3),
            'rougeLsum': 50 * (1 + 2 / 3)
        }),
    # One sentence cut by its last word, the other right: every n-gram precision is 1, BLEU is
    # the brevity penalty exp(1 - reference length / output length).
    'wmt14_ende_v003': Case('translate English to German: The house is very small today',
                            'Das Haus ist heute sehr klein', 'Das Haus ist heute sehr klein',
                            {'The house': 'Das Haus ist heute sehr'},
                            {'bleu': 100 * math.exp(1 - 10 / 9)}),
    'wmt14_enfr_v003': Case('translate English to French: The house is very small today',
                            'La maison est tres petite aujourdhui',
                            'La maison est tres petite aujourdhui',
                            {'The house': 'La maison est tres petite'},
                            {'bleu': 100 * math.exp(1 - 11 / 10)}),
    'wmt16_enro_v003': Case('translate English to Romanian: The house is very small today',
                            'Casa este foarte mica astazi', 'Casa este foarte mica astazi',
                            {'The house': 'Casa este foarte mica'},
                            {'bleu': 100 * math.exp(1 - 9 / 8)}),
}
SCORED = [n for n, c in CASES.items() if c.wrong_metrics]
INPUTS, TARGETS, BATCH = 128, 32, 8


@functools.lru_cache(maxsize=1)
def _mesh():
  return partitioning.make_mesh(config_lib.validate(_config('validation'), 8))


def _config(split):
  c = config_lib.base_config()
  c.model.vocab_size = 2048
  c.data.update(inputs_length=INPUTS, targets_length=TARGETS)  # data.vocabulary: embedded
  c.train.batch_size = BATCH
  c.eval.update(batch_size=BATCH, split=split)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  return c


class Oracle(evaluator_lib.Evaluator):
  """The evaluator with `predict(input text, target text) -> prediction text` as the model."""

  def __init__(self, name, split, predict):
    c = _config(split)
    super().__init__(c, None, _mesh(), c.partitioning.rules, tasks=[name], verbose=False)
    self.predict = predict
    found = self.task_lengths(self.tasks[0])  # the lengths the evaluator reads the task at
    lengths = {'inputs': found.inputs, 'targets': found.targets}
    it = pipeline.make_task_iterator(name, feature_lengths=lengths, global_batch_size=BATCH, seed=0,
                                     pack=False, split=split, shuffle=False, repeat=False,
                                     vocabulary=self.vocabulary, process_index=0, process_count=1)
    v = self.vocabulary
    self.targets = {
        v.decode(i): v.decode(t) for b in it
        for i, t in zip(b['encoder_input_tokens'], b['decoder_target_tokens']) if t.any()
    }

  def decode_rows(self, params, local_inputs, batch_number, decode_cfg):
    v = self.vocabulary
    out = np.zeros((len(local_inputs), decode_cfg.max_decode_length), np.int32)
    for r, row in enumerate(local_inputs):
      if row.any():
        text = v.decode(row)
        ids = list(v.encode(self.predict(text, self.targets[text]))) + [v.eos_id]
        out[r, :len(ids)] = ids
    return out


@functools.lru_cache(maxsize=None)
def evaluate(name, wrong=False) -> evaluator_lib.TaskResult:
  case = CASES[name]

  def predict(inputs, target):
    return next((p for key, p in case.wrong.items() if wrong and key in inputs), target)

  ev = Oracle(name, case.split, predict)
  return ev.evaluate_task(ev.tasks[0], params=None)


# --- tests ----------------------------------------------------------------------------------------


def test_every_registered_public_task_has_a_case_and_t5s_vocabulary_declared_lazily():
  registered = {b.task for b in glue.GLUE + glue.SUPER_GLUE}
  registered |= {'squad_v010_allanswers', 'cnn_dailymail_v002'}
  registered |= {name for name, *_ in public.WMT_TASKS}
  assert registered == set(CASES)
  for name in CASES:
    feature = tasks.get_task(name).output_features['targets']
    assert feature._vocabulary.args == (catalog.T5_SPM_PATH,)  # not loaded: no network


@pytest.mark.parametrize('module', [
    'catalog.public', 'catalog.glue', 'catalog.downstream', 'catalog.pretraining', 'catalog.common'
])
def test_each_module_can_be_imported_first(module):
  # No catalog module needs another to have been imported first; any of them may come first.
  # Compared with a fresh process importing the catalog first (this process's registry may hold
  # tasks that other tests registered).
  def names_after_importing(first):
    code = f'import t5lite.data.{first}; from t5lite.data import tasks; print(sorted(tasks.names()))'
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True).stdout

  expected = names_after_importing('catalog')
  assert 'glue_sst2_v002' in expected and 'wmt16_enro_v003' in expected
  assert names_after_importing(module) == expected


@pytest.mark.parametrize('name', list(CASES))
def test_known_example_format_end_to_end(name):
  case, task = CASES[name], tasks.get_task(name)
  # Before tokenization: exactly one example of the split formats to the expected strings.
  formatted = [task.preprocessors[0](ex, None) for ex in task.source.get(case.split)]
  assert [f['targets'] for f in formatted if f['inputs'] == case.inputs
         ] == [case.targets], ([f['inputs'] for f in formatted])
  # Through the pipeline and the evaluator: decoded tokens and the postprocessed target.
  v = vocab_lib.embedded_vocabulary()
  result = evaluate(name)
  assert result.num_examples == len(formatted)
  i = result.inputs.index(v.decode(v.encode(case.inputs)))
  assert result.targets[i] == case.post
  if result.raw_predictions:  # the oracle predicted the decoded target
    assert result.raw_predictions[i] == v.decode(v.encode(case.targets))


@pytest.mark.parametrize('name', SCORED)
def test_metrics_perfect_and_hand_computed(name):
  case = CASES[name]
  perfect = evaluate(name).metrics
  assert set(perfect) == set(case.wrong_metrics)
  assert perfect == pytest.approx({k: 100.0 for k in perfect}, rel=1e-9)
  assert evaluate(name, wrong=True).metrics == pytest.approx(case.wrong_metrics, rel=1e-6)


def test_ax_is_unscored_and_unlabelled():
  task = tasks.get_task('glue_ax_v002')
  assert task.metric_fns == [] and task.splits == ('test',)
  assert evaluate('glue_ax_v002').metrics == {}


def test_record_trains_on_one_example_per_answer():
  task = tasks.get_task('super_glue_record_v102')
  train = task.source.get('train')
  assert task.num_examples('train') == len(train) == 3  # answers Oslo, Norway; none -> <unk>
  assert sorted(task.preprocessors[0](ex)['targets'] for ex in train) == ['<unk>', 'Norway', 'Oslo']
  assert task.num_examples('validation') == 3  # one per query


def test_postprocessors_and_formats_by_hand():
  label = functools.partial(common.string_label_to_class_id, label_classes=BOOL)
  assert [label(x) for x in ('True', ' False ', 'true', '')] == [1, 0, -1, -1]
  assert [common.string_to_float(x) for x in ('3.8', ' 2 ', 'x')] == [3.8, 2.0, -1.0]
  assert [glue.stsb_target(x) for x in (0.0, 2.5, 3.8, 4.07, 4.9, 5.0)
         ] == ['0.0', '2.4', '3.8', '4.0', '4.8', '5.0']  # 2.5*5 = 12.5 -> 12, 4.9*5 = 24.5 -> 24
  assert public.pad_punctuation(' "Hi," she said.  ') == '" Hi , " she said .'
  # WSC with the pronoun before the noun: no shift of the pronoun's index.
  assert glue.wsc_format(SUPER_GLUE_DATA['wsc.fixed'][1]['validation'][2]) == {
      'inputs': 'wsc text: # He # said that * Bob * was tired .', 'targets': 'False'
  }
  # QA targets without their example: the target's own answer is the one reference.
  assert public.squad_postprocess('x', is_target=True) == ['x']
  assert glue.record_postprocess('x', is_target=True) == ['x']
  assert glue.record_postprocess('x') == 'x'
  with pytest.raises(ValueError, match='need their example'):
    glue.multirc_postprocess('True', is_target=True)
  assert glue.multirc_postprocess('maybe') == {'value': -1}


def test_benchmark_scores_from_the_task_results():
  glue_names = [n for n in SCORED if n.startswith('glue_') and n != 'glue_mnli_v002']
  sg_names = [n for n in SCORED if n.startswith('super_glue_')]
  assert glue.glue_scores({n: evaluate(n) for n in glue_names})['glue_average'] == 100.0
  assert glue.superglue_scores({n: evaluate(n) for n in sg_names})['superglue_average'] == 100.0
  got = glue.glue_scores({n: evaluate(n, True).metrics for n in glue_names})
  expected = {
      'cola': 100 * 2 / math.sqrt(12), 'sst2': 75, 'mrpc': (200 / 3 + 75) / 2,
      'stsb': (100 * 10.15 / 10.19 + 80) / 2, 'qqp': 50, 'mnli': 200 / 3, 'qnli': 75, 'rte': 75,
      'wnli': 75
  }
  expected['glue_average'] = sum(expected.values()) / 9
  assert got == pytest.approx(expected)
  got = glue.superglue_scores({n: evaluate(n, True) for n in sg_names})
  expected = {
      'boolq': 75, 'cb': (60 + 75) / 2, 'copa': 75, 'multirc': (80 + 50) / 2,
      'record': (200 / 3 + 100 * 8 / 9) / 2, 'rte': 75, 'wic': 75, 'wsc': 200 / 3
  }
  expected['superglue_average'] = sum(expected.values()) / 8
  assert got == pytest.approx(expected)


def test_mixtures_weight_training_tasks_as_t5():
  rates = dict((t.name, r) for t, r in tasks.get_mixture('glue_v002_proportional').leaf_rates())
  assert set(rates) == set(glue.GLUE_RATES) and 'glue_wnli_v002' not in rates
  assert rates['glue_mnli_v002'] == pytest.approx(392_702 / sum(glue.GLUE_RATES.values()))
  rates = dict(
      (t.name, r) for t, r in tasks.get_mixture('super_glue_v102_proportional').leaf_rates())
  assert set(rates) == {b.task for b in glue.SUPER_GLUE}
