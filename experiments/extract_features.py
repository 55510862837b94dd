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
from pathlib import Path

from handreid.core.startup import start

start()

from handreid.core.config_files import config_from_args, make_parser
from handreid.core.errors import check_writable, run_cli
from handreid.core.atomic_files import refuse_to_replace
from handreid.evaluation.encoder import Encoder
from handreid.search.feature_files import save_features
from handreid.data.image_files import list_images


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
    config = config_from_args(args)
    refuse_to_replace(args.out, args.overwrite)
    check_writable(args.out)  # before any image is encoded
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
