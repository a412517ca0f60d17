"""docs/notebooks/quickstart.ipynb runs headlessly on CPU, start to end, with few steps.

The notebook is the README's pretrain -> fine-tune -> evaluate -> infer story through the Python
API; T5LITE_NOTEBOOK_STEPS shrinks every step count so that CI can execute every cell."""
import json
import os

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'docs', 'notebooks', 'quickstart.ipynb')


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv('T5LITE_REPO', REPO)
  monkeypatch.setenv('T5LITE_NOTEBOOK_STEPS', '12')
  monkeypatch.setenv('T5LITE_NOTEBOOK_WORKDIR', str(tmp_path))
  monkeypatch.setenv('XLA_FLAGS', '')  # one CPU device in the kernel, as in Colab
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  errors = [
      o for c in notebook.cells if c.cell_type == 'code' for o in c.get('outputs', [])
      if o.get('output_type') == 'error'
  ]
  assert not errors, errors
  # What each part leaves behind: the curve, both runs' checkpoints, eval results, predictions.
  assert (tmp_path / 'training_curve.png').stat().st_size > 1000
  assert any(
      o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
      for c in notebook.cells for o in c.get('outputs', []))
  assert os.listdir(tmp_path / 'pretrain' / 'checkpoints')
  assert os.listdir(tmp_path / 'finetune' / 'eval')
  predictions = [json.loads(l) for l in open(tmp_path / 'predictions.jsonl')]
  assert len(predictions) == 2 and all('prediction' in p for p in predictions)
