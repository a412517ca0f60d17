"""docs/configs.md's field reference is generated from the config declarations and cannot drift."""
import dataclasses

from t5lite import config as config_lib
from t5lite import config_docs, fields

REGENERATE = 'python -m t5lite.config_docs --update-docs'


def test_configs_md_matches_the_declarations():
  with open(config_docs.DOCS_PATH) as f:
    text = f.read()
  assert config_docs.docs_with_reference(text) == text, (
      'docs/configs.md differs from the config declarations (t5lite/config.py, '
      f't5lite/models/presets.py): run `{REGENERATE}` and commit the result')


def test_every_section_field_is_documented_where_it_is_declared():
  for section, cls in config_lib.SECTIONS.items():
    if section == 'model':
      continue  # ModelConfig (t5lite/models/presets.py) documents its own fields
    for doc in fields.describe(cls):
      assert doc.doc.strip(), f'config.{section}.{doc.name} has no documentation'
  top = [f for f in dataclasses.fields(config_lib.RunConfig) if f.name not in config_lib.SECTIONS]
  assert [f.name for f in top] == ['keep_host_memory', 'imports']
  assert all(f.metadata.get(fields.DOC) for f in top)


def test_reference_lists_every_field():
  text = config_docs.reference_markdown()
  for section, names in config_lib._declared().items():  # pylint: disable=protected-access
    if names is None:
      assert f'| `{section}` |' in text
      continue
    assert f'### `{section}`' in text
    if section == 'model':
      continue  # the preset's keys; ModelConfig's own list is what the reference shows
    for name in names:
      assert f'| `{name}` |' in text, f'{section}.{name}'


def test_the_command_prints_the_reference():
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  out = subprocess.run([sys.executable, '-m', 't5lite.config_docs', '--markdown'],
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout == config_docs.reference_markdown()
