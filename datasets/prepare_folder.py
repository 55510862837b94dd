"""Your own identity-folder dataset -> the same protocol as 11k and HD, in
<out>/train_val_test_split/: train_all, train, val, test, query{i}, gallery{i} and splits.json.

    python datasets/prepare_folder.py --raw <root> [--out DIR] [--test-fraction F | --test-ids FILE]
        [--distractors <root2>] [--seed 0] [--num-splits 10] [--copy | --max-side N] [--overwrite]

Layout: <root>/<identity>/<images>: one folder per person, named by the identity; images may
sit in nested folders inside it and be jpg, jpeg, png, bmp, webp, tif or tiff. The split is
by identity: a seeded draw of --test-fraction of the identities (or the names listed in
--test-ids) are test identities, the rest training identities; no identity is in both. Then,
as for 11k/HD: val = one random image per training identity, train = the rest; for split i,
gallery{i} = one random image per test identity, query{i} = the rest. --distractors adds every
image of another <root2>/<identity>/<images> tree to every gallery, labelled
distractor__<identity> (a label no identity of <root> may have). Unreadable images, other
files and identities with fewer than 2 usable images are reported by name and skipped.
"""
import os
import random
from pathlib import Path, PurePosixPath

from handreid.core.startup import start

start()

from handreid.data import split_protocol
from handreid.core.config_files import DEFAULT_DATA_DIRS
from handreid.core.errors import run_cli, UserError
from handreid.data.image_files import IMAGE_SUFFIXES, warn_skipped

FOLDER = "train_val_test_split"
DISTRACTOR_PREFIX = "distractor__"
NESTED_SEPARATOR = "__"  # <identity>/left/1.jpg is entry left__1.jpg of its identity folder
LAYOUT = "<root>/<identity>/<images>"


def add_arguments(parser):
    test = parser.add_mutually_exclusive_group()
    test.add_argument("--test-fraction", type=float, default=0.5, metavar="F",
                      help="fraction of the identities drawn (seeded) as test identities "
                           "(default: 0.5)")
    test.add_argument("--test-ids", type=Path, default=None, metavar="FILE",
                      help="text file naming the test identities, one folder name a line "
                           "(blank lines and lines starting with # ignored)")
    parser.add_argument("--distractors", type=Path, default=None, metavar="ROOT2",
                        help="another <root2>/<identity>/<images> tree whose images join every "
                             "gallery as distractors")
    return check_arguments


def check_arguments(args, parser):
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
    roots = {"--raw": args.raw, "--out": args.out}
    if args.distractors is not None:
        roots["--distractors"] = args.distractors
    resolved = {flag: path.resolve() for flag, path in roots.items()}
    for flag, path in resolved.items():
        for other, other_path in resolved.items():
            if flag != other and (path == other_path or other_path in path.parents):
                parser.error(f"{flag} {roots[flag]} lies inside {other} {roots[other]}; "
                             "keep the three folders apart (the split folders would be read "
                             "as identities)")


def read_test_ids(path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --test-ids {path} ({err}); give a UTF-8 text file with "
                        "one identity folder name a line") from None
    names = sorted({line.strip() for line in lines} - {""})
    names = [n for n in names if not n.startswith("#")]
    if not names:
        raise UserError(f"--test-ids {path} names no identity; write one identity folder name "
                        "a line")
    return names


