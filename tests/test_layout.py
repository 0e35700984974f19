"""The library's import graph: one direction of flow and no circles.

experiments/ -> launch/ -> gsae_jax/; inside gsae_jax, no module imports
(directly or through others, lazy imports included) a module that imports it.
Importing a submodule counts as importing the packages above it, since Python
runs their __init__ first.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
  mods = {}
  for dirpath, _, names in os.walk(os.path.join(ROOT, 'gsae_jax')):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        mods[mod.removesuffix('.__init__')] = path
  return mods


def _imports(path):
  """Every module name an import statement in `path` names (lazy ones too)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.add(node.module)
      out.update(f'{node.module}.{a.name}' for a in node.names)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
  return out


def _graph():
  mods = _modules()
  graph = {}
  for mod, path in mods.items():
    targets = set()
    for name in _imports(path):
      parts = name.split('.')
      for i in range(1, len(parts) + 1):  # the module and every package above it
        prefix = '.'.join(parts[:i])
        if prefix in mods and prefix != mod and not mod.startswith(prefix + '.'):
          targets.add(prefix)
    graph[mod] = targets
  return mods, graph


def test_the_library_never_imports_launch_or_experiments():
  for mod, path in _modules().items():
    bad = {n for n in _imports(path) if n.split('.')[0] in ('launch', 'experiments')}
    assert not bad, (mod, bad)


def test_the_import_graph_has_no_cycles():
  _, graph = _graph()
  state = {}  # 1: on the current path, 2: done

  def visit(mod, path):
    state[mod] = 1
    for nxt in sorted(graph[mod]):
      if state.get(nxt) == 1:
        raise AssertionError('import cycle: ' + ' -> '.join(path + [nxt]))
      if nxt not in state:
        visit(nxt, path + [nxt])
    state[mod] = 2

  for mod in sorted(graph):
    if mod not in state:
      visit(mod, [mod])
  assert len(graph) > 30  # the walk saw the package
