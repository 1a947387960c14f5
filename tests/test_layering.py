"""The house plan (docs/ARCHITECTURE.md), enforced: every import inside ldm_jax (function-level
ones too) runs down the floors below or stays on its own floor, no two modules import each
other through any chain, nothing edits sys.path, no benchmark imports a test, and the entry
points stay thin. Reads the source only (ast): nothing is imported."""
import ast
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / "ldm_jax"

# Lowest first. A module may import modules of its own floor and of the floors below it.
FLOORS = (
    ("services", ("ldm_jax", "ldm_jax.errors", "ldm_jax.files", "ldm_jax.console",
                  "ldm_jax.platform", "ldm_jax.config_schema", "ldm_jax.workdir",
                  "ldm_jax.checkpoint", "ldm_jax.sharding", "ldm_jax.distributed",
                  "ldm_jax.images")),
    ("math", ("ldm_jax.diffusion",)),
    ("models and data", ("ldm_jax.models", "ldm_jax.losses", "ldm_jax.data")),
    ("weights in", ("ldm_jax.convert",)),
    ("sampling", ("ldm_jax.sampling",)),
    ("evaluation", ("ldm_jax.evaluation",)),
    ("training", ("ldm_jax.train",)),
    ("weights out", ("ldm_jax.export",)),
    ("entry points", ("ldm_jax.cli", "ldm_jax.evaluate", "ldm_jax.convert.__main__",
                      "ldm_jax.export.__main__")),
)
# Thin scripts: flags live in ldm_jax/cli/, the work in the package.
ENTRY_POINTS = ("train.py", "sample.py", "ldm_jax/evaluate.py")
MAX_ENTRY_LINES = 80


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _floor(module: str) -> int:
  """The floor of the longest prefix that names `module` (a KeyError: a module on no floor)."""
  best = None
  for index, (_, prefixes) in enumerate(FLOORS):
    for prefix in prefixes:
      # "ldm_jax" names the package's __init__ only: a new top-level module must be placed.
      inside = prefix != "ldm_jax" and module.startswith(prefix + ".")
      if (module == prefix or inside) and (best is None or len(prefix) > best[1]):
        best = (index, len(prefix))
  if best is None:
    raise KeyError(module)
  return best[0]


def _imports(module: str, path: pathlib.Path):
  """(line, imported ldm_jax module) for every import in the file: `from pkg import sub` names
  the submodule when there is one, else the package."""
  is_package = path.name == "__init__.py"
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "ldm_jax":
          yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      if target.split(".")[0] != "ldm_jax":
        continue
      for alias in node.names:
        sub = f"{target}.{alias.name}"
        yield node.lineno, sub if sub in MODULES else target


def _graph() -> dict:
  return {m: sorted({t for _, t in _imports(m, p) if t != m}) for m, p in MODULES.items()}


def test_every_module_is_on_a_floor():
  missing = []
  for module in MODULES:
    try:
      _floor(module)
    except KeyError:
      missing.append(module)
  assert not missing, f"modules on no floor of FLOORS (tests/test_layering.py): {missing}"


def test_imports_run_down_the_floors():
  upward = []
  for module, path in MODULES.items():
    here = _floor(module)
    for line, target in _imports(module, path):
      there = _floor(target)
      if there > here:
        upward.append(f"{path.relative_to(ROOT)}:{line} imports {target} "
                      f"({FLOORS[here][0]} -> {FLOORS[there][0]}, a floor above)")
  assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_the_floor_check_sees_an_upward_import():
  """The checker itself: a models module importing sampling is refused."""
  assert _floor("ldm_jax.models.unet") < _floor("ldm_jax.sampling.pipeline")
  assert _floor("ldm_jax.convert.__main__") == len(FLOORS) - 1
  assert _floor("ldm_jax.convert.clip") == 3
  with pytest.raises(KeyError):
    _floor("ldm_jax.somewhere_new")


def _cycles(graph: dict) -> list:
  """The strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(graph.get(root, ())))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      for child in children:
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(graph.get(child, ()))))
          break
        if child in on_stack:
          low[node] = min(low[node], index[child])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          component = []
          while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == node:
              break
          if len(component) > 1:
            out.append(sorted(component))
  return out


def test_no_import_cycles():
  assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
  cycles = _cycles(_graph())
  assert not cycles, f"import cycles: {cycles}"


def _python_files():
  skip = {".venv", ".git", "runs", "build"}
  for path in sorted(ROOT.rglob("*.py")):
    if not skip & set(path.relative_to(ROOT).parts) and "egg-info" not in str(path):
      yield path


def test_nothing_edits_sys_path():
  pattern = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\+=|=)")
  found = [f"{p.relative_to(ROOT)}:{i}" for p in _python_files()
           for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
  for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    for cell in json.loads(nb.read_text())["cells"]:
      if pattern.search("".join(cell["source"])):
        found.append(str(nb.relative_to(ROOT)))
  assert not found, f"sys.path edits (import the package, `configs` or `benchmarks`): {found}"


def test_no_benchmark_imports_a_test():
  found = []
  for path in sorted((ROOT / "benchmarks").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      found += [f"{path.name}:{node.lineno} {n}" for n in names
                if n.split(".")[0] in ("tests", "conftest") or n.startswith("test_")]
  assert not found, found


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_entry_points_are_thin(script):
  lines = (ROOT / script).read_text().splitlines()
  assert len(lines) <= MAX_ENTRY_LINES, (
      f"{script} has {len(lines)} lines: flags and work belong in ldm_jax/cli/")
