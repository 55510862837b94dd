"""The training methods, one file each (its name is the file's stem; base.py is what they
share). core/registry.py imports a method's file when a config or checkpoint names it."""

DEFAULT = "stage1"  # the method of a config that names none
