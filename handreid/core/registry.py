"""The training methods this code knows, by the name their checkpoints carry.

A method is declared once, beside its model parts in make_model.py (what evaluation needs to
rebuild its checkpoints): its name and the command that trains one, quoted in every error
about a checkpoint or resume state of that method. Its Method subclass (method.py) attaches
itself to the declaration when the class is defined. Evaluation reads the commands without
importing any trainer.
"""
from dataclasses import dataclass


@dataclass
class MethodEntry:
    name: str
    train_command: str
    method_class: type = None   # set when the method's file is imported (training only)


_METHODS = {}


def declare(name, train_command):
    """Make `name` a known method whose runs are trained by `train_command`."""
    _METHODS.setdefault(name, MethodEntry(name, train_command))


def attach(method_class):
    """Record the Method subclass that trains its declared `name` (a method without model
    parts of its own is declared here, with its class's train_command)."""
    declare(method_class.name, method_class.train_command or f"train with {method_class.name}")
    _METHODS[method_class.name].method_class = method_class


def known():
    """Names of the declared methods, in declaration order."""
    return list(_METHODS)


def train_command(name, missing="train one with its train script"):
    """The command that trains a run of method `name`, or `missing` for an unknown name."""
    entry = _METHODS.get(name)
    return entry.train_command if entry else missing
