"""The training methods, by the name their checkpoints carry: name -> Method class, train
script, config keys, and the module and feature kinds its checkpoints need.

A method is one file that registers all of that when it is imported (a Method subclass with a
`name` calls register()). A built-in method's name is the stem of its file in
handreid/methods/; `method:` in a config may instead be the path of a .py file (relative to
the working directory) defining a Method subclass. Evaluation rebuilds a checkpoint's modules
through the kinds its method registered, without running the method's training code.
"""
import functools
import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path

from handreid.core.errors import ConfigError
from handreid.core.schema import SCHEMA

METHODS_PACKAGE = "handreid.methods"
NOT_METHODS = ("base",)  # modules of the package that hold no method


@dataclass
class MethodEntry:
    name: str
    method_class: type
    train_script: str
    config_keys: dict
    module_kinds: dict
    feature_kinds: dict

    @property
    def train_command(self):
        return f"python {self.train_script} --config <train config>"


_METHODS = {}   # name -> MethodEntry of every method imported so far
_FILES = {}     # resolved path of a method file -> the name of its method


def _import_methods(module=None):
    """The plugin lookup: the one place core reaches handreid/methods at run time, by name
    (importlib, never an import statement: core stays below the methods): the package (its
    DEFAULT and its list of modules) or the module of one built-in method."""
    return importlib.import_module(METHODS_PACKAGE + (f".{module}" if module else ""))


@functools.cache
def builtin_names():
    """Names of the built-in methods: the modules of handreid/methods/ (not imported)."""
    return [module.name for module in pkgutil.iter_modules(_import_methods().__path__)
            if module.name not in NOT_METHODS]


def default_method():
    """The method of a config that names none (handreid/methods' DEFAULT)."""
    return _import_methods().DEFAULT


def register(method_class):
    """Record a Method subclass (Method.__init_subclass__ calls this). ConfigError when its
    name is a built-in method's, or a config key or kind of it another method defines."""
    name = method_class.name
    module = method_class.__module__
    if name in builtin_names() and module != f"{METHODS_PACKAGE}.{name}":
        raise ConfigError(f"method {name!r} of {module} has the name of a built-in method; "
                          f"give its class another name")
    taken = [(what, key) for what, own in (("config key", method_class.config_keys),
                                           ("module kind", method_class.module_kinds),
                                           ("feature kind", method_class.feature_kinds))
             for key, value in own.items() if _defined_elsewhere(what, key, value, name)]
    if taken:
        what, key = taken[0]
        raise ConfigError(f"method {name!r} defines the {what} {key!r}, which the general "
                          f"config or another method defines; give it another name")
    _METHODS[name] = MethodEntry(name, method_class, method_class.train_script,
                                 dict(method_class.config_keys),
                                 dict(method_class.module_kinds),
                                 dict(method_class.feature_kinds))


def _defined_elsewhere(what, key, value, name):
    """Whether `key` is already a general config key or another method's `what` with another
    value (a method that hands a parent's or another method's kind on shares the object)."""
    if what == "config key" and key in SCHEMA:
        return True
    field = {"config key": "config_keys", "module kind": "module_kinds",
             "feature kind": "feature_kinds"}[what]
    return any(key in getattr(entry, field) and getattr(entry, field)[key] is not value
               for entry in _METHODS.values() if entry.name != name)


def load(method):
    """The MethodEntry `method` names: a method already imported, a built-in method (imported
    now) or a .py file (imported now, once per file). ConfigError for anything else."""
    if method in _METHODS:
        return _METHODS[method]
    if method.endswith(".py") or "/" in method:
        return _load_file(Path(method))
    if method in builtin_names():
        _import_methods(method)  # defines its Method subclass, which registers itself
        return _METHODS[method]
    raise ConfigError(f"method: {method!r} is neither a built-in method "
                      f"({', '.join(builtin_names())}) nor a .py file; name one of those or "
                      f"the path of a .py file defining a Method subclass")


def _load_file(path):
    if path.suffix != ".py" or not path.is_file():
        raise ConfigError(f"method: {path} is no .py file (give the path of a .py file "
                          f"defining a Method subclass, relative to the working directory, or "
                          f"a built-in method: {', '.join(builtin_names())})")
    resolved = path.resolve()
    if resolved not in _FILES:
        module_name = "handreid_method_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
        spec = importlib.util.spec_from_file_location(module_name, resolved)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except ConfigError:
            raise
        except Exception as err:
            del sys.modules[module_name]
            reason = " ".join(str(err).split())[:200]
            raise ConfigError(f"method: cannot import {path} ({type(err).__name__}: {reason}); "
                              f"fix the file") from None
        defined = [entry.name for entry in _METHODS.values()
                   if entry.method_class.__module__ == module_name]
        if len(defined) != 1:
            found = f"several ({', '.join(defined)})" if defined else "none"
            raise ConfigError(f"method: {path} must define one Method subclass with a name "
                              f"(handreid.methods.base.Method), it defines {found}; see "
                              f"docs/engine.md, writing a method")
        _FILES[resolved] = defined[0]
    return _METHODS[_FILES[resolved]]


def known():
    """Names of the built-in methods and of every other method imported so far."""
    return builtin_names() + [name for name in _METHODS if name not in builtin_names()]


def train_command(method, missing="train one with its train script"):
    """The command that trains a run of `method` (a name or a method file), or `missing`
    for one that is not a method."""
    try:
        return load(method).train_command
    except ConfigError:
        return missing


def config_keys(method=None):
    """Every config key: the general ones (schema.SCHEMA), every built-in method's and, when
    `method` names a method file (or another method), its own. A config holds them all."""
    keys = dict(SCHEMA)
    keys["method"] = {**SCHEMA["method"], "default": default_method(), "nullable": False}
    for name in builtin_names():
        keys.update(load(name).config_keys)
    if isinstance(method, str) and method:
        keys.update(load(method).config_keys)
    return keys


def module_kind(kind):
    """The nn.Module class of a module kind some imported method registered, or None."""
    return next((entry.module_kinds[kind] for entry in _METHODS.values()
                 if kind in entry.module_kinds), None)


def feature_kind(kind):
    """The feature function of a feature kind some imported method registered, or None."""
    return next((entry.feature_kinds[kind] for entry in _METHODS.values()
                 if kind in entry.feature_kinds), None)
