"""The package's layering (docs/architecture.md), read from the source: no import cycles, no
import from a lower layer to a higher one, the task registry never loads its catalog, no job
imports another. Every import statement counts, including those inside functions.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 't5lite'

# Bottom up; a module belongs to the first pattern that matches it (a pattern ending in '.*' takes
# the package and everything under it). The same table stands in docs/architecture.md.
LAYERS = (
    ('jobs', ('t5lite.train', 't5lite.eval', 't5lite.infer', 't5lite.convert', 't5lite.aot',
              't5lite.launch.*', 't5lite.data.inspect', 't5lite.data.train_vocab')),
    ('foundation', ('t5lite', 't5lite.fields', 't5lite.logs', 't5lite.metrics', 't5lite.losses',
                    't5lite.data.*', 't5lite.partitioning', 't5lite.multihost', 't5lite.workdir',
                    't5lite.files', 't5lite.reporting', 't5lite.optim', 't5lite.host_memory',
                    't5lite.checks', 't5lite.distributed', 't5lite.vocab_expansion')),
    ('models and checkpoints',
     ('t5lite.models.*', 't5lite.checkpoints', 't5lite.checkpoint_integrity', 't5lite.init_from',
      't5lite.hf', 't5lite.hf_files', 't5lite.lora_export', 't5lite.t5x')),
    ('training and evaluation', ('t5lite.trainer', 't5lite.distill', 't5lite.evaluation.*')),
    ('configuration and command line',
     ('t5lite.config', 't5lite.config_eval', 't5lite.config_rules', 't5lite.config_files',
      't5lite.config_docs', 't5lite.cli')),
)
# Rank of each layer name: 'jobs' is listed first only so that the data tools match before
# 't5lite.data.*'; it is the top layer.
RANK = {
    'foundation': 1, 'models and checkpoints': 2, 'training and evaluation': 3,
    'configuration and command line': 4, 'jobs': 5
}


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def all_modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The t5lite modules that `name` imports anywhere in its file."""
  is_package = path.name == '__init__.py'
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from . import x / from .y import z
        anchor = name.split('.') if is_package else name.split('.')[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = '.'.join(anchor + ([base] if base else []))
      # `from pkg import mod` imports the module pkg.mod when there is one, else names of pkg.
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in known:  # `import t5lite.data.tasks as x` etc.
        target = target.rpartition('.')[0]
      if target and target != name and target.startswith('t5lite'):
        found.add(target)
  return found


def layer_of(module: str) -> str:
  for layer, patterns in LAYERS:
    for pattern in patterns:
      if pattern.endswith('.*'):
        prefix = pattern[:-2]
        if module == prefix or module.startswith(prefix + '.'):
          return layer
      elif module == pattern:
        return layer
  raise AssertionError(f'{module} is in no layer: add it to LAYERS here and in '
                       'docs/architecture.md')


def import_graph() -> dict[str, set[str]]:
  modules = all_modules()
  return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  problems = []
  for module, targets in sorted(graph.items()):
    for target in sorted(targets):
      if RANK[layer_of(target)] > RANK[layer_of(module)]:
        problems.append(f'{module} ({layer_of(module)}) imports {target} ({layer_of(target)})')
  return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_checker_finds_cycles_and_upward_imports():
  graph = {
      't5lite.metrics': {'t5lite.config'}, 't5lite.config': {'t5lite.cli'},
      't5lite.cli': {'t5lite.config'}
  }
  assert cycles(graph) == [['t5lite.cli', 't5lite.config']]
  assert upward_imports(graph) == [
      't5lite.metrics (foundation) imports t5lite.config (configuration and command line)'
  ]
  assert cycles({'a': {'b'}, 'b': set()}) == []


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
  source = ('import t5lite.data.tasks as T\nfrom t5lite import config\n'
            'def f():\n  from t5lite.data import catalog\n  from . import pipeline\n')
  path = tmp_path / 'mod.py'
  path.write_text(source)
  known = {
      't5lite', 't5lite.data', 't5lite.data.tasks', 't5lite.config', 't5lite.data.catalog',
      't5lite.data.pipeline', 't5lite.data.mod'
  }
  assert imports_of('t5lite.data.mod', path, known) == {
      't5lite.data.tasks', 't5lite.config', 't5lite.data.catalog', 't5lite.data.pipeline'
  }


def test_every_module_has_a_layer():
  for module in all_modules():
    layer_of(module)


def test_no_import_cycles():
  found = cycles(import_graph())
  assert not found, 'import cycles: ' + '; '.join(' <-> '.join(c) for c in found)


def test_no_import_points_to_a_higher_layer():
  problems = upward_imports(import_graph())
  assert not problems, 'upward imports:\n' + '\n'.join(problems)


def test_the_task_registry_never_loads_the_catalog():
  graph = import_graph()
  offenders = [
      f'{m} imports {t}' for m, targets in graph.items() for t in targets
      if t.startswith('t5lite.data.catalog') and m.startswith('t5lite.data')
      and not m.startswith('t5lite.data.catalog') and layer_of(m) != 'jobs'
  ]
  assert not offenders, '\n'.join(offenders)


@pytest.mark.parametrize('module', ['t5lite.models', 't5lite.trainer', 't5lite.evaluation'])
def test_lower_rooms_know_nothing_of_config_or_jobs(module):
  graph = import_graph()
  bad = {'t5lite.config', 't5lite.cli'} | {m for m in graph if layer_of(m) == 'jobs'}
  offenders = [
      f'{m} imports {t}' for m, targets in graph.items()
      if m == module or m.startswith(module + '.') for t in targets & bad
  ]
  assert not offenders, '\n'.join(offenders)


def test_no_job_imports_another():
  graph = import_graph()
  jobs = {m for m in graph if layer_of(m) == 'jobs'}
  offenders = [
      f'{m} imports {t}' for m in jobs for t in graph[m] & jobs
      if not (m.startswith('t5lite.launch') and t.startswith('t5lite.launch'))
  ]
  assert not offenders, '\n'.join(offenders)
