"""Image files given by a user: which files count as images, whether one decodes, and the
images of a folder, one image or a list file as checked (path, identity) pairs.

The prepare scripts (datasets/split_protocol.py), the loaders and the scripts that run a
model on one's own images (extract_features.py, search.py, compare_photos.py) share these
checks.
"""
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from handreid.core.errors import UserError

# The one pixel limit of every image the project opens: 100 megapixels. A hand photo is a few
# megapixels, a 61 MP camera or 108 MP phone photo passes; decoding takes width x height x 3
# bytes per image and per loader worker (a 144 MP PNG took 430 MB each), and a decompression
# bomb (a small file of a huge image) far more. PIL checks the size in Image.open, before
# decoding: it warns over MAX_IMAGE_PIXELS and refuses over twice that; the warning is made
# an error here, so every image over the limit is refused there (and named by our callers).
# Set on import of this module, which the loaders import: DataLoader workers have it too.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
# What opening or decoding a bad image file raises: OSError, UnidentifiedImageError (an
# OSError), ValueError, and the pixel limit's error and warning.
IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning)

# What the loaders read: formats Pillow decodes without plugins.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Photo formats Pillow does not read by itself: named, not mistaken for a list of paths.
UNSUPPORTED_SUFFIXES = {".heic": "HEIC", ".heif": "HEIF"}
WORKERS = min(8, os.cpu_count() or 1)  # threads decoding or hashing files (PIL frees the GIL)


def warn_skipped(what, names, shown=5):
    """One stderr line: how many were skipped, and the first few names."""
    if names:
        more = f", ... (+{len(names) - shown} more)" if len(names) > shown else ""
        print(f"warning: skipped {len(names)} {what}: {', '.join(names[:shown])}{more}",
              file=sys.stderr)


# Pillow modes whose samples are wider than 8 bits: 16-bit integer (any byte order), 32-bit
# integer and 32-bit float. Pillow's own convert("RGB") clips them to 255 (a white image).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Pillow opens these but its convert("RGB") is no colour conversion (CIELAB's L is copied).
REFUSED_MODES = {"LAB": "CIELAB"}


class ModeError(ValueError):
    """An image whose pixel mode this code does not turn into RGB; the message says why."""


def eight_bit(image):
    """`image` with 8-bit samples: a wide mode scaled to an 8-bit grayscale image, any other
    mode returned as it is (Pillow's modes of 8 bits a channel convert to RGB correctly).

    Scaling maps the type's full range, never the image's own min/max: a 16-bit value v
    becomes round(v x 255 / 65535) (the PNG specification's depth reduction; Pillow reads
    16-bit RGB files as their high byte, at most 1 apart), so a dark exposure stays dark and
    two photos of one camera keep their relative brightness.
    Mode I holds 16-bit files on some Pillow versions: values in 0..65535 are scaled as 16-bit,
    others refused; mode F (float) is read as 0..1 and refused outside it. ModeError names
    what is refused."""
    if image.mode in REFUSED_MODES:
        raise ModeError(f"{REFUSED_MODES[image.mode]} colour ({image.mode} mode) is not read; "
                        "convert the image to RGB")
    if image.mode not in WIDE_MODES:
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ModeError(f"floating-point image (mode F) with values in "
                            f"[{np.nanmin(values):.4g}, {np.nanmax(values):.4g}], not 0..1; "
                            "save it as 8- or 16-bit")
        scaled = values * 255
    else:
        if values.min() < 0 or values.max() > 65535:
            raise ModeError(f"{image.mode} mode image with values in "
                            f"[{values.min():.0f}, {values.max():.0f}], outside 16 bits; save "
                            "it as 8- or 16-bit")
        scaled = values / 257
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # 2-D uint8: mode L


def to_rgb(image, path):
    """`image` as 8-bit RGB (eight_bit's scaling, then Pillow's conversion: palette, grayscale,
    CMYK, YCbCr; an alpha channel is dropped, not blended); UserError naming `path` for a mode
    this code does not read."""
    try:
        return eight_bit(image).convert("RGB")
    except ModeError as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def image_problem(path):
    """None if the image decodes into RGB, else why not. Decoding at 1/8 scale (JPEG draft
    mode) is cheap and, unlike Image.verify(), catches the truncated files an interrupted
    download leaves."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            eight_bit(image)
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image"
    except ModeError as err:
        return str(err)
    except Exception as err:  # PIL raises many types for broken files; any means unusable
        return f"unreadable: {err}"
    return None


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


def _unsupported(path):
    """UserError for an image file of a format the loaders do not read."""
    kind = UNSUPPORTED_SUFFIXES.get(path.suffix.lower(), path.suffix or "no suffix")
    return UserError(f"{path} is a {kind} file, which this code does not read (it reads "
                     f"{', '.join(IMAGE_SUFFIXES)}); convert it, e.g. to JPEG or PNG")


def _images_in_list(list_file):
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{list_file} is neither an image this code reads "
                        f"({', '.join(IMAGE_SUFFIXES)}) nor a UTF-8 text file with one image "
                        f"path a line; give an image, a folder of images or such a list") from None
    except OSError as err:
        raise UserError(f"cannot read the image list {list_file} ({err}); give a folder, an "
                        "image, or a UTF-8 text file with one image path a line") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        path, _, identity = line.partition("\t")
        path = Path(path.strip())
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.suffix.lower() in UNSUPPORTED_SUFFIXES:
                raise _unsupported(path)
            raise UserError(f"{list_file} line {number} ({line.strip()[:60]!r}) is not the path "
                            f"of an image ({', '.join(IMAGE_SUFFIXES)}): read as a list of image "
                            f"paths, this file is not one; give an image, a folder of images or "
                            f"a text file with one image path a line")
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
    elif source.suffix.lower() in UNSUPPORTED_SUFFIXES:
        raise _unsupported(source)
    else:
        items = _images_in_list(source)
    with ThreadPoolExecutor(WORKERS) as pool:
        problems = list(pool.map(lambda item: image_problem(item[0]), items))
    skipped += [f"{path} ({problem})" for (path, _), problem in zip(items, problems) if problem]
    warn_skipped(f"files of {what}", skipped)
    items = [item for item, problem in zip(items, problems) if not problem]
    if not items:
        raise UserError(f"{what} {source} holds no readable image ({', '.join(IMAGE_SUFFIXES)})"
                        + ("; see the skipped files above" if skipped else ""))
    return items
