"""One format for the whole tree (pyproject.toml's [tool.yapf]): `yapf --diff` finds nothing to
change, and string literals use single quotes (yapf leaves quotes alone). To fix a failure run
`yapf -i -r -p t5lite tests configs benchmarks launch`."""
import io
import pathlib
import subprocess
import sys
import tokenize

ROOT = pathlib.Path(__file__).resolve().parent.parent
TREES = ('t5lite', 'tests', 'configs', 'benchmarks', 'launch')


def test_yapf_finds_nothing_to_change():
  out = subprocess.run([sys.executable, '-m', 'yapf', '--diff', '-r', '-p', *TREES], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0 and not out.stdout, (
      f'yapf would reformat (run `yapf -i -r -p {" ".join(TREES)}`):\n{out.stdout[:3000]}'
      f'{out.stderr[:1000]}')


def double_quoted(source: str) -> list[int]:
  """Lines with a one-line "..." literal that could be '...' (no single quote inside)."""
  lines = []
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type != tokenize.STRING or tok.start[0] != tok.end[0]:
      continue
    body = tok.string.lstrip('rRbBuUfF')
    if body.startswith('"') and not body.startswith('"""') and "'" not in body:
      lines.append(tok.start[0])
  return lines


def test_the_quote_check_can_fail():
  assert double_quoted('x = "a"\ny = \'b\'\nz = "it\'s"\n') == [1]


def test_single_quotes():
  found = {
      str(p.relative_to(ROOT)): double_quoted(p.read_text()) for tree in TREES
      for p in sorted((ROOT / tree).rglob('*.py'))
  }
  assert {k: v for k, v in found.items() if v} == {}
