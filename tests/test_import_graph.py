"""The import graph, read from the source with ast (nothing is imported or run):

- the package's folders are its layers (handreid/<layer>/): a module imports its own folder,
  the folders of its own rank and the ranks below, never upward; neither evaluation nor a
  method imports train; no import circle exists among the modules;
- no entry script (experiments/, datasets/, benchmarks/ scripts, run_all) and no front module
  of the documents (build_dataloader, make_model, finetune_trainer_stage1) is imported by the
  package; the fronts import the package only (finetune_trainer_stage1 assembles the
  documents' class from it);
- every folder of the package has a rank: a new folder has to be placed here.
"""
import ast
import functools
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
