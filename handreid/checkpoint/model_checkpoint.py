"""The checkpoint format: what a finished training run hands to evaluation, search and export.

One torch file (format "clip-handid", version 2): the full CLIP state_dict, every extra module
of the method by name with the spec that rebuilds it (backbone.build_module: a generic kind or
one the method registered), the retrieval feature, the resolved config, the identity names,
the epoch and the selection record; since these were added, `data` (the fingerprint of the
prepared split folder it trained on: split_protocol.protocol_fingerprint) and
`planned_epochs` (the run's epochs over all phases), both absent from older files, which
still load. First-release files are converted on load (legacy.py). Written atomically.

Beside it, <stem>.resume.pth (train/checkpointing.py) holds the run's resume state, or the
record that it finished; evaluation reads it (run_record, unfinished_note) without the engine.
"""
import math
from pathlib import Path

import torch

from handreid.checkpoint import legacy
from handreid.model import backbone
from handreid.core import registry
from handreid.core.atomic_files import atomic_write
from handreid.core.errors import UserError

CHECKPOINT_FORMAT = "clip-handid"
CHECKPOINT_VERSION = 2
CHECKPOINT_KEYS = ("method", "config", "backbone", "quick_gelu", "image_size", "embed_dim",
                   "clip_state_dict", "modules", "module_specs", "feature", "identity_names",
                   "epoch", "selection")


def save_checkpoint(path, model, config, identity_names, epoch, method, module_specs,
                    selection=None, state=None, data=None, planned_epochs=None):
    """Write a checkpoint of `method` (its name) atomically (a kill mid-write leaves the old
    file): the full CLIP state_dict, every extra module's state by name with how to rebuild it
    (module_specs), the retrieval feature, the resolved config, the identity names, the epoch
    and the selection record ({"metric", "value", per-signal values}), the fingerprint of the
    training data (`data`) and the run's planned epochs. `state` (a HandIdModel state_dict)
    replaces the model's current weights, e.g. those of an earlier best epoch."""
    arch, pretrained = backbone.resolve_backbone(config)
    state = model.state_dict() if state is None else state
    obj = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "method": method,
        "config": dict(config),
        "backbone": f"{arch}/{pretrained}",
        "quick_gelu": backbone.quick_gelu(config),
        "image_size": backbone.image_size(config, arch),
        "embed_dim": backbone.embed_dim(config),
        "clip_state_dict": _substate(state, "clip_model."),
        "modules": {name: _substate(state, f"extras.{name}.") for name in model.extras},
        "module_specs": module_specs,
        "feature": dict(model.feature),
        "identity_names": list(identity_names),
        "epoch": int(epoch),
        "selection": selection or {},
        "data": data,
        "planned_epochs": planned_epochs,
    }
    atomic_write(path, lambda f: torch.save(obj, f))


