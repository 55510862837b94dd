"""Datasets and loaders over the prepared split folders (see datasets/prepare_*.py).

Every image goes through one decode step, `decode_image` (8-bit RGB by image_files.to_rgb,
whatever the file's mode, squash-resized to the input size, a side or (height, width), with
bicubic filtering, uint8), then tensor transforms:
augmentation for training, only scaling and the backbone's own mean/std normalisation for
evaluation.

Fast path (`cache_images: true`): each image is decoded once, with PIL's JPEG draft mode
(the decoder skips detail that the resize would throw away), and kept in memory as uint8;
augmentation then runs on tensors. Reference path (`cache_images: false`): a full-size decode
of every image on every pass. benchmarks/bench_data_path.py measures both and how closely
their features agree.

Where training augmentation runs (`augment_on`): `loader` applies `train_transform` per image
in the loader workers; `device` makes the train loader hand over the uint8 images, which the
training step augments batch by batch on its device (device_augment.py). With cached images
that loader needs no workers: it only indexes memory.

Training labels are class indices (sorted identity folder names of train/, ImageFolder
semantics); everywhere else an image's label is its identity name.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2
from tqdm import tqdm

from handreid.core.config_files import dataset_dir, prepare_command
from handreid.core.errors import ConfigError, UserError
from handreid.data.image_files import IMAGE_ERRORS, IMAGE_SUFFIXES, to_rgb
from handreid.model.backbone import image_hw, preprocess_spec


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


def decode_image(path, size, draft=False):
    """Image file -> uint8 tensor [3, height, width] of `size` (a side or (height, width));
    any mode Pillow opens becomes 8-bit RGB (to_rgb: 16-bit and float images scaled, not
    clipped); names the file if it cannot be read."""
    height, width = image_hw(size)
    try:
        with Image.open(path) as image:
            if draft:
                image.draft("RGB", (width, height))
            image = to_rgb(image, path).resize((width, height), Image.BICUBIC)
    except IMAGE_ERRORS as err:
        raise UserError(f"cannot read image {path} ({err}); replace the file or re-run the "
                        "prepare script, which reports and skips unreadable images") from None
    return v2.functional.pil_to_tensor(image)


def decode_all(paths, size):
    """Decode every image once (threads: PIL releases the GIL while decoding) -> uint8
    [N, 3, height, width]."""
    cache = torch.empty((len(paths), 3, *image_hw(size)), dtype=torch.uint8)

    def fill(index):
        cache[index] = decode_image(paths[index], size, draft=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(tqdm(pool.map(fill, range(len(paths))), total=len(paths), desc="caching images",
                  unit="img", disable=None, leave=False))
    return cache


class HandImages(Dataset):
    """(image tensor, target) pairs; images come from the in-memory cache when one is given,
    as uint8 when `transform` is None."""

    def __init__(self, paths, targets, side, transform, cached, cache=None):
        self.paths, self.targets, self.side, self.transform = list(paths), targets, side, transform
        if cache is None and cached:
            cache = decode_all(self.paths, side)
        self.cache = cache

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = (self.cache[index] if self.cache is not None
                 else decode_image(self.paths[index], self.side))
        return (self.transform(image) if self.transform else image), self.targets[index]


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
        fill = "random" if config["aug_erasing_fill"] == "pixel" else 0.0  # N(0, 1) per pixel
        steps.append(v2.RandomErasing(config["aug_random_erasing"], value=fill))
    return v2.Compose(steps)


def eval_transform(spec):
    return v2.Compose([v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(spec["mean"], spec["std"])])


def _loader_kwargs(config, in_memory=False):
    # Workers also for cached images that get per-image tensor transforms: they run
    # single-threaded, which suits small per-image ops far better than the main process's
    # intra-op thread pool.
    return {"num_workers": 0 if in_memory else config["num_workers"],
            "pin_memory": torch.cuda.is_available()}


class IdentityBatchSampler(Sampler):
    """Identity-balanced (pk) batches: P = batch_size / K identities with K images each.

    Each epoch, every identity's images are shuffled and cut into chunks of K (an identity
    with fewer than K images gives one chunk drawn with replacement, as torchreid's
    RandomIdentitySampler); each step draws P x world distinct identities, weighted by how
    many chunks they have left, and takes one chunk of each, so an epoch covers every training
    image about once. Rank r gets its own P identities of each step. The order is a function
    of (seed, epoch) alone: the same on every rank, the same after a resume."""

    def __init__(self, targets, batch_size, num_instances, seed, rank=0, world_size=1):
        self.k, self.p = num_instances, batch_size // num_instances
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.by_identity = {}
        for index, target in enumerate(targets):
            self.by_identity.setdefault(int(target), []).append(index)
        if len(self.by_identity) < self.p * world_size:
            # Refused, not shrunk: the batch is part of the recipe (it sets the triplet mining).
            fits = len(self.by_identity) // world_size * num_instances
            raise ConfigError(
                f"sampler: pk needs {self.p * world_size} distinct identities per step "
                f"(batch_size {batch_size} / num_instances {num_instances}"
                + (f" x {world_size} processes" if world_size > 1 else "")
                + f") but train/ has {len(self.by_identity)}; lower batch_size"
                + (f" (e.g. --set batch_size={fits})" if fits >= 2 * num_instances else "")
                + " or raise num_instances")
        chunks = sum(max(1, len(items) // self.k) for items in self.by_identity.values())
        self.steps = max(1, chunks // (self.p * world_size))

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.steps

    def __iter__(self):
        rng = np.random.default_rng([self.seed % 2 ** 32, self.epoch])
        identities = sorted(self.by_identity)
        chunks = {}
        for identity in identities:
            items = np.array(self.by_identity[identity])
            if len(items) < self.k:
                items = rng.choice(items, self.k, replace=True)
            else:
                items = rng.permutation(items)[: len(items) // self.k * self.k]
            chunks[identity] = [items[i:i + self.k].tolist() for i in range(0, len(items), self.k)]
        width = self.p * self.world_size
        for _ in range(self.steps):
            left = np.array([len(chunks[i]) for i in identities], dtype=np.float64)
            if (left > 0).sum() >= width:
                chosen = rng.choice(len(identities), width, replace=False, p=left / left.sum())
            else:  # rare: too few identities have chunks left; refill with fresh draws
                chosen = rng.choice(len(identities), width, replace=False)
            # Every rank draws the whole step the same way, then takes its own identities.
            step = [chunks[identities[i]].pop() if chunks[identities[i]] else
                    rng.choice(self.by_identity[identities[i]], self.k).tolist()
                    for i in chosen]
            yield [index for chunk in step[self.rank * self.p:(self.rank + 1) * self.p]
                   for index in chunk]


def _check_pk(config):
    k, batch_size = config["num_instances"], config["batch_size"]
    if k < 1 or k > batch_size or batch_size % k:
        raise ConfigError(f"num_instances: {k} must be at least 1 and divide batch_size "
                          f"({batch_size}) into whole identities; e.g. num_instances: 4 with "
                          f"batch_size: {max(4, batch_size // 4 * 4)}")


def get_train_val_loaders(config):
    """-> (train_loader, val_loader, num_classes). The train loader draws random batches (a
    DistributedSampler, one replica when not distributed) or, with sampler: pk, identity-
    balanced ones (IdentityBatchSampler); both are seeded by config seed: call
    set_loader_epoch(loader, epoch) at each epoch start for a reproducible, resumable order."""
    if config["sampler"] == "pk":
        _check_pk(config)
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
    # augment_on: device -> the train loader hands over uint8 images; see device_augment.
    on_device = config["augment_on"] == "device"
    train_set = HandImages([p for p, _ in train_items], [index[n] for _, n in train_items],
                           spec["image_size"], None if on_device else train_transform(config, spec),
                           cached)
    train_set.classes = classes
    val_set = HandImages([p for p, _ in val_items], [index[n] for _, n in val_items],
                         spec["image_size"], eval_transform(spec), cached)
    val_set.classes = classes

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    batch_size = config["batch_size"]
    generator = torch.Generator()
    generator.manual_seed(config["seed"])
    # Cached uint8 images for the device augmentation: the loader only indexes memory,
    # which the main process does several times faster than workers can hand batches over.
    train_kwargs = _loader_kwargs(config, in_memory=on_device and cached)
    if config["sampler"] == "pk":
        batches = IdentityBatchSampler(train_set.targets, batch_size, config["num_instances"],
                                       config["seed"], rank, world)
        train_loader = DataLoader(train_set, batch_sampler=batches, generator=generator,
                                  **train_kwargs)
    else:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                     seed=config["seed"], drop_last=False)
        # Drop the ragged last batch (BatchNorm heads dislike tiny batches) unless the epoch
        # would then be empty.
        train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler,
                                  drop_last=len(sampler) > batch_size, generator=generator,
                                  **train_kwargs)
    val_loader = DataLoader(val_set, batch_size=config["eval_batch_size"], shuffle=False,
                            **_loader_kwargs(config))
    return train_loader, val_loader, len(classes)


def set_loader_epoch(loader, epoch):
    """Make epoch `epoch`'s order and worker augmentation seeds a function of (seed, epoch)
    alone, so a resumed run sees the same data as an uninterrupted one."""
    order = loader.batch_sampler if isinstance(loader.batch_sampler, IdentityBatchSampler) \
        else loader.sampler
    order.set_epoch(epoch)
    loader.generator.manual_seed(order.seed + epoch)


def train_gallery_loader(config, train_loader):
    """The train images with the evaluation transform, labelled by class index (the gallery
    of the val_map selection signal); reuses the train loader's decoded images."""
    train_set = train_loader.dataset
    dataset = HandImages(train_set.paths, train_set.targets, train_set.side,
                         eval_transform(preprocess_spec(config)), config["cache_images"],
                         cache=train_set.cache)
    return DataLoader(dataset, batch_size=config["eval_batch_size"], shuffle=False,
                      **_loader_kwargs(config))


def eval_loader(config, paths, batch_size=None):
    """DataLoader over image paths yielding (images, index) in order, eval transform."""
    spec = preprocess_spec(config)
    cached = config["cache_images"]
    dataset = HandImages(paths, list(range(len(paths))), spec["image_size"],
                         eval_transform(spec), cached)
    return DataLoader(dataset, batch_size=batch_size or config["eval_batch_size"],
                      shuffle=False, **_loader_kwargs(config))

