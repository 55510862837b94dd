"""The import graph, read from the source with ast (nothing is imported or run):

- no entry script is imported by another file: library code lives in modules. Tests run the
  scripts, as subprocesses or through their `main` (the only name a test may take from one);
- the modules import downward only, by the layers below, and no import circle exists among
  them (imports within one layer are allowed);
- every module is in a layer: a new module has to be placed here.
"""
import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Entry scripts: run as `python <path>`, never imported (tests may call their main()).
ENTRY_SCRIPTS = ("experiments/*.py", "run_all_finetuned_stage1.py", "datasets/prepare_*.py",
                 "datasets/make_synthetic_hands.py", "benchmarks/bench_*.py",
                 "benchmarks/gpu_check.py")
# Modules, top to bottom; a module may import its own layer and the layers below it. Named
# by path without .py; a listed module that does not exist (yet) is fine.
LAYERS = {
    "methods and evaluation": (
        "engine", "train_entry", "method", "selection", "checkpointing", "run_log",
        "finetune_trainer_stage1", "finetune_trainer_stage2", "finetune_trainer_clip_handid",
        "evaluation", "feature_encoder", "likelihood_ratio", "result_stats",
        "evaluation_report", "evaluation_plots"),
    "model, data and metrics": (
        "make_model", "checkpoint_format", "legacy_formats", "build_dataloader", "losses",
        "reid_metrics", "gallery_search", "score_counts", "image_files", "feature_files",
        "gallery_index", "datasets/split_protocol", "benchmarks/synthetic_data",
        "benchmarks/reference_metrics"),
    "runtime and config": ("runtime", "config", "errors", "atomic_files", "method_registry"),
}
SOURCE_FOLDERS = (".", "experiments", "datasets", "benchmarks")
# Folders of the project whose name a PyPI package has: never imported as a package.
PACKAGE_NAMES_TAKEN = ("datasets",)

LAYER_OF = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def name_of(path):
    return path.relative_to(ROOT).with_suffix("").as_posix()


def entry_scripts():
    return {name_of(p) for pattern in ENTRY_SCRIPTS for p in ROOT.glob(pattern)}


def source_files():
    """Every .py of the project outside tests/: the top-level modules and the script folders
    (not what else lives in the checkout: data, environments)."""
    return sorted(p for folder in SOURCE_FOLDERS for p in (ROOT / folder).glob("*.py"))


def imported_names(tree):
    """[(dotted module name, names taken from it or None, line)] of every import statement,
    at any depth (imports inside functions count)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def resolve(dotted, importer):
    """The project file (name without .py) a module name imports from `importer`'s folder, or
    None for anything outside the project. A script's own folder comes first on sys.path."""
    parts = dotted.split(".")
    folders = [importer.parent, ROOT] if importer.parent != ROOT else [ROOT]
    for folder in folders:
        path = folder.joinpath(*parts).with_suffix(".py")
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
        if target:
            edges.append((target, dotted, line))
    return edges


@functools.cache
def graph():
    """{file name: [(imported project file, dotted name, line)]} for every source file."""
    return {name_of(path): project_imports(path) for path in source_files()}


def violations():
    """{(importer, imported): message} of the edges that break a rule."""
    entries, found = entry_scripts(), {}
    for source, edges in graph().items():
        for target, dotted, line in edges:
            where = f"{source}.py:{line}"
            if dotted.split(".")[0] in PACKAGE_NAMES_TAKEN:
                found[(source + ".py", target + ".py")] = (
                    f"{where} imports {dotted}: an installed PyPI package of that name "
                    "would be imported instead; import it from its own folder's scripts, or "
                    "make it a top-level module")
            elif target in entries:
                found[(source + ".py", target + ".py")] = (
                    f"{where} imports the entry script {target}.py: move what it needs into a "
                    "module (the script keeps its argument parsing and main)")
            elif source not in entries and LAYER_OF.get(target, 0) < LAYER_OF.get(source, 0):
                found[(source + ".py", target + ".py")] = (
                    f"{where} imports {target} upward (layer "
                    f"{list(LAYERS)[LAYER_OF[target]]!r} is above "
                    f"{list(LAYERS)[LAYER_OF[source]]!r})")
    return found


def test_every_module_is_an_entry_script_or_in_a_layer():
    entries = entry_scripts()
    unplaced = [name + ".py" for name in map(name_of, source_files())
                if name not in entries and name not in LAYER_OF]
    assert not unplaced, (f"{unplaced}: place each new module in a layer of LAYERS in "
                          f"{Path(__file__).name} (or name it like an entry script)")
    assert not entries & set(LAYER_OF)
    assert len(LAYER_OF) == sum(map(len, LAYERS.values())), "a module is in two layers"


def test_no_entry_script_is_imported_and_no_import_points_upward():
    found = violations()
    assert not found, "\n".join(message for _, message in sorted(found.items()))


def test_no_import_circle_among_the_modules():
    modules = set(LAYER_OF)
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