def _substate(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def resume_file(save_path):
    """<stem>.resume.pth beside a checkpoint: its run's resume state, or the record that the
    run finished (train/checkpointing.py writes it)."""
    path = Path(save_path)
    return path.with_name(f"{path.stem}.resume.pth")


def run_record(save_path):
    """(finished, epochs trained) from the resume state beside `save_path`, or None when there
    is none or it cannot be read (training reports that itself)."""
    path = resume_file(save_path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return bool(state["finished"]), int(state["epoch"])
    except Exception:
        return None


def unreadable(path, err):
    """The words evaluation and training both use for a checkpoint file that does not load."""
    return (f"cannot read checkpoint {path}: corrupt, truncated or not a torch file "
            f"({type(err).__name__})")


def checkpoint_problem(path):
    """None if `path` holds a loadable torch file, else what is wrong with it, in the words
    read_checkpoint uses (training checks a finished run's checkpoint with it)."""
    if not Path(path).is_file():
        return f"checkpoint not found: {path}"
    try:  # mmap: reads the file's index, not its tensors (a truncated file has none)
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # files of the old (non-zip) torch format cannot be mapped
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            return unreadable(path, err)
    return None


def unfinished_note(save_path, ckpt):
    """"epoch k of n" when the run that wrote this checkpoint did not finish, else None: its
    resume state beside it says so (k: the epochs trained), or, with no state beside it, a run
    that keeps its last epoch (selection: last, or no val/) saved an epoch below the planned
    ones. A best-epoch checkpoint alone (state deleted or not copied) tells nothing: its run
    may have finished after its best epoch."""
    planned = ckpt.get("planned_epochs")
    record = run_record(save_path)
    if record is not None:
        finished, done = record
    elif planned and ckpt["selection"].get("metric") in (None, "last"):
        finished, done = ckpt["epoch"] >= planned, ckpt["epoch"]
    else:
        return None
    if finished:
        return None
    return f"epoch {done} of {planned}" if planned else f"epoch {done}"


def read_checkpoint(path, train_command):
    """The checkpoint at `path` in today's layout (first-release files converted); UserError
    naming `train_command` (the expected method's) if it is missing, unreadable or foreign.
    A missing or unreadable file of a finished run gets the fix training gives for it."""
    path = Path(path)
    if not path.is_file():
        record = run_record(path)
        if record and record[0]:
            raise UserError(f"checkpoint not found: {path}, though {resume_file(path)} records "
                            f"that its training finished; train first: {train_command} "
                            f"--overwrite, or restore the file")
        raise UserError(f"checkpoint not found: {path}; train first: {train_command} "
                        f"(or set save_path: to an existing checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{unreadable(path, err)}; train again: {train_command} "
                        f"--overwrite, or restore the file") from None
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found not in (CHECKPOINT_FORMAT, legacy.CHECKPOINT_V1[0]):
        raise UserError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (found {found!r}); "
                        f"point save_path: at a checkpoint written by this project's training")
    version = (CHECKPOINT_VERSION if found == CHECKPOINT_FORMAT
               else legacy.CHECKPOINT_V1[1])
    if ckpt.get("format_version") != version:
        raise UserError(f"{path} has {found} format version {ckpt.get('format_version')!r}, "
                        f"this code reads version {version}; retrain with this code: "
                        f"{train_command}")
    absent = [key for key in (CHECKPOINT_KEYS if found == CHECKPOINT_FORMAT
                                else legacy.CHECKPOINT_V1_KEYS)
              if key not in ckpt]
    if absent:
        raise UserError(f"{path} is an incomplete {found} checkpoint (no "
                        f"{', '.join(absent)}); retrain: {train_command}")
    return ckpt if found == CHECKPOINT_FORMAT else legacy.checkpoint_from_v1(ckpt)


def check_matches_config(path, ckpt, config):
    """UserError unless the checkpoint fits `config`: method, backbone, dataset, aspect, image
    size, normalisation, and what the method itself checks (Method.check_checkpoint)."""
    trained, method = ckpt["config"], ckpt["method"]
    if method not in registry.known():
        raise UserError(f"{path} was written by the training method {method!r}, which this "
                        f"code does not know (known: {', '.join(registry.known())}); "
                        f"evaluate it with the code that trained it")
    if method != registry.load(config["method"]).name:
        raise UserError(f"{path} was trained by method {method!r} but the config says method: "
                        f"{config['method']}; set method: {method}, or point save_path: at a "
                        f"{config['method']} checkpoint "
                        f"({registry.train_command(config['method'])})")
    arch, pretrained = backbone.resolve_backbone(config)
    if ckpt["backbone"].split("/", 1)[0] != arch or \
            ckpt["quick_gelu"] != backbone.quick_gelu(config):
        raise UserError(f"{path} holds a {ckpt['backbone']} model (model: {trained['model']}) "
                        f"but the config says model: {config['model']} ({arch}/{pretrained}); "
                        f"set model: {trained['model']} or point save_path: at a matching "
                        f"checkpoint")
    for key in ("dataset", "aspect") if config["dataset"] == "11k" else ("dataset",):
        if trained.get(key) != config[key]:
            raise UserError(f"{path} was trained on {key} {trained.get(key)!r} but the config "
                            f"says {key}: {config[key]}; point save_path: at the checkpoint "
                            f"of {config[key]} or set {key}: {trained.get(key)}")
    if backbone.image_hw(ckpt["image_size"]) != \
            backbone.image_hw(backbone.image_size(config, arch)):
        trained_size = backbone.size_text(ckpt["image_size"])
        raise UserError(f"{path} was trained at image_size {trained_size} but the config "
                        f"gives {backbone.size_text(backbone.image_size(config, arch))}; "
                        f"set image_size: {trained_size}")
    if trained.get("normalize", "clip") != config["normalize"]:
        raise UserError(f"{path} was trained with normalize: {trained.get('normalize', 'clip')} "
                        f"but the config says normalize: {config['normalize']}; set normalize: "
                        f"{trained.get('normalize', 'clip')}")
    registry.load(method).method_class.check_checkpoint(path, trained, config)


# Bounds of a module spec's constructor arguments, far above any real model: sizes (widths,
# class counts, heads) at most MAX_MODULE_SIZE and their product (about the weights the
# module allocates: dim x num_classes) at most MAX_MODULE_ELEMENTS (4 GiB of float32); texts
# (a prompt template) at most MAX_SPEC_TEXT characters; flags, finite numbers and None.
MAX_MODULE_SIZE, MAX_MODULE_ELEMENTS, MAX_SPEC_TEXT = 1 << 22, 1 << 30, 1000


def _bad_spec(spec):
    """What is wrong with one module spec, or None."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        return "not a {'kind': ...} mapping"
    elements = 1
    for key, value in spec.items():
        if isinstance(value, int) and not isinstance(value, bool) \
                and 0 <= value <= MAX_MODULE_SIZE:
            elements *= max(value, 1)
        elif not (value is None or isinstance(value, bool)
                  or isinstance(value, float) and math.isfinite(value)
                  or isinstance(value, str) and len(value) <= MAX_SPEC_TEXT):
            return (f"{key}: {str(value)[:40]!r} is not a size in 0..{MAX_MODULE_SIZE}, a "
                    f"flag, a finite number or a short text")
    if elements > MAX_MODULE_ELEMENTS:
        return f"its sizes ask for {elements:.2e} weights, over {MAX_MODULE_ELEMENTS:.2e}"
    return None


def check_modules(path, ckpt):
    """Every module the feature or the specs name is there, of a kind this code builds, its
    spec within sane sizes (a crafted spec must not ask for a terabyte)."""
    specs, states = ckpt["module_specs"], ckpt["modules"]
    if not all(isinstance(part, dict) for part in (specs, states, ckpt["feature"])):
        raise UserError(f"{path} is a damaged checkpoint (module_specs, modules or feature is "
                        f"not a mapping); retrain it ({registry.train_command(ckpt['method'])})")
    for name, spec in specs.items():
        problem = _bad_spec(spec)
        if problem:
            raise UserError(f"{path} has an invalid spec for module {str(name)[:40]!r} "
                            f"({problem}); it is damaged or not made by this code: retrain it "
                            f"({registry.train_command(ckpt['method'])})")
    needed = [ckpt["feature"].get("module")] + list(ckpt["feature"].get("modules", []))
    for name in [n for n in needed if n] + list(specs):
        if name not in specs or not isinstance(states.get(name), dict):
            raise UserError(f"{path} is a {ckpt['method']} checkpoint without its module "
                            f"{name!r}; it is incomplete: retrain it "
                            f"({registry.train_command(ckpt['method'])})")
    unknown = sorted({spec["kind"] for spec in specs.values()
                      if backbone.module_class(spec["kind"]) is None})
    if unknown or backbone.feature_function(ckpt["feature"].get("kind")) is None:
        what = f"module kind {unknown[0]!r}" if unknown else \
            f"feature {ckpt['feature'].get('kind')!r}"
        raise UserError(f"{path} uses a {what} that this code does not know; evaluate it with "
                        f"the code that trained it")


def load_strict(module, state_dict, path, what, train_command):
    """Load `state_dict` into `module` strictly; UserError naming what does not fit."""
    expected = module.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    resized = [k for k in expected.keys() & state_dict.keys()
               if expected[k].shape != state_dict[k].shape]
    if missing or unexpected or resized:
        example = sorted(missing or unexpected or resized)[0]
        raise UserError(f"{path}: {what} weights do not fit the configured model "
                        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(resized)} "
                        f"with another shape, e.g. '{example}'); use the config it was "
                        f"trained with or retrain: {train_command}")
    module.load_state_dict(state_dict, strict=True)


def load_checkpoint(path, config, device="cpu", freeze_text=True):
    """-> (HandIdModel, ckpt) from a checkpoint of any known method, checked against `config`
    (method, backbone, dataset, aspect, image size, the method's own checks) and loaded
    strictly; the model computes the checkpoint's retrieval feature with the kinds its method
    registered (the method's file is imported, its training code is not run). No weights are
    downloaded: the architecture is built random-initialised, then overwritten."""
    command = registry.train_command(config["method"])
    ckpt = read_checkpoint(path, command)
    check_matches_config(path, ckpt, config)
    check_modules(path, ckpt)
    # The network the checkpoint trained (layer4's stride is the checkpoint's, not the config's).
    built = {**config, "resnet_last_stride": ckpt["config"].get("resnet_last_stride", 2)}
    with backbone.weights_follow():
        clip_model = backbone.create_clip(built)
    load_strict(clip_model, ckpt["clip_state_dict"], path, "CLIP", command)
    if freeze_text:
        backbone.freeze_text_tower(clip_model)
    extras = {}
    for name, spec in ckpt["module_specs"].items():
        try:
            extras[name] = backbone.build_module(spec)
        except (TypeError, ValueError) as err:  # keys or values its class does not take
            raise UserError(f"{path}: module {name!r} cannot be built from its spec "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:80]}); it is "
                            f"damaged or not made by this code: retrain it ({command})") from None
        load_strict(extras[name], ckpt["modules"][name], path, name, command)
    model = backbone.HandIdModel(clip_model, extras=extras, feature=ckpt["feature"])
    return model.to(device), ckpt
