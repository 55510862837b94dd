"""What the prepare scripts share: the command line, the check of every raw image (with
image_files.py), the seeded train/val and query/gallery protocol, writing split folders of
links, splits.json and re-runs.

A split folder (e.g. train_val_test_split_dorsal_r) holds `<split>/<identity>/<file>` entries
that are hard links (symlinks across file systems) to the raw image, or, with --copy /
--max-side, to ONE copy per source image under `<out>/_images/<mode>/`: every entry of one
source image is then the same inode, which evaluation uses to encode each image once.
Its splits.json, written last, lists the source of every entry and marks the folder complete.
"""
import errno
import hashlib
import json
import os
import random
import re
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from handreid.core.config_files import ArgumentParser
from handreid.core.errors import UserError
from handreid.core.atomic_files import atomic_write, atomic_write_json
from handreid.data.image_files import WORKERS, eight_bit, image_problem, warn_skipped

FORMAT_VERSION = 1
MANIFEST = "splits.json"
IMAGES_DIR = "_images"
MIN_IMAGES = 2  # a train identity gives one val + >= 1 train image; a test one gallery + query
SUMMARY_SPLITS = ("train", "val", "train_all", "test", "query0", "gallery0", "gallery0_all")
# Keys of splits.json that must match for a re-run to be a no-op.
REQUEST_KEYS = ("format_version", "dataset", "seed", "num_splits", "protocol", "images",
                "raw_files")


def parse_args(description, default_raw, add_arguments=None, default_out=None):
    """The prepare scripts' shared command line; argument errors raise ConfigError.

    default_raw None makes --raw required; add_arguments(parser) adds a script's own options
    and may return a function check(args, parser) run on the parsed arguments."""
    parser = ArgumentParser(description=description)
    if default_raw is None:
        parser.add_argument("--raw", type=Path, required=True, help="raw dataset folder")
    else:
        parser.add_argument("--raw", type=Path, default=Path(default_raw),
                            help=f"raw dataset folder (default: {default_raw})")
    parser.add_argument("--out", type=Path, default=default_out and Path(default_out),
                        help="where the split folders go (default: "
                             f"{default_out or 'the --raw folder'})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--num-splits", type=int, default=10, help="query/gallery splits")
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--copy", action="store_true",
                        help="copy the images instead of hard-linking the raw files")
    images.add_argument("--max-side", type=int, default=None, metavar="N",
                        help="write copies resized so the longer side is at most N pixels")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild split folders prepared with another seed or protocol")
    check = add_arguments(parser) if add_arguments else None
    args = parser.parse_args()
    if args.num_splits < 1:
        parser.error(f"--num-splits must be >= 1, got {args.num_splits}")
    if args.max_side is not None and args.max_side < 1:
        parser.error(f"--max-side must be >= 1, got {args.max_side}")
    if check:
        check(args, parser)
    if args.out is None:
        args.out = args.raw
    args.images = ("link" if not args.copy and args.max_side is None
                   else "copy" if args.copy else f"max_side_{args.max_side}")
    return args


def is_number(text):
    return re.fullmatch(r"[0-9]+", text) is not None


def find_unusable_images(raw, sources):
    """{source: reason} for the sources (paths relative to raw) that are missing or do not
    decode; reported on stderr. Threads overlap the decoding (PIL releases the GIL)."""
    with ThreadPoolExecutor(WORKERS) as pool:
        problems = list(tqdm(pool.map(lambda source: image_problem(raw / source), sources),
                             total=len(sources), desc="checking images", unit="img",
                             disable=None))
    unusable = {s: problem for s, problem in zip(sources, problems) if problem}
    warn_skipped("missing or unreadable images",
                 [f"{source} ({reason})" for source, reason in unusable.items()])
    return unusable


def _pick(files, seed, *scope):
    """One of `files`, drawn by a generator seeded from (seed, scope) alone, so one identity's
    choice does not depend on which other identities or files exist (str seeds hash stably)."""
    return random.Random("|".join(map(str, (seed, *scope)))).choice(sorted(files))


def protocol_splits(train_ids, test_ids, seed, scope, num_splits):
    """The protocol on {identity: [source]}: val = one random image per train identity, train =
    the rest, train_all = both; for each split i, gallery{i} = one random image per test
    identity, query{i} = the rest. Identities with fewer than MIN_IMAGES usable images cannot
    give both parts: they are left out, reported and returned."""
    too_few = sorted(i for i, files in {**train_ids, **test_ids}.items() if len(files) < MIN_IMAGES)
    warn_skipped(f"{scope} identities with fewer than {MIN_IMAGES} usable images", too_few)
    train_all = {i: sorted(files) for i, files in train_ids.items() if len(files) >= MIN_IMAGES}
    test = {i: sorted(files) for i, files in test_ids.items() if len(files) >= MIN_IMAGES}
    for part, ids in (("train", train_all), ("test", test)):
        if not ids:
            raise UserError(f"{scope}: no {part} identity has {MIN_IMAGES} or more readable "
                            "images; the raw download is incomplete"
                            + (" (see the warnings above)" if too_few else ""))
    splits = {"train_all": train_all, "test": test, "train": {}, "val": {}}
    for identity, files in train_all.items():
        val = _pick(files, seed, scope, "val", identity)
        splits["val"][identity] = [val]
        splits["train"][identity] = [f for f in files if f != val]
    for i in range(num_splits):
        splits[f"gallery{i}"], splits[f"query{i}"] = {}, {}
        for identity, files in test.items():
            chosen = _pick(files, seed, scope, f"gallery{i}", identity)
            splits[f"gallery{i}"][identity] = [chosen]
            splits[f"query{i}"][identity] = [f for f in files if f != chosen]
    return splits, too_few


