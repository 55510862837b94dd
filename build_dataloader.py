"""Datasets and loaders over the prepared split folders (see datasets/prepare_*.py).

Every image goes through one decode step, `decode_image` (RGB, squash-resized to the square
input side with bicubic filtering, uint8), then tensor transforms: augmentation for training,
only scaling and the backbone's own mean/std normalisation for evaluation.

Fast path (`cache_images: true`): each image is decoded once, with PIL's JPEG draft mode
(the decoder skips detail that the resize would throw away), and kept in memory as uint8;
augmentation then runs on tensors. Reference path (`cache_images: false`): a full-size decode
of every image on every pass. benchmarks/bench_data_path.py measures both and how closely
their features agree.

Training labels are class indices (sorted identity folder names of train/, ImageFolder
semantics); everywhere else an image's label is its identity name.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2
from tqdm import tqdm

from config import UserError, dataset_dir, prepare_command
from make_model import preprocess_spec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_split(config, split_name):
    """[(path, identity_name)] of one split folder (e.g. 'train', 'query3', 'gallery3_all'),
    sorted by identity then file name."""
    folder = dataset_dir(config) / split_name
    if not folder.is_dir():
        raise UserError(f"dataset split not found: {folder}; prepare the dataset first: "
                        f"{prepare_command(config)}")
    items = [(str(path), identity.name)
             for identity in sorted(p for p in folder.iterdir() if p.is_dir())
             for path in sorted(identity.iterdir())
             if path.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise UserError(f"no images in {folder}; re-run the prepare script: "
                        f"{prepare_command(config)}")
    return items


def decode_image(path, side, draft=False):
    """Image file -> uint8 tensor [3, side, side]; names the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            if draft:
                image.draft("RGB", (side, side))
            image = image.convert("RGB").resize((side, side), Image.BICUBIC)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"cannot read image {path} ({err}); replace the file or re-run the "
                        "prepare script, which reports and skips unreadable images") from None
    return v2.functional.pil_to_tensor(image)


def decode_all(paths, side):
    """Decode every image once (threads: PIL releases the GIL while decoding) -> uint8 [N,3,S,S]."""
    cache = torch.empty((len(paths), 3, side, side), dtype=torch.uint8)

    def fill(index):
        cache[index] = decode_image(paths[index], side, draft=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(tqdm(pool.map(fill, range(len(paths))), total=len(paths), desc="caching images",
                  unit="img", disable=None, leave=False))
    return cache


class HandImages(Dataset):
    """(image tensor, target) pairs; images come from the in-memory cache when one is given."""

    def __init__(self, paths, targets, side, transform, cached):
        self.paths, self.targets, self.side, self.transform = list(paths), targets, side, transform
        self.cache = decode_all(self.paths, side) if cached else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = (self.cache[index] if self.cache is not None
                 else decode_image(self.paths[index], self.side))
        return self.transform(image), self.targets[index]


def train_transform(config, spec):
    side = spec["image_size"]
    steps = []
    if config["aug_hflip"] > 0:
        steps.append(v2.RandomHorizontalFlip(config["aug_hflip"]))
    if config["aug_pad"] > 0:
        steps.append(v2.RandomCrop(side, padding=config["aug_pad"]))
    if config["aug_color_jitter"] > 0:
        strength = config["aug_color_jitter"]
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec["mean"], spec["std"])]
    if config["aug_random_erasing"] > 0:
        steps.append(v2.RandomErasing(config["aug_random_erasing"]))
    return v2.Compose(steps)


def eval_transform(spec):
    return v2.Compose([v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(spec["mean"], spec["std"])])


def _loader_kwargs(config):
    # Workers also for cached images: they run single-threaded, which suits small per-image
    # tensor ops far better than the main process's intra-op thread pool.
    return {"num_workers": config["num_workers"], "pin_memory": torch.cuda.is_available()}


def get_train_val_loaders(config):
    """-> (train_loader, val_loader, num_classes). The train loader's sampler is a
    DistributedSampler (one replica when not distributed) seeded by config seed: call
    set_loader_epoch(loader, epoch) at each epoch start for a reproducible, resumable order."""
    spec = preprocess_spec(config)
    train_items = list_split(config, "train")
    classes = sorted({name for _, name in train_items})
    index = {name: i for i, name in enumerate(classes)}
    val_items = list_split(config, "val")
    unknown = sorted({name for _, name in val_items} - set(index))
    if unknown:
        raise UserError(f"{dataset_dir(config) / 'val'} has identities missing from train/ "
                        f"({', '.join(unknown[:3])}...); re-run the prepare script: "
                        f"{prepare_command(config)}")
    cached = config["cache_images"]
    train_set = HandImages([p for p, _ in train_items], [index[n] for _, n in train_items],
                           spec["image_size"], train_transform(config, spec), cached)
    train_set.classes = classes
    val_set = HandImages([p for p, _ in val_items], [index[n] for _, n in val_items],
                         spec["image_size"], eval_transform(spec), cached)
    val_set.classes = classes

    distributed = dist.is_available() and dist.is_initialized()
    sampler = DistributedSampler(
        train_set, num_replicas=dist.get_world_size() if distributed else 1,
        rank=dist.get_rank() if distributed else 0, shuffle=True, seed=config["seed"],
        drop_last=False)
    batch_size = config["batch_size"]
    # Drop the ragged last batch (BatchNorm heads dislike tiny batches) unless the epoch
    # would then be empty.
    drop_last = len(sampler) > batch_size
    generator = torch.Generator()
    generator.manual_seed(config["seed"])
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler,
                              drop_last=drop_last, generator=generator,
                              **_loader_kwargs(config))
    val_loader = DataLoader(val_set, batch_size=config["eval_batch_size"], shuffle=False,
                            **_loader_kwargs(config))
    return train_loader, val_loader, len(classes)


def set_loader_epoch(loader, epoch):
    """Make epoch `epoch`'s shuffling and worker augmentation seeds a function of
    (seed, epoch) alone, so a resumed run sees the same data as an uninterrupted one."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(loader.sampler.seed + epoch)


def eval_loader(config, paths, batch_size=None):
    """DataLoader over image paths yielding (images, index) in order, eval transform."""
    spec = preprocess_spec(config)
    cached = config["cache_images"]
    dataset = HandImages(paths, list(range(len(paths))), spec["image_size"],
                         eval_transform(spec), cached)
    return DataLoader(dataset, batch_size=batch_size or config["eval_batch_size"],
                      shuffle=False, **_loader_kwargs(config))