def list_tree(base, root, what, others):
    """{identity: [source]} of the images under root/<identity>/ (any depth), sources relative
    to `base`. Files that are not images (by suffix) and files directly in root are added to
    `others`; hidden files and folders (.DS_Store, .git) are ignored."""
    if not root.is_dir():
        raise UserError(f"{what} {root} is not a folder; give the root of a {LAYOUT} tree")
    identities, loose = {}, []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            loose.append(entry)
            continue
        files = sorted(p for p in entry.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        others += [str(p.relative_to(root)) for p in files
                   if p.suffix.lower() not in IMAGE_SUFFIXES]
        identities[entry.name] = [str(PurePosixPath(p.relative_to(base))) for p in images]
    loose_images = [p for p in loose if p.suffix.lower() in IMAGE_SUFFIXES]
    if not any(identities.values()):
        found = (f"holds {len(loose_images)} images but no identity folders"
                 if loose_images else "holds no identity folder with images")
        raise UserError(f"{what} {root} {found}; arrange it as {LAYOUT}: one folder per "
                        "person, named by the identity")
    others += [p.name for p in loose]
    return identities


def entry_namer(base, roots):
    """entry_name(source) for split_protocol: the path inside its identity folder, folders
    joined by NESTED_SEPARATOR."""
    depth = {PurePosixPath(r.relative_to(base)).parts if r != base else () for r in roots}

    def entry_name(source):
        parts = PurePosixPath(source).parts
        skip = max(len(d) for d in depth if parts[:len(d)] == d) + 1  # root, then identity
        return NESTED_SEPARATOR.join(parts[skip:])
    return entry_name


def check_entry_names(identities, entry_name):
    for identity, files in identities.items():
        seen = {}
        for source in files:
            name = entry_name(source)
            if name in seen:
                raise UserError(f"identity {identity!r}: {seen[name]} and {source} would both be "
                                f"named {name} in the split folders; rename one of them")
            seen[name] = source


def split_identities(identities, test_ids, fraction, seed):
    """-> (train {identity: [source]}, test {...}). Identities with too few images go to the
    side the protocol then reports them from; --test-ids names must exist."""
    eligible = sorted(i for i, files in identities.items()
                      if len(files) >= split_protocol.MIN_IMAGES)
    if test_ids is not None:
        unknown = [i for i in test_ids if i not in identities]
        if unknown:
            raise UserError(f"--test-ids names {len(unknown)} identities with no folder of "
                            f"images in --raw: {', '.join(unknown[:5])}; fix the list")
        test = set(test_ids)
    else:
        if len(eligible) < 2:
            raise UserError(f"only {len(eligible)} of {len(identities)} identity folder(s) "
                            f"have {split_protocol.MIN_IMAGES} or more readable images; the "
                            "identity split needs at least 2")
        count = min(len(eligible) - 1, max(1, round(fraction * len(eligible))))
        test = set(random.Random(f"{seed}|folder|test_ids").sample(eligible, count))
    return ({i: f for i, f in identities.items() if i not in test},
            {i: f for i, f in identities.items() if i in test})


def build(base, args, identities, distractors, others, test_ids):
    """{folder: manifest fields}; see split_protocol.prepare."""
    formats = ", ".join(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)
    warn_skipped(f"files that are not images ({formats})", others)
    sources = sorted(s for ids in (identities, distractors) for files in ids.values()
                     for s in files)
    unusable = split_protocol.find_unusable_images(base, sources)
    usable = [{i: [f for f in files if f not in unusable] for i, files in ids.items()}
              for ids in (identities, distractors)]
    train, test = split_identities(usable[0], test_ids, args.test_fraction, args.seed)
    splits, too_few = split_protocol.protocol_splits(train, test, args.seed, "folder",
                                                     args.num_splits)
    extra = {f"{DISTRACTOR_PREFIX}{i}": files for i, files in usable[1].items() if files}
    for i in range(args.num_splits):
        splits[f"gallery{i}"].update(extra)
    skipped = {"non_image_files": others, "identities_with_too_few_images": too_few,
               "unusable_images": unusable}
    return {FOLDER: {"splits": splits, "skipped": skipped}}


def main():
    args = split_protocol.parse_args(__doc__.split("\n\n")[0], None, add_arguments,
                                     DEFAULT_DATA_DIRS["folder"])
    raw = args.raw.resolve()
    roots = [raw] + ([args.distractors.resolve()] if args.distractors else [])
    # Sources are relative to the folder that holds both trees, so one store serves both.
    base = Path(os.path.commonpath(roots))
    others = []
    identities = list_tree(base, raw, "--raw", others)
    distractors = list_tree(base, roots[1], "--distractors", others) if args.distractors else {}
    clashing = [i for i in identities if i.startswith(DISTRACTOR_PREFIX)]
    if distractors and clashing:
        raise UserError(f"identity folder {clashing[0]!r} starts with {DISTRACTOR_PREFIX!r}, the "
                        "distractor label prefix; rename it")
    entry_name = entry_namer(base, roots)
    check_entry_names({**identities, **{f"{DISTRACTOR_PREFIX}{i}": f
                                        for i, f in distractors.items()}}, entry_name)
    test_ids = read_test_ids(args.test_ids) if args.test_ids else None
    protocol = {"layout": LAYOUT, "image_suffixes": list(IMAGE_SUFFIXES), "root": str(raw),
                "test": {"ids": test_ids} if test_ids else {"fraction": args.test_fraction},
                "distractors": str(roots[1]) if args.distractors else None,
                "distractor_label": f"{DISTRACTOR_PREFIX}<identity>",
                "nested_entry_separator": NESTED_SEPARATOR,
                "min_images_per_identity": split_protocol.MIN_IMAGES}
    inputs = [str(r.relative_to(base)) if r != base else "." for r in roots]
    args.raw = base  # the manifest's "raw": what its sources are relative to
    split_protocol.prepare(args, "folder", protocol, [FOLDER],
                           lambda _: build(base, args, identities, distractors, others, test_ids),
                           inputs, entry_name)


if __name__ == "__main__":
    run_cli(main)
