"""The package's import graph has no cycles: every module can be read from its imports downwards.

The graph counts every import, at the top of a module or inside a function, read with `ast`.
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gptjax")


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  """{module: the package modules it imports}, e.g. 'gptjax.loop' -> {'gptjax.train', ...}."""
  base = os.path.dirname(root)
  modules = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, base)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        modules[module] = path
  graph = {m: set() for m in modules}
  for module, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        graph[module].update(a.name for a in node.names if a.name in modules)
      elif isinstance(node, ast.ImportFrom):
        target = node.module or ""
        if node.level:  # relative: from the package, `level - 1` packages up
          target = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                            + ([target] if target else []))
        for alias in node.names:
          if f"{target}.{alias.name}" in modules:
            graph[module].add(f"{target}.{alias.name}")
          elif target in modules:
            graph[module].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (or a self-import)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
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
      if len(component) > 1 or v in graph[v]:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert "gptjax.config" in graph and "gptjax.sharding" in graph["gptjax.config"]
  assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
  assert cycles(graph) == [["a", "b", "c"], ["e"]]
