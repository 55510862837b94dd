"""Export the image encoder with its retrieval feature to ONNX, checked with onnxruntime.

    python experiments/export_onnx.py --config <eval config> --out model.onnx [--overwrite]

The ONNX model takes `images`: float32 [batch, 3, H, W], RGB scaled to [0, 1], each image
squash-resized to H x W (bicubic; the model's image_size), any batch size; with cache_images
(the default) the features it matches decode JPEGs in PIL's draft mode before the resize, and
its metadata says which decode to use. Inside it: the
backbone's mean/std normalisation, the model's retrieval feature (HandIdModel.features: the
image embedding, its BNNeck output, or the checkpoint's own definition), the test-time flip
rule of the config (flip: sum or unit_mean), and L2 normalisation. Output `features`: float32 [batch, D], unit length, equal to
extract_features.py's features of the same decoded pixels. The model's metadata_props hold the
preprocessing and the JSON description of the model (checkpoint, weights digest, fingerprint).

Before writing, the script runs a random batch through onnxruntime and through torch (fp32,
CPU) and prints the largest absolute difference; above 1e-4 nothing is written (exit 1).
"""
import io
import json
import time
import warnings
from pathlib import Path

from handreid.core.startup import start

start()

from handreid.core.config_files import config_from_args, make_parser
from handreid.core.errors import check_writable, run_cli, UserError
from handreid.core.atomic_files import atomic_write, refuse_to_replace
import torch
from torch import nn
from handreid.evaluation import protocol
from handreid.evaluation.encoder import describe_model, load_model
from handreid.model.backbone import image_hw, preprocess_spec

TOLERANCE = 1e-4
OPSET = 17
EXPORT_BATCH, CHECK_BATCH = 2, 3  # checking another batch size than traced proves it dynamic


class RetrievalFeature(nn.Module):
    """[0, 1] RGB images -> L2-normalised retrieval features, as evaluation computes them."""

    def __init__(self, model, mean, std, flip):
        super().__init__()
        self.model, self.flip = model, flip
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images):
        return protocol.retrieval_features(self.model, (images - self.mean) / self.std,
                                             self.flip)


def to_onnx(module, size):
    """Serialised ONNX model of `module` with a dynamic batch axis."""
    buffer = io.BytesIO()
    example = torch.rand(EXPORT_BATCH, 3, *image_hw(size))
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated; the torch.export one needs onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, input_names=["images"],
                          output_names=["features"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    return buffer.getvalue()


def max_difference(module, model_bytes, size, seed):
    """Largest |onnxruntime - torch| over a random batch of CHECK_BATCH images."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    images = torch.rand(CHECK_BATCH, 3, *image_hw(size),
                        generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = module(images).numpy()
    got = session.run(["features"], {"images": images.numpy()})[0]
    if got.shape != expected.shape:
        raise UserError(f"onnxruntime gave features of shape {got.shape}, torch {expected.shape}")
    return float(abs(got - expected).max())


def input_text(height, width, draft_decode):
    """The input as the evaluation's and extract_features.py's features were computed: with
    cache_images (draft_decode) a JPEG is decoded in PIL's draft mode (reduced up to 8x by the
    decoder) before the bicubic resize, which moves features by about 1e-3."""
    decode = ("decoded as PIL's Image.open(path).draft('RGB', (W, H)) (JPEG draft mode), "
              "then convert('RGB') and resize((W, H), BICUBIC)" if draft_decode else
              "decoded in full, then convert('RGB') and resize((W, H), BICUBIC)")
    return (f"images float32 [batch, 3, {height}, {width}], RGB in [0, 1] (uint8 / 255), "
            f"W = {width}, H = {height}: {decode}, as the features of evaluation and "
            f"extract_features.py; normalisation is inside")


def with_metadata(model_bytes, description, spec):
    import onnx

    model = onnx.load_from_string(model_bytes)
    height, width = image_hw(spec["image_size"])
    preprocessing = description["preprocessing"]
    props = {"description": json.dumps(description, sort_keys=True),
             "input": input_text(height, width, preprocessing["draft_decode"]),
             "preprocessing": json.dumps(preprocessing, sort_keys=True),
             "output": "features float32 [batch, D], L2-normalised",
             "image_size": str(spec["image_size"]), "mean": json.dumps(list(spec["mean"])),
             "std": json.dumps(list(spec["std"]))}
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="ONNX file to write (.onnx)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.out.suffix != ".onnx":
        parser.error(f"--out {args.out} must end in .onnx")
    config = config_from_args(args)
    refuse_to_replace(args.out, args.overwrite)
    check_writable(args.out)  # before the model is exported
    spec = preprocess_spec(config)
    model, checkpoint = load_model(config)
    model.eval()
    module = RetrievalFeature(model, spec["mean"], spec["std"], config["flip"]).eval()
    start = time.perf_counter()
    model_bytes = to_onnx(module, spec["image_size"])
    exported = time.perf_counter()
    difference = max_difference(module, model_bytes, spec["image_size"], config["seed"])
    checked = time.perf_counter()
    print(f"onnxruntime vs torch (fp32, batch of {CHECK_BATCH}): max |difference| = "
          f"{difference:.2e} (tolerance {TOLERANCE:.0e})")
    if not difference <= TOLERANCE:
        raise UserError(f"the ONNX model differs from torch by {difference:.2e} > {TOLERANCE:.0e}; "
                        f"nothing written to {args.out}")
    description = describe_model(config, model, checkpoint)
    atomic_write(args.out, lambda handle: handle.write(
        with_metadata(model_bytes, description, spec)))
    print(f"{args.out}: {config['model']} ({config['variant']}) image encoder, input images "
          f"[batch, 3, {', '.join(map(str, image_hw(spec['image_size'])))}] in [0, 1], output "
          f"L2-normalised "
          f"features; fingerprint {description['fingerprint'][:12]} (export "
          f"{exported - start:.1f} s, check {checked - exported:.1f} s)")


if __name__ == "__main__":
    run_cli(main)
