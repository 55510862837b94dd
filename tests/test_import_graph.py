"""The import graph, read from the source with ast (nothing is imported or run):

- the package's folders are its layers (handreid/<layer>/): a module imports its own folder,
  the folders of its own rank and the ranks below, never upward; neither evaluation nor a
  method imports train; no import circle exists among the modules;
- no entry script (experiments/, datasets/, benchmarks/ scripts, run_all) and no front module
  of the documents (build_dataloader, make_model, finetune_trainer_stage1) is imported by the
  package; the fronts import the package only (finetune_trainer_stage1 assembles the
  documents' class from it);
- every folder of the package has a rank: a new folder has to be placed here;
- the test suite's own hygiene: no test module imports another, no test reaches a private
  attribute, and the tests that only read the source (like this file) run without torch.
"""
import ast
import functools
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "handreid"

# The folders of the package, bottom to top; a folder imports its rank and those below.
RANKS = (("core",), ("model", "data", "metrics", "checkpoint"),
         ("train", "methods", "evaluation", "casework", "search"))
RANK_OF = {folder: rank for rank, folders in enumerate(RANKS) for folder in folders}
NEVER = {("evaluation", "train"): "evaluation rebuilds any checkpoint from its module specs "
                                  "and feature definition, never from a trainer",
         ("methods", "train"): "evaluation imports a checkpoint's method for its module and "
                               "feature kinds; a method takes what it needs from "
                               "methods/base.py, never the engine"}
# The documents' modules at the top of the checkout: fronts of the package.
FRONTS = ("build_dataloader", "make_model", "finetune_trainer_stage1")
# Entry scripts: run as `python <path>`, never imported (tests may call their main()).
ENTRY_SCRIPTS = ("experiments/*.py", "run_all_finetuned_stage1.py", "datasets/prepare_*.py",
                 "datasets/make_synthetic_hands.py", "benchmarks/bench_*.py",
                 "benchmarks/gpu_check.py")
SCRIPT_FOLDERS = (".", "experiments", "datasets", "benchmarks")


def name_of(path):
    return path.relative_to(ROOT).with_suffix("").as_posix()


def entry_scripts():
    return {name_of(p) for pattern in ENTRY_SCRIPTS for p in ROOT.glob(pattern)}


def package_files():
    return sorted((ROOT / PACKAGE).rglob("*.py"))


def source_files():
    """Every .py of the project outside tests/: the package, the fronts, the scripts."""
    return package_files() + sorted(p for folder in SCRIPT_FOLDERS
                                    for p in (ROOT / folder).glob("*.py"))


def layer_of(name):
    """The package folder (layer) of a file name like handreid/train/engine, else None."""
    parts = name.split("/")
    return parts[1] if parts[0] == PACKAGE and len(parts) > 2 else None


