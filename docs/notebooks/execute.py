"""Executes quickstart.ipynb and saves it with its outputs (the committed notebook carries them).

    python docs/notebooks/execute.py                       # the shipped configs (about 10 minutes
                                                           # on an idle 2-core CPU)
    T5LITE_NOTEBOOK_STEPS=200 python docs/notebooks/execute.py   # a shorter run

Run it with a Python where t5lite is installed (`pip install .`: then the install cell's output
names an installed package, as in Colab, rather than a checkout). The runs go into a temporary
folder that is deleted afterwards; the kernel is that Python's `python3` kernelspec.
"""
import os
import sys
import tempfile
import time

import nbclient
import nbformat

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'quickstart.ipynb')


def _merge_streams(outputs):
  """One output per run of stdout (or stderr) lines, as Jupyter shows them: the kernel sends one
  per flush, hundreds for a training log, and each costs the saved file its JSON overhead."""
  merged = []
  for output in outputs:
    if (merged and output.output_type == 'stream' and merged[-1].output_type == 'stream'
        and merged[-1].name == output.name):
      merged[-1].text += output.text
    else:
      merged.append(output)
  return merged


def main(path=NOTEBOOK):
  notebook = nbformat.read(path, as_version=4)
  os.environ['XLA_FLAGS'] = ''  # one CPU device, as in a Colab CPU runtime
  start = time.time()
  with tempfile.TemporaryDirectory(prefix='t5lite_notebook_') as cwd:
    # Colab's working folder is /content; the notebook's runs go to ./t5lite_runs under it.
    nbclient.NotebookClient(notebook, timeout=3600, kernel_name='python3', record_timing=False,
                            resources={'metadata': {'path': cwd}}).execute()
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      cell.outputs = _merge_streams(cell.outputs)
  nbformat.write(notebook, path)
  print(f'{path}: executed in {time.time() - start:.0f} s, '
        f'{os.path.getsize(path) / 1024:.0f} KiB with outputs')


if __name__ == '__main__':
  main(*sys.argv[1:])