def count(splits):
    return {name: {"identities": len(ids), "images": sum(map(len, ids.values()))}
            for name, ids in splits.items()}


class ImageStore:
    """Links split entries to their source image. Mode 'link': the raw file itself; 'copy' and
    'max_side_N': ONE materialised copy per source under <out>/_images/<mode>/, reused by every
    entry (and by later runs, unless `fresh`), so all entries of a source share one inode."""

    def __init__(self, raw, out, mode, fresh):
        self.raw, self.mode, self.fresh = raw, mode, fresh
        self.root = None if mode == "link" else out / IMAGES_DIR / mode
        self.hard_links = True

    def target(self, source):
        return self.raw / source if self.root is None else self.root / source

    def materialise(self, sources):
        """Write the copies of `sources` that copy modes need (threads overlap the work)."""
        if self.root is None:
            return
        todo = [s for s in sources if self.fresh or not self.target(s).is_file()]
        with ThreadPoolExecutor(WORKERS) as pool:
            for _ in tqdm(pool.map(self._write_copy, todo), total=len(todo), unit="img",
                          desc=f"writing {self.mode} images", disable=None):
                pass

    def _write_copy(self, source):
        src, dst = self.raw / source, self.target(source)
        if self.mode == "copy":
            with src.open("rb") as handle:
                atomic_write(dst, lambda out: shutil.copyfileobj(handle, out))
            return
        with Image.open(src) as image:
            side = int(self.mode.rsplit("_", 1)[1])
            image = eight_bit(image)  # Pillow resizes 16-bit and float images badly or not
            image.thumbnail((side, side), Image.Resampling.BICUBIC)  # keeps the aspect ratio
            rgb = image.convert("RGB")
        atomic_write(dst, lambda out: rgb.save(out, "JPEG", quality=95))

    def link(self, source, entry):
        target = self.target(source)
        if self.hard_links:
            try:
                os.link(target, entry)
                return
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                self.hard_links = False  # another file system: symlinks from here on
        os.symlink(target.resolve(), entry)


def protocol_fingerprint(folder):
    """What a checkpoint keeps of the prepared split folder it was trained on (None if `folder`
    holds no splits.json): the folder, the sha256 of its splits.json, how many train and val
    identities it has, and `fingerprint`, one sha256 of the splits.json digest and the train
    and val identity names, equal for two folders only when they hold the same protocol."""
    folder = Path(folder)
    try:
        digest = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None
    identities = {split: sorted(p.name for p in (folder / split).iterdir() if p.is_dir())
                  if (folder / split).is_dir() else [] for split in ("train", "val")}
    fingerprint = hashlib.sha256(json.dumps([digest, identities]).encode()).hexdigest()
    return {"split_folder": str(folder.resolve()), "splits_json_sha256": digest,
            "train_identities": len(identities["train"]),
            "val_identities": len(identities["val"]), "fingerprint": fingerprint}


def folder_state(folder, request):
    """'missing', 'current' (prepared with this request), or why it holds something else."""
    if not os.path.lexists(folder):
        return "missing"
    if not folder.is_dir():
        return "exists and is not a folder"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"holds no {MANIFEST} (not made by this script, or its run was interrupted)"
    except (OSError, ValueError):
        return f"has an unreadable {MANIFEST}"
    differs = [k for k in REQUEST_KEYS if not isinstance(manifest, dict)
               or manifest.get(k) != request[k]]
    if not differs:
        return "current"
    shown = ", ".join("another protocol version" if k == "protocol"
                      else "other raw files (images added, removed or replaced since)"
                      if k == "raw_files" else f"{k}={manifest.get(k)!r} (now {request[k]!r})"
                      for k in differs)
    return f"was prepared with {shown}"


def _new_folder(parent, prefix):
    """A new uniquely named folder with the usual (umask) permissions, unlike mkdtemp's 0700."""
    path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def _swap_in(built, folder):
    """Replace `folder` by `built` with renames, so readers see the old or the new folder."""
    if not os.path.lexists(folder):
        os.rename(built, folder)
        return
    old = _new_folder(folder.parent, f".{folder.name}.old-")
    os.replace(folder, old)  # onto the empty temp folder
    os.rename(built, folder)
    shutil.rmtree(old)


