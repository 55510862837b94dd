"""The weights of a TorchScript archive (OpenAI's released CLIP .pt files) read without running
any of the archive's code. torch.jit.load would run it, a crafted __setstate__ included (it can
write and read files); torch.load(weights_only=True) refuses such archives altogether.

Here the archive's data.pkl is unpickled by an unpickler that builds tensors from the
archive's storages and nothing else: every TorchScript object becomes an inert record of its
attributes, any other global is refused. Which attributes are parameters and buffers (what
ScriptModule.state_dict() returns) is read from the class declarations in the archive's code/
(`__parameters__ = [...]`, `__buffers__ = [...]`), parsed with ast and never run.
"""
import ast
import collections
import pickle
import sys
import zipfile

import torch

# The storage classes a TorchScript pickle names (GLOBAL torch <Name>Storage) -> dtype.
STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32,
                  "DoubleStorage": torch.float64, "BFloat16Storage": torch.bfloat16,
                  "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8,
                  "ByteStorage": torch.uint8, "BoolStorage": torch.bool}


class ArchiveRefused(ValueError):
    """The archive holds something other than modules and tensors, or is malformed."""


def is_torchscript(path):
    """A zip whose top folder holds constants.pkl: how torch itself tells a TorchScript
    archive from a torch.save file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.count("/") == 1 and name.endswith("/constants.pkl")
                   for name in archive.namelist())


class _Record:
    """A TorchScript object as pickled: its class name and its state, nothing of it run."""
    qualified = None

    def __setstate__(self, state):  # pickle's BUILD: keep the state, run nothing
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, *_):
    # torch._utils._rebuild_tensor_v2's arguments; as_strided refuses views outside the storage.
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data, *_):
    return data


def _as_is(value, *_):
    return value


# The functions a TorchScript pickle calls, by (module, name) -> what builds the same here.
# torch.jit._pickle's are identities that tag typed lists; ours are too.
BUILDERS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
            **{("torch.jit._pickle", name): _as_is
               for name in ("build_intlist", "build_doublelist", "build_boollist",
                            "build_tensorlist", "restore_type_tag")}}


class _WeightsUnpickler(pickle.Unpickler):
    """Builds tensors, dicts and inert records; refuses every other global."""

    def __init__(self, archive, prefix, data):
        super().__init__(data)
        self.archive, self.prefix, self.records, self.storages = archive, prefix, {}, {}

    def find_class(self, module, name):
        if (module, name) in BUILDERS:
            return BUILDERS[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.records:
                self.records[qualified] = type(name, (_Record,), {"qualified": qualified})
            return self.records[qualified]
        raise ArchiveRefused(f"its data names {module}.{name}, which is not a weight")

    def persistent_load(self, pid):
        """('storage', dtype, key, location, numel) -> a flat tensor of the stored bytes."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype)):
            raise ArchiveRefused(f"its data holds a reference {pid!r:.80} that is no storage")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            record = f"{self.prefix}/data/{key}"
            size = numel * torch.empty(0, dtype=dtype).element_size()
            if self.archive.getinfo(record).file_size != size:
                raise ArchiveRefused(f"storage {key} is not the {size} bytes it declares")
            raw = bytearray(self.archive.read(record))
            self.storages[key] = (torch.frombuffer(raw, dtype=dtype) if raw
                                  else torch.empty(0, dtype=dtype))
        return self.storages[key]


def _declarations(archive, prefix):
    """{qualified class name: its parameter and buffer names}, from the archive's code/."""
    found = {}
    code = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-len(".py")].replace("/", ".")
        for node in ast.parse(archive.read(name).decode("utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            names = []
            for item in node.body:
                if isinstance(item, ast.Assign) and len(item.targets) == 1 and \
                        getattr(item.targets[0], "id", None) in ("__parameters__",
                                                                 "__buffers__"):
                    names += ast.literal_eval(item.value)
            found[f"{module}.{node.name}"] = names
    return found


def _collect(record, prefix, declared, state_dict):
    """ScriptModule.state_dict() of the module `record`, into `state_dict`."""
    if record.qualified not in declared:
        return  # not a module: no weights of its own, as for state_dict()
    state = getattr(record, "state", None)
    if not isinstance(state, dict):
        raise ArchiveRefused(f"its module {record.qualified} keeps its state through its own "
                             f"__getstate__/__setstate__ code")
    for name in declared[record.qualified]:
        value = state.get(name)
        if isinstance(value, torch.Tensor):
            state_dict[prefix + name] = value
        elif value is not None:
            raise ArchiveRefused(f"{prefix}{name} of {record.qualified} is no tensor")
    for name, value in state.items():
        if isinstance(value, _Record):
            _collect(value, f"{prefix}{name}.", declared, state_dict)


def read_state_dict(path):
    """The parameters and buffers of the TorchScript archive at `path`, as
    torch.jit.load(path).state_dict() names them, without running its code.
    ArchiveRefused for anything but modules and tensors."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist()
                   if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ArchiveRefused("it has no single data.pkl")
        prefix = pickles[0].rpartition("/")[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and \
                archive.read(byteorder).decode() != sys.byteorder:
            raise ArchiveRefused(f"its tensors are not in this machine's {sys.byteorder}-endian "
                                 f"byte order")
        with archive.open(pickles[0]) as data:
            root = _WeightsUnpickler(archive, prefix, data).load()
        if not isinstance(root, _Record):
            raise ArchiveRefused("its data is not a module")
        state_dict = {}
        _collect(root, "", _declarations(archive, prefix), state_dict)
        return state_dict
