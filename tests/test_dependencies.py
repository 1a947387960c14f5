"""Every third-party module that ldm_jax, the entry points and the configs import is declared in
setup.cfg (issue 22 item 6): imported at module level -> install_requires; imported inside a
function (an optional feature) -> install_requires or an extra. Packages needed at run time but
never imported by our code are listed in RUNTIME with the reason, and checked the same way.
The distributions a base install brings (install_requires, transitively, from the installed
metadata) cover every module-level import and filelock, and a fresh process fills the
persistent compilation cache."""
import ast
import configparser
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
LOCAL = {"ldm_jax", "configs"}  # our package and the presets
RUNTIME = {
    # jax's persistent compilation cache needs it once a size limit is set (ldm_jax/platform.py
    # sets one): without it the cache directory stays empty and jax warns on every start.
    "filelock": "install_requires",
}


def _name(requirement: str) -> str:
  return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", requirement.strip(), 1)[0]).lower()


def _declared():
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")

  def names(text):
    return {_name(line) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")}

  extras = {k: names(v) for k, v in cfg["options.extras_require"].items()}
  return names(cfg["options"]["install_requires"]), extras


def _imports():
  """{top-level module: [(file, imported at module level)]} of our code's third-party imports."""
  files = sorted(ROOT.glob("ldm_jax/**/*.py")) + [ROOT / "train.py", ROOT / "sample.py"]
  files += sorted(ROOT.glob("configs/*.py"))
  found = {}
  for path in files:
    tree = ast.parse(path.read_text(), str(path))
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top not in LOCAL:
          found.setdefault(top, []).append((str(path.relative_to(ROOT)),
                                            id(node) in module_level))
  return found


def test_every_third_party_import_is_declared():
  base, extras = _declared()
  distributions = importlib.metadata.packages_distributions()
  problems = []
  imports = _imports()
  assert {"jax", "flax", "optax", "orbax", "ml_collections"} <= set(imports)  # the scan works
  for module, where in sorted(imports.items()):
    dists = {_name(d) for d in distributions.get(module, [])}
    assert dists, f"{module} (imported by {where[0][0]}) is not installed here"
    if dists & base:
      continue
    eager = [f for f, top in where if top]
    if eager:
      problems.append(f"{module} ({'/'.join(sorted(dists))}) imported at module level by "
                      f"{eager[0]} but not in install_requires")
    elif not any(dists & names for names in extras.values()):
      problems.append(f"{module} ({'/'.join(sorted(dists))}) imported by {where[0][0]} is in "
                      "neither install_requires nor an extra")
  for dist, where in RUNTIME.items():
    if dist not in base:
      problems.append(f"{dist} is needed at run time but not in {where}")
  assert not problems, "\n".join(problems)


def _base_closure() -> set[str]:
  """The distributions a base install (no extras) of the installed ldm_jax brings: its
  requirements without an extra marker, and theirs, transitively (from installed metadata)."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  seen, todo = set(), ["ldm_jax"]
  while todo:
    name = todo.pop()
    try:
      requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue  # a marker-excluded or optional requirement not installed here
    for line in requires:
      req = Requirement(line)
      if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
      dep = _name(req.name)
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def test_a_base_install_brings_every_module_level_import_and_filelock():
  base = _base_closure()
  distributions = importlib.metadata.packages_distributions()
  missing = sorted({f"{module} ({path})" for module, where in _imports().items()
                    for path, top in where if top
                    and not {_name(d) for d in distributions.get(module, [])} & base})
  assert not missing, f"imported at module level, not in a base install: {missing}"
  assert "filelock" in base and "jax" in base


def test_a_fresh_process_fills_the_compilation_cache(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=str(ROOT))
  env.pop("LDM_JAX_COMPILATION_CACHE", None)
  code = ("from ldm_jax import platform; platform.configure()\n"
          "import jax, jax.numpy as jnp\n"
          "print(jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).sum())\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert done.returncode == 0 and done.stdout.strip() == "9.0", done.stderr
  assert "filelock" not in done.stderr, done.stderr
  cache = tmp_path / "ldm_jax" / "jax_cache"
  assert cache.is_dir() and any(p.is_file() for p in cache.rglob("*")), done.stderr
