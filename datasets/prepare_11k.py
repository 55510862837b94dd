"""Raw 11k Hands (HandInfo.csv + Hands/) -> the published 11k protocol (MBA-Net / CLIP-HandID): one split
folder per aspect, <out>/train_val_test_split_<aspect>/, with train_all, train, val, test,
query{i}, gallery{i}, gallery{i}_all and splits.json.

    python datasets/prepare_11k.py --raw datasets/11khands [--out DIR] [--seed 0]
        [--num-splits 10] [--copy | --max-side N] [--overwrite]
"""
import csv
from collections import defaultdict
from pathlib import Path

from handreid.core.startup import start

start()

from handreid.data import split_protocol
from handreid.core.schema import ASPECTS
from handreid.core.errors import run_cli, UserError
from handreid.data.image_files import IMAGE_SUFFIXES, warn_skipped

DOWNLOAD = "download Hands.zip and HandInfo.csv from https://sites.google.com/view/11khands"
ASPECT_OF_HAND = {"dorsal right": "dorsal_r", "dorsal left": "dorsal_l",
                  "palmar right": "palmar_r", "palmar left": "palmar_l"}
# Identities with id <= T are training identities, the others test identities.
TRAIN_MAX_ID = {"dorsal_r": 1050, "dorsal_l": 1037, "palmar_r": 1051, "palmar_l": 1042}
COLUMNS = ("id", "accessories", "aspectOfHand", "imageName")  # the ones the protocol reads
PROTOCOL = {"keep": "accessories == 0", "train_max_id": TRAIN_MAX_ID,
            "min_images_per_identity": split_protocol.MIN_IMAGES,
            "gallery_all": {"aspects": list(ASPECTS), "other_aspect_label": "<aspect>__<id>"}}


def folder_name(aspect):
    return f"train_val_test_split_{aspect}"


def read_rows(path):
    """The CSV rows as dicts keyed by the (stripped) header names."""
    if not path.is_file():
        raise UserError(f"{path} not found: {DOWNLOAD} into {path.parent}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in reader.fieldnames]
            if missing:
                raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; expected the "
                                "11k header id,age,gender,skinColor,accessories,nailPolish,"
                                f"aspectOfHand,imageName,irregularities ({DOWNLOAD})")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read {path} as a CSV file ({err}); {DOWNLOAD}") from None


def kept_images(rows):
    """{aspect: {identity: [source]}} of the rows the protocol keeps (accessories == 0); rows
    that cannot be read are reported and left out."""
    kept = {aspect: defaultdict(list) for aspect in ASPECTS}
    malformed, seen = [], set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        identity, accessories, aspect, name = ((row.get(c) or "").strip() for c in COLUMNS)
        problem = ("id is not a number" if not split_protocol.is_number(identity)
                   else "unknown aspectOfHand" if aspect not in ASPECT_OF_HAND
                   else "accessories is not a number" if not split_protocol.is_number(accessories)
                   else "bad imageName" if not name or Path(name).name != name
                   else "imageName listed twice" if name in seen else None)
        if problem:
            malformed.append(f"line {line} ({problem})")
            continue
        seen.add(name)
        if int(accessories) == 0:
            kept[ASPECT_OF_HAND[aspect]][identity].append(f"Hands/{name}")
    warn_skipped("malformed rows of HandInfo.csv", malformed)
    return kept, malformed


def missing_hands(raw):
    """The message for a raw folder without Hands/: images unzipped beside HandInfo.csv
    instead (Hands.zip extracted without its folder) are noticed and the move named."""
    loose = sorted(p.name for p in raw.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        return (f"{raw / 'Hands'} not found, but {raw} holds {len(loose)} images beside "
                f"HandInfo.csv (e.g. {loose[0]}); move them into {raw / 'Hands'}/, where the "
                "11k layout keeps them")
    return f"{raw / 'Hands'} not found: {DOWNLOAD} and unzip Hands.zip into {raw}"


def build(raw, seed, num_splits):
    """{folder: manifest fields} of the four aspects; see split_protocol.prepare."""
    kept, malformed = kept_images(read_rows(raw / "HandInfo.csv"))
    if not (raw / "Hands").is_dir():
        raise UserError(missing_hands(raw))
    sources = sorted(s for ids in kept.values() for files in ids.values() for s in files)
    unusable = split_protocol.find_unusable_images(raw, sources)
    prepared = {}
    for aspect in ASPECTS:
        usable = {i: [f for f in files if f not in unusable] for i, files in kept[aspect].items()}
        threshold = TRAIN_MAX_ID[aspect]
        splits, too_few = split_protocol.protocol_splits(
            {i: files for i, files in usable.items() if int(i) <= threshold},
            {i: files for i, files in usable.items() if int(i) > threshold},
            seed, aspect, num_splits)
        skipped = {"malformed_csv_rows": malformed, "identities_with_too_few_images": too_few,
                   "unusable_images": {s: unusable[s] for files in kept[aspect].values()
                                       for s in files if s in unusable}}
        prepared[folder_name(aspect)] = {"aspect": aspect, "splits": splits, "skipped": skipped}
    # gallery{i}_all: every aspect's gallery{i}; the other aspects' identities are distractors
    # with labels that cannot equal an id of this aspect.
    for aspect in ASPECTS:
        splits = prepared[folder_name(aspect)]["splits"]
        for i in range(num_splits):
            splits[f"gallery{i}_all"] = {
                identity if other == aspect else f"{other}__{identity}": files
                for other in ASPECTS for identity, files
                in prepared[folder_name(other)]["splits"][f"gallery{i}"].items()}
    return prepared


def main():
    args = split_protocol.parse_args(__doc__.split("\n\n")[0], "datasets/11khands")
    split_protocol.prepare(args, "11k", PROTOCOL, [folder_name(a) for a in ASPECTS],
                           lambda raw: build(raw, args.seed, args.num_splits),
                           ["HandInfo.csv", "Hands"])


if __name__ == "__main__":
    run_cli(main)
