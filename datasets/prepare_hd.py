"""Raw HD (PolyU hand dorsal, `Original Images/1-501` and `502-712`) -> the published HD protocol
(MBA-Net) in <out>/train_val_test_split/: train_all, train, val, test, query{i}, gallery{i}
(one image per test identity plus every 502-712 image as a distractor) and splits.json.

    python datasets/prepare_hd.py --raw datasets/HD [--out DIR] [--seed 0] [--num-splits 10]
        [--copy | --max-side N] [--overwrite]
"""
import re
from collections import defaultdict

from handreid.core.startup import start

start()

from handreid.data import split_protocol
from handreid.core.errors import run_cli, UserError
from handreid.data.image_files import IMAGE_SUFFIXES, warn_skipped

DOWNLOAD = ("download the original images of the HD dataset from "
            "http://www4.comp.polyu.edu.hk/~csajaykr/knuckleV2.htm")
IDENTITY_FOLDER = "Original Images/1-501"
DISTRACTOR_FOLDER = "Original Images/502-712"
TRAIN_MAX_ID = 447  # ids <= 447 of 1-501 are training identities, the others test identities
DISTRACTOR_PREFIX = "distractor__"  # cannot equal a test id
FOLDER = "train_val_test_split"
PROTOCOL = {"identity_folder": IDENTITY_FOLDER, "distractor_folder": DISTRACTOR_FOLDER,
            "train_max_id": TRAIN_MAX_ID, "distractor_label": f"{DISTRACTOR_PREFIX}<id>",
            "min_images_per_identity": split_protocol.MIN_IMAGES}


def list_images(raw, folder, badly_named):
    """{identity: [source]} of the `<id>_<n>.jpg` images in raw/folder; image files named
    otherwise are added to `badly_named`, other files (ReadMe, Thumbs.db) ignored."""
    path = raw / folder
    if not path.is_dir():
        raise UserError(f"{path} not found: {DOWNLOAD} and extract it into {raw}")
    images = defaultdict(list)
    for file in sorted(path.iterdir()):
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        match = re.match(r"([0-9]+)_", file.name)
        if match:
            images[match.group(1)].append(f"{folder}/{file.name}")
        else:
            badly_named.append(f"{folder}/{file.name}")
    return images


def build(raw, seed, num_splits):
    """{folder: manifest fields}; see split_protocol.prepare."""
    badly_named = []
    subjects = list_images(raw, IDENTITY_FOLDER, badly_named)
    distractors = list_images(raw, DISTRACTOR_FOLDER, badly_named)
    warn_skipped("images not named <id>_<n>", badly_named)
    sources = sorted(s for ids in (subjects, distractors) for files in ids.values() for s in files)
    unusable = split_protocol.find_unusable_images(raw, sources)
    usable = {group: {i: [f for f in files if f not in unusable] for i, files in ids.items()}
              for group, ids in (("subjects", subjects), ("distractors", distractors))}
    splits, too_few = split_protocol.protocol_splits(
        {i: files for i, files in usable["subjects"].items() if int(i) <= TRAIN_MAX_ID},
        {i: files for i, files in usable["subjects"].items() if int(i) > TRAIN_MAX_ID},
        seed, "hd", num_splits)
    extra = {f"{DISTRACTOR_PREFIX}{i}": files
             for i, files in usable["distractors"].items() if files}
    for i in range(num_splits):
        splits[f"gallery{i}"].update(extra)
    skipped = {"badly_named_images": badly_named, "identities_with_too_few_images": too_few,
               "unusable_images": unusable}
    return {FOLDER: {"splits": splits, "skipped": skipped}}


def main():
    args = split_protocol.parse_args(__doc__.split("\n\n")[0], "datasets/HD")
    split_protocol.prepare(args, "hd", PROTOCOL, [FOLDER],
                           lambda raw: build(raw, args.seed, args.num_splits),
                           [IDENTITY_FOLDER, DISTRACTOR_FOLDER])


if __name__ == "__main__":
    run_cli(main)
