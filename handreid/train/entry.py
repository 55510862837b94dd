"""What every train script does after its imports: parse --config/--set/--overwrite, check the
config for the script's method, load the data, build the method, run the engine, print where
the files are. A train script is a few lines: train_main(MethodClass, description), or
train_main(None, description) for the method the config names (experiments/train.py).
"""
import contextlib
import sys

import torch.distributed as dist

from handreid.core import registry
from handreid.data.loaders import get_train_val_loaders
from handreid.train.checkpointing import read_resume_state
from handreid.core.config_files import config_from_args, make_parser
from handreid.train.engine import Engine
from handreid.core.errors import ConfigError, UserError, check_writable
from handreid.core.runtime import (check_not_running, configure_backends, init_distributed, is_main_process,
                     lock_path, resolve_precision, run_lock, seed_everything)


def training_parser(description, default_config=None):
    """--config, --set and --overwrite, as every train script takes them."""
    parser = make_parser(description, default_config)
    parser.add_argument("--overwrite", action="store_true",
                        help="train from scratch even if save_path holds a finished or "
                             "unfinished run (its files are replaced as the new run writes)")
    return parser


def check_method(config, name):
    """ConfigError unless `config` is for the method `name` that a train script trains."""
    if registry.load(config["method"]).name != name:
        raise ConfigError(f"this script trains method {name} but the config says method: "
                          f"{config['method']}; set method: {name}, or train it with "
                          f"{registry.train_command(config['method'], 'its own script')}")


def report(summary, is_main):
    """Rank 0 prints where the run's files are."""
    if not is_main:
        return
    value = summary["best_value"]
    best = (f"epoch {summary['best_epoch']}" + ("" if value is None else
                                                 f", {summary['selection']} {value:.4g}"))
    print(f"checkpoint ({best}): {summary['save_path']}")
    print(f"log: {summary['log_path']}\nmetrics: {summary['metrics_path']}\n"
          f"curve: {summary['curve_path']}\nresume state / finished-run record: "
          f"{summary['resume_path']}")


@contextlib.contextmanager
def log_lock(config):
    """Rank 0 holds a lock on log_path for the whole run, as the engine does on save_path: two
    runs given one log_path would interleave its lines and overwrite each other's metrics and
    curve. UserError naming the log and its holder when another run has it."""
    if not is_main_process():
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run_lock(config["log_path"]))
        except UserError:
            holder = lock_path(config["log_path"]).read_text().strip() or "another process"
            raise UserError(f"log_path {config['log_path']} is written by another training "
                            f"run ({holder}); set another log_path, or leave log_path out: it "
                            f"then follows save_path") from None
        yield


def degenerate_settings(config, train_set):
    """Settings a run starts with but learns little or nothing from -> [one line each]."""
    found = []
    if len(train_set.classes) == 1:
        found.append(f"train/ holds one identity ({train_set.classes[0]}): there is nobody to "
                     f"tell apart, the features learn nothing about who is who; prepare data "
                     f"with more identities")
    if config["batch_size"] > len(train_set):
        found.append(f"batch_size {config['batch_size']} is larger than the training set "
                     f"({len(train_set)} images): an epoch is one optimizer step; lower "
                     f"batch_size")
    if config["lr"] == 0:
        found.append("lr is 0: the weights it drives (the image encoder and its heads) never "
                     "change; set lr: to a positive value")
    return found


def run_training(method_class, config, overwrite=False):
    """Data, model, method, engine for `config`; -> (the engine's summary, is rank 0)."""
    device = init_distributed(config)
    configure_backends(config, device)
    try:
        # Refuse a bad amp, a running or finished run or a mismatched resume state before
        # loading data.
        resolve_precision(config["amp"], device)
        if is_main_process():
            check_not_running(config["save_path"])
        read_resume_state(config, overwrite)
        if is_main_process():
            for path in (config["save_path"], config["log_path"]):
                check_writable(path)
        with log_lock(config):
            seed_everything(config["seed"])
            train_loader, val_loader, _ = get_train_val_loaders(config)
            if is_main_process():
                for warning in degenerate_settings(config, train_loader.dataset):
                    print(f"warning: {warning}", file=sys.stderr)
            method = method_class.build(config, list(train_loader.dataset.classes))
            if is_main_process():
                # Room for one checkpoint now, not at the first save point epochs later.
                check_writable(config["save_path"], room=sum(
                    t.numel() * t.element_size() for t in method.model.state_dict().values()))
            engine = Engine(method, train_loader, config, device, val_loader,
                            overwrite=overwrite)
            summary = engine.train()
    finally:
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing; no rank tears down before it ends
            dist.destroy_process_group()
    return summary, engine.is_main


def train_main(method_class, description, argv=None, default_config=None):
    """A train script's main(): the first line of `description` is its --help text.
    `method_class` None trains the method that the config's `method:` names."""
    args = training_parser(description.partition("\n")[0], default_config).parse_args(argv)
    config = config_from_args(args)
    if method_class is None:
        method_class = registry.load(config["method"]).method_class
    check_method(config, method_class.name)
    method_class.check_config(config)
    report(*run_training(method_class, config, args.overwrite))
    return 0