def imported_names(tree):
    """[(dotted module name, names taken from it or None, line)] of every import statement,
    at any depth (imports inside functions count)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports are not used: write the full name"
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def resolve(dotted, importer):
    """The project file (name without .py) a module name imports from `importer`, or None for
    anything outside the project. A script's own folder comes first on sys.path; the package
    and the fronts are installed."""
    parts = dotted.split(".")
    folders = [ROOT] if importer.parent == ROOT or parts[0] == PACKAGE else [importer.parent,
                                                                              ROOT]
    for folder in folders:
        for path in (folder.joinpath(*parts).with_suffix(".py"),
                     folder.joinpath(*parts, "__init__.py")):
            if path.is_file():
                return name_of(path)
    return None


def project_imports(path):
    """[(target, dotted name as written, line)] of the imports of `path` that land in the
    project; a `from package import module` lands on the module."""
    edges = []
    for dotted, names, line in imported_names(ast.parse(path.read_text(), str(path))):
        for name in names or []:
            module = resolve(f"{dotted}.{name}", path)
            if module:
                edges.append((module, f"{dotted}.{name}", line))
        target = resolve(dotted, path)
        if target and not (names and all(resolve(f"{dotted}.{n}", path) for n in names)):
            edges.append((target, dotted, line))
    return edges


@functools.cache
def graph():
    """{file name: [(imported project file, dotted name, line)]} for every source file."""
    return {name_of(path): project_imports(path) for path in source_files()}


def violations():
    entries, found = entry_scripts(), []
    for source, edges in graph().items():
        for target, dotted, line in edges:
            where = f"{source}.py:{line} imports {dotted}"
            source_layer, target_layer = layer_of(source), layer_of(target)
            if target in entries:
                found.append(f"{where}: an entry script; move what it needs into the package "
                             "(the script keeps its argument parsing and main)")
            elif target in FRONTS and source.startswith(PACKAGE + "/"):
                found.append(f"{where}: a front of the documents; import the package module "
                             "it re-exports")
            elif source in FRONTS and not target.startswith(PACKAGE + "/"):
                found.append(f"{where}: a front only re-exports the package")
            elif source_layer and target_layer and (source_layer, target_layer) in NEVER:
                found.append(f"{where}: {NEVER[(source_layer, target_layer)]}")
            elif source_layer and target_layer and RANK_OF[target_layer] > RANK_OF[source_layer]:
                found.append(f"{where}: upward ({target_layer}/ is above {source_layer}/)")
            elif source.startswith(PACKAGE + "/") and not target.startswith(PACKAGE + "/"):
                found.append(f"{where}: the package imports only itself")
    return found


def test_every_folder_of_the_package_has_a_rank_and_holds_its_modules():
    folders = {p.name for p in (ROOT / PACKAGE).iterdir()
               if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(RANK_OF), (f"{sorted(folders ^ set(RANK_OF))}: give each folder of "
                                     f"{PACKAGE}/ a rank in RANKS of {Path(__file__).name}")
    loose = [name_of(p) for p in (ROOT / PACKAGE).glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"{loose}: a module lives in the folder of its layer"
    assert len(RANK_OF) == sum(map(len, RANKS)), "a folder has two ranks"


def test_no_script_or_front_is_imported_and_no_import_points_upward():
    found = violations()
    assert not found, "\n".join(sorted(found))


def test_no_import_circle_among_the_modules():
    modules = {name_of(p) for p in package_files()}
    imports = {source: sorted({t for t, _, _ in edges if t in modules})
               for source, edges in graph().items() if source in modules}
    state, stack = {}, []

    def visit(module):  # depth first; a module met again while on the stack closes a circle
        state[module] = "open"
        stack.append(module)
        for target in imports.get(module, []):
            if state.get(target) == "open":
                circle = stack[stack.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(imports):
        if module not in state:
            visit(module)


def test_tests_take_only_main_from_an_entry_script():
    entries, wrong = entry_scripts(), []
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if resolve(alias.name, path) in entries:
                        aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                for alias in node.names:
                    if resolve(f"{node.module}.{alias.name}", path) in entries:
                        aliases.add(alias.asname or alias.name)  # the script, as a module
                    elif resolve(node.module, path) in entries and alias.name != "main":
                        wrong.append(f"{path.name}:{node.lineno} takes {alias.name} from "
                                     f"{node.module}")
        wrong += [f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}"
                  for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                  and isinstance(node.value, ast.Name) and node.value.id in aliases
                  and node.attr != "main"]
    assert not wrong, ("tests call an entry script through its main() only; import library "
                       "code from its module:\n" + "\n".join(wrong))


# ---------------------------------------------------------------- the test suite itself

TESTS = ROOT / "tests"
# Test files that only read the source: they must run where torch is not installed.
SOURCE_ONLY_TESTS = ("tests/test_import_graph.py",)
# The heavy modules a source-only test must not need.
HEAVY_MODULES = ("torch", "torchvision", "open_clip")
# Private names of the standard library a test may need, each for a reason no public name
# serves. ast cannot tell whose object `x._name` is, so every other private name is refused.
ALLOWED_PRIVATE = {
    "os._exit": "ends a process at once, skipping cleanup: how a test fakes a crash",
    "sys._getframe": "the caller's frame, which inspect builds on",
}


def is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_test_module_imports_another():
    modules = {p.stem for p in TESTS.glob("test_*.py")}
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for dotted, names, line in imported_names(ast.parse(path.read_text(), str(path))):
            parts = dotted.split(".")
            named = parts[1:2] if parts[0] == "tests" else parts[:1]
            if set(named) & modules or (dotted == "tests" and set(names or []) & modules):
                found.append(f"{path.name}:{line} imports {dotted}")
    assert not found, ("a test module imports no other test module; move what tests share "
                       "into tests/conftest.py (a fixture or a helper):\n" + "\n".join(found))


def private_uses(tree):
    """[(line, what)] of the private names `tree` reaches: attributes (x._name), names
    imported from a module, and names given as strings to getattr/setattr/delattr/hasattr
    or to monkeypatch.setattr/delattr ("module._name" or obj, "_name")."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if is_private(alias.name)]
        elif isinstance(node, ast.Call):
            function = node.func
            name = function.id if isinstance(function, ast.Name) else getattr(function, "attr",
                                                                              None)
            if name in ("getattr", "setattr", "delattr", "hasattr"):
                found += [(node.lineno, ast.unparse(node)) for argument in node.args
                          if isinstance(argument, ast.Constant) and isinstance(argument.value, str)
                          and is_private(argument.value.rsplit(".", 1)[-1])]
    return sorted(found)


def test_no_test_reaches_a_private_attribute():
    found = [f"{path.name}:{line} {what}" for path in sorted(TESTS.glob("*.py"))
             for line, what in private_uses(ast.parse(path.read_text(), str(path)))
             if what not in ALLOWED_PRIVATE]
    assert not found, ("tests use public names only (a private name may change with any "
                       "release); go through the public API:\n" + "\n".join(found))


def test_private_uses_finds_each_kind_of_access():
    # The check above passes on a clean suite; this shows it would see each kind of access.
    source = ("import os\nfrom handreid.train import _x\nm._buffers.pop('a')\n"
              "monkeypatch.setattr(engine, '_step', f)\nmonkeypatch.setattr('a.b._c', f)\n"
              "getattr(v, '_embeds')\nos._exit(1)\nm.__class__\ngetattr(v, 'name')\n")
    assert private_uses(ast.parse(source)) == [
        (2, "handreid.train._x"), (3, "m._buffers"), (4, "monkeypatch.setattr(engine, '_step', f)"),
        (5, "monkeypatch.setattr('a.b._c', f)"), (6, "getattr(v, '_embeds')"), (7, "os._exit")]


def test_source_only_tests_run_without_torch():
    """Each heavy module made unimportable (sys.modules[name] = None), pytest runs the
    source-only test files in a fresh interpreter: conftest.py imports torch only where a
    fixture or helper needs it."""
    this_test = f"{Path(__file__).relative_to(ROOT).as_posix()}::" \
                f"{test_source_only_tests_run_without_torch.__name__}"
    runner = ("import sys, pytest\n"
              f"sys.modules.update(dict.fromkeys({HEAVY_MODULES!r}))\n"
              "sys.exit(pytest.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", runner, *SOURCE_ONLY_TESTS, "-q",
                           "-p", "no:cacheprovider", "--deselect", this_test],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    tests = sum(1 for path in SOURCE_ONLY_TESTS for node in ast.walk(
        ast.parse((ROOT / path).read_text())) if isinstance(node, ast.FunctionDef)
        and node.name.startswith("test_")) - 1
    assert proc.returncode == 0 and f"{tests} passed" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]
