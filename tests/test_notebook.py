"""docs/notebooks/quickstart.ipynb runs from an installed t5lite, as in a fresh Colab runtime.

The notebook is the README's pretrain -> fine-tune -> evaluate -> infer story through the Python
API, with three plots. What Colab has is an installed package and no checkout, so the test builds
a wheel from this checkout, installs it into a new venv and executes the notebook in a kernel of
that venv, from a folder outside the checkout: a config read from a checkout path, or a module
missing from the wheel, fails here. T5LITE_NOTEBOOK_STEPS shrinks every step count.

The heavy dependencies (jax, flax, ...) are not installed again: the new venv sees the outer
environment's site-packages through a .pth file that names the folder. Python does not read the
.pth files inside a folder named that way, so the checkout's editable install (a .pth import hook
there) stays off, and `t5lite` can only come from the wheel; the test checks that it did.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'docs', 'notebooks', 'quickstart.ipynb')
# What a build of the package reads (those that exist are copied).
SOURCES = ('setup.py', 'setup.cfg', 'pyproject.toml', 'MANIFEST.in', 'README.md', 'LICENSE',
           't5lite', 'configs')
KERNEL = 't5lite-test-venv'

# Appended to the executed copy: which files the kernel's t5lite modules came from.
WHERE_FROM = '''import json, sys
print(json.dumps({'prefix': sys.prefix, 'files': sorted(
    m.__file__ for name, m in list(sys.modules.items())
    if name.split('.')[0] == 't5lite' and getattr(m, '__file__', None))}))'''


def _copy_sources(dest):
  """The checkout's package sources, without build leftovers, in `dest` (a build writes build/
  and *.egg-info next to setup.py: not into the checkout that other runs share)."""
  os.makedirs(dest)
  for name in SOURCES:
    source = os.path.join(REPO, name)
    if not os.path.exists(source):
      continue
    if os.path.isdir(source):
      shutil.copytree(source, os.path.join(dest, name),
                      ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    else:
      shutil.copy(source, dest)
  return dest


def _venv(path):
  """A new venv whose site-packages also sees this environment's (for jax, ipykernel, ...)."""
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', path], check=True)
  python = os.path.join(path, 'bin', 'python')
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        check=True, capture_output=True, text=True).stdout.strip()
  # This interpreter's package folders (a venv's, a user site): not the checkout, which pytest
  # or an old-style editable install may have put on sys.path.
  outer = [p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')]
  assert outer, sys.path
  with open(os.path.join(site, 'outer_environment.pth'), 'w') as f:
    f.write(''.join(p + '\n' for p in outer))
  return python


def _kernel(tmp_path, monkeypatch, python):
  """A kernelspec running `python`, found through a JUPYTER_PATH of its own."""
  spec = tmp_path / 'jupyter' / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(
      json.dumps({
          'argv': [python, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
          'display_name': 't5lite test venv', 'language': 'python'
      }))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.delenv('PYTHONPATH', raising=False)  # nothing but the venv decides what imports
  monkeypatch.setenv('PIP_NO_INDEX', '1')  # an install attempt must not reach for the network
  monkeypatch.setenv('XLA_FLAGS', '')  # one CPU device in the kernel, as in Colab


def _execute(notebook, cwd):
  nbclient.NotebookClient(notebook, timeout=600, kernel_name=KERNEL,
                          resources={'metadata': {'path': str(cwd)}}).execute()
  return [
      o for c in notebook.cells if c.cell_type == 'code' for o in c.get('outputs', [])
      if o.get('output_type') == 'error'
  ]


def _stdout(cell):
  return ''.join(
      o.get('text', '') for o in cell.get('outputs', []) if o.get('output_type') == 'stream')


def _is_under(path, folder):
  return os.path.commonpath([os.path.realpath(path),
                             os.path.realpath(folder)]) == os.path.realpath(folder)


def test_quickstart_notebook_runs_from_an_installed_wheel(tmp_path, monkeypatch):
  assert not _is_under(tmp_path, REPO)
  source = _copy_sources(tmp_path / 'source')
  subprocess.run([
      sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q',
      '-w',
      str(tmp_path / 'dist'),
      str(source)
  ], check=True)
  [wheel] = os.listdir(tmp_path / 'dist')
  venv = str(tmp_path / 'venv')
  python = _venv(venv)
  subprocess.run([
      python, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q',
      str(tmp_path / 'dist' / wheel)
  ], check=True)
  shutil.rmtree(source)  # nothing to import from but the installed wheel

  _kernel(tmp_path, monkeypatch, python)
  work, cwd = tmp_path / 'work', tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.setenv('T5LITE_NOTEBOOK_STEPS', '12')
  monkeypatch.setenv('T5LITE_NOTEBOOK_WORKDIR', str(work))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  notebook.cells.append(nbformat.v4.new_code_cell(WHERE_FROM))
  errors = _execute(notebook, cwd)
  assert not errors, errors

  where = json.loads(_stdout(notebook.cells[-1]))
  assert where['prefix'] == venv
  assert any(f.endswith(os.path.join('t5lite', 'configs', 'quickstart.py')) for f in where['files'])
  outside = [f for f in where['files'] if not _is_under(f, venv)]
  assert not outside, f'imported from outside the wheel install: {outside}'
  # The plots: pretraining loss, fine-tuning curves, eval metrics, as inline PNGs.
  images = [
      o['data']['image/png'] for c in notebook.cells for o in c.get('outputs', [])
      if o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
  ]
  assert len(images) == 3 and all(len(i) > 5000 for i in images), [len(i) for i in images]
  # What each part leaves behind: both runs' checkpoints, eval results, predictions.
  assert os.listdir(work / 'pretrain' / 'checkpoints')
  for task in ('docstring_kind', 'docstring_module'):  # in training (step 6) and eval.run (12)
    assert sorted(os.listdir(work / 'finetune' / 'eval' / task)) == ['step_12.json', 'step_6.json']
  predictions = [json.loads(l) for l in open(work / 'predictions.jsonl')]
  assert len(predictions) == 2 and all('prediction' in p for p in predictions)
  assert not os.listdir(cwd)  # WORK given: nothing lands in the working folder


def test_install_cell_installs_t5lite_from_repo_url(tmp_path, monkeypatch):
  """Where t5lite is not importable, the first code cell installs it from REPO_URL: here a local
  git repository of the checkout's sources (pip builds it as it would from GitHub)."""
  repo = _copy_sources(tmp_path / 'repo')
  git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-C', str(repo)]
  subprocess.run(git + ['init', '-q'], check=True)
  subprocess.run(git + ['add', '.'], check=True)
  subprocess.run(git + ['commit', '-q', '-m', 'sources'], check=True)
  venv = str(tmp_path / 'venv')
  _kernel(tmp_path, monkeypatch, _venv(venv))
  # The build's setuptools comes from the outer environment, not from an index.
  monkeypatch.setenv('PIP_NO_BUILD_ISOLATION', '0')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  install = next(c for c in notebook.cells if c.cell_type == 'code')
  # 'file://localhost/...': pip's requirement parser wants a host in the URL; git takes this one.
  install.source, replaced = re.subn(r"(?m)^REPO_URL = '[^']*'",
                                     f"REPO_URL = 'file://localhost{repo}'", install.source)
  assert replaced == 1, 'the first code cell names the repository in one REPO_URL line'
  notebook.cells = [install, nbformat.v4.new_code_cell(WHERE_FROM)]
  errors = _execute(notebook, tmp_path)
  assert not errors, errors
  where = json.loads(_stdout(notebook.cells[-1]))
  assert where['files'] and all(_is_under(f, venv) for f in where['files']), where


def test_committed_notebook_carries_its_outputs():
  """Opened on GitHub or in Colab, the notebook shows its run: every code cell executed, in
  order, no errors, the three plots as PNGs, at a size a repository carries."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == 'code']
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  assert len([o for o in outputs if 'image/png' in o.get('data', {})]) == 3
  assert os.path.getsize(NOTEBOOK) < 400_000
