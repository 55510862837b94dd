"""Export the retrieval features of your own images with a trained (or the baseline) model.

    python experiments/extract_features.py --config <eval config> --images <dir | list file> --out features.npz [--overwrite]

--images is a folder (every image under it, at any depth; images in <dir>/<identity>/... get
that identity, images directly in <dir> none), one image, or a text file listing one image path
a line, optionally followed by a tab and its identity (relative paths are taken from the list
file's folder). Unreadable images and other files are reported by name and skipped.

features.npz holds: features (float32 [N, D], L2-normalised: cosine similarity is their dot
product), paths (absolute), identities ('' where the layout has none), and model, a JSON string
describing what made them: the config's model and variant, the checkpoint, the feature
definition, the preprocessing, the weights digest and the fingerprint that search.py compares.
Images are decoded and encoded as in evaluation (cached decode, batches of eval_batch_size,
mixed precision by `amp`), so they equal the evaluation's features of the same images.
"""
import json
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "datasets"))
# config first: it sets OMP_WAIT_POLICY (CPU threads do not spin) before torch loads
from config import load_config, make_parser  # noqa: E402
from errors import run_cli, UserError  # noqa: E402
from atomic_files import atomic_write  # noqa: E402
import numpy as np  # noqa: E402
import split_protocol  # noqa: E402  (its image check, shared with the prepare scripts)
from build_dataloader import IMAGE_SUFFIXES  # noqa: E402
from feature_encoder import Encoder  # noqa: E402

EXPORT_COMMAND = "python experiments/extract_features.py --config <eval config>"
# What np.load raises for a file that is no .npz of ours (not a zip, truncated, keys missing).
UNREADABLE_NPZ = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _images_in_folder(folder, skipped):
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    items = []
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(f"{path} (not an image: {', '.join(IMAGE_SUFFIXES)})")
            continue
        parts = path.relative_to(folder).parts
        items.append((os.path.abspath(path), parts[0] if len(parts) > 1 else ""))
    return items


def _images_in_list(list_file):
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the image list {list_file} ({err}); give a folder, an "
                        "image, or a UTF-8 text file with one image path a line") from None
    items = []
    for line in filter(str.strip, lines):
        path, _, identity = line.partition("\t")
        path = Path(path.strip())
        items.append((os.path.abspath(list_file.parent / path), identity.strip()))
    return items


def list_images(source, what="--images"):
    """[(absolute path, identity or '')] of a folder, an image file or a list file, sorted as
    given; the images that do not decode and files that are not images are reported on stderr
    and left out. Raises UserError when none is left."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"{what} {source} does not exist; give an image, a folder of images or "
                        "a text file listing image paths")
    skipped = []
    if source.is_dir():
        items = _images_in_folder(source, skipped)
    elif source.suffix.lower() in IMAGE_SUFFIXES:
        items = [(os.path.abspath(source), "")]
    else:
        items = _images_in_list(source)
    with ThreadPoolExecutor(split_protocol.WORKERS) as pool:
        problems = list(pool.map(lambda item: split_protocol.image_problem(item[0]), items))
    skipped += [f"{path} ({problem})" for (path, _), problem in zip(items, problems) if problem]
    split_protocol.warn_skipped(f"files of {what}", skipped)
    items = [item for item, problem in zip(items, problems) if not problem]
    if not items:
        raise UserError(f"{what} {source} holds no readable image ({', '.join(IMAGE_SUFFIXES)}; "
                        "see the warnings above)")
    return items


def save_features(path, features, paths, identities, description):
    """Write features.npz atomically (a kill mid-write leaves no partial file)."""
    arrays = {"features": np.asarray(features, dtype=np.float32),
              "paths": np.array(paths, dtype=str), "identities": np.array(identities, dtype=str),
              "model": np.array(json.dumps(description, sort_keys=True))}
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_features(path):
    """-> (features, paths, identities, description) of a features.npz written here."""
    try:
        with np.load(path, allow_pickle=False) as data:
            features, paths = data["features"], data["paths"].tolist()
            identities, description = data["identities"].tolist(), json.loads(str(data["model"]))
    except UNREADABLE_NPZ as err:
        raise UserError(f"{path} is not a features file of this project ({type(err).__name__}); "
                        f"make one with {EXPORT_COMMAND} --images <dir> --out {path}") from None
    return features, paths, identities, description


def refuse_to_replace(path, overwrite):
    """A file the user made earlier is replaced only with --overwrite (checked before any work)."""
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it, or choose another --out")


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, type=Path,
                        help="a folder of images (identity = first sub-folder), an image, or a "
                             "text file listing image paths")
    parser.add_argument("--out", required=True, type=Path, help="features file to write (.npz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.out.suffix != ".npz":
        parser.error(f"--out {args.out} must end in .npz")
    config = load_config(args.config, args.overrides)
    refuse_to_replace(args.out, args.overwrite)
    items = list_images(args.images)
    encoder = Encoder(config)
    paths = [p for p, _ in items]
    features = encoder.encode(paths)
    save_features(args.out, features, paths, [i for _, i in items], encoder.description)
    named = sum(1 for _, identity in items if identity)
    print(f"{args.out}: {len(paths)} images x {features.shape[1]} features "
          f"({named} with an identity) from {config['model']} ({config['variant']}"
          + (f", checkpoint {config['save_path']}" if config["variant"] == "finetuned" else "")
          + f"), fingerprint {encoder.description['fingerprint'][:12]}")


if __name__ == "__main__":
    run_cli(main)