def entry_basename(source):
    """The default name of a source's entry in its identity folder: the file name."""
    return PurePosixPath(source).name


def write_split_folder(folder, splits, manifest, store, entry_name=entry_basename):
    """Build the folder next to its final place, splits.json last, then swap it in: a failure
    never leaves a half-written split folder behind. entry_name(source) names each entry."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    built = _new_folder(folder.parent, f".{folder.name}.tmp-")
    try:
        entries = [(split, identity, source) for split, ids in sorted(splits.items())
                   for identity, files in sorted(ids.items()) for source in files]
        made = set()
        for split in splits:
            (built / split).mkdir()
        for split, identity, source in tqdm(entries, desc=f"linking {folder.name}", unit="file",
                                            disable=None):
            parent = built / split / identity
            if parent not in made:
                parent.mkdir()
                made.add(parent)
            store.link(source, parent / entry_name(source))
        atomic_write_json(built / MANIFEST, manifest)
        _swap_in(built, folder)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise


def _prune_images(out):
    """Drop _images/<mode> folders that no split folder uses any more (left by --overwrite with
    other image options). Split entries are hard links, so nothing that exists breaks."""
    images = out / IMAGES_DIR
    if not images.is_dir():
        return
    used = set()
    for path in out.glob(f"train_val_test_split*/{MANIFEST}"):
        try:
            used.add(json.loads(path.read_text()).get("images"))
        except (OSError, ValueError, AttributeError):
            return  # a folder we cannot read might need any of them: keep all
    for mode in images.iterdir():
        if mode.is_dir() and mode.name not in used:
            shutil.rmtree(mode)


def print_summary(counts_by_folder):
    """Identities/images per split, one row per split folder."""
    columns = [s for s in SUMMARY_SPLITS if any(s in c for c in counts_by_folder.values())]
    rows = [["split folder", *columns]]
    rows += [[name, *(f"{c[s]['identities']}/{c[s]['images']}" if s in c else "-"
                      for s in columns)] for name, c in counts_by_folder.items()]
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    print("identities/images per split:")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def raw_files(raw, inputs):
    """A digest of the names, sizes and modification times of the raw inputs (files, and the
    files inside folders, at any depth): a completed or repaired download changes it."""
    digest = hashlib.sha256()
    for name in inputs:
        path = raw / name
        if path.is_dir():
            files = sorted(str(PurePosixPath(Path(parent, f).relative_to(path)))
                           for parent, _, names in os.walk(path) for f in names)
        else:
            files = [path.name] if path.exists() else []
        for file in files:
            stat = (path / file if path.is_dir() else path).stat()
            digest.update(f"{name}/{file}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def prepare(args, dataset, protocol, folders, build, inputs, entry_name=entry_basename):
    """Write the split folders `folders` under args.out, or say they are up to date.

    build(raw) reads the raw data and returns {folder: manifest fields}, each with "splits"
    ({split: {identity: [source]}}) and "skipped"; it runs only when something must be built.
    `inputs` are the raw files and folders it reads, relative to the raw folder.
    entry_name(source) names a source's entry in its identity folder (default: file name).
    """
    out = args.out
    request = {"format_version": FORMAT_VERSION, "dataset": dataset, "seed": args.seed,
               "num_splits": args.num_splits, "protocol": protocol, "images": args.images,
               "raw_files": raw_files(args.raw, inputs)}
    states = {name: folder_state(out / name, request) for name in folders}
    conflicts = {n: s for n, s in states.items() if s not in ("missing", "current")}
    if conflicts and not args.overwrite:
        name, state = next(iter(conflicts.items()))
        raise UserError(f"{out / name} {state}; pass --overwrite to rebuild it, or choose "
                        "another --out")
    todo = [n for n in folders if args.overwrite or states[n] != "current"]
    if not todo:
        print(f"{out}: up to date (seed {args.seed}, {args.num_splits} splits, images "
              f"{args.images}); nothing to do (--overwrite rebuilds)")
        print_summary({n: json.loads((out / n / MANIFEST).read_text())["counts"]
                       for n in folders})
        return
    prepared = build(args.raw)
    store = ImageStore(args.raw, out, args.images, fresh=args.overwrite)
    try:
        store.materialise(sorted({source for name in todo
                                  for ids in prepared[name]["splits"].values()
                                  for files in ids.values() for source in files}))
        for name in todo:
            manifest = {**request, **prepared[name], "raw": str(args.raw.resolve()),
                        "counts": count(prepared[name]["splits"])}
            write_split_folder(out / name, prepared[name]["splits"], manifest, store,
                               entry_name)
        _prune_images(out)
    except OSError as err:  # full disk, no permission, --out is a file, ...
        raise UserError(f"cannot write the split folders under {out}: {err}") from None
    print(f"prepared {', '.join(todo)} in {out} (seed {args.seed}, {args.num_splits} splits, "
          f"images {args.images})")
    print_summary({n: count(prepared[n]["splits"]) for n in folders})
