"""The training augmentation batched on the training device (`augment_on: device`): the train
loader hands over uint8 images and `device_augment(config)` gives the `DeviceAugment` that the
training step applies to each batch on its device, with a torch.Generator there that it
reseeds at every epoch start. Same steps and distributions as loaders.train_transform, which
runs per image in the loader workers (`augment_on: loader`)."""
import math

import torch

from handreid.model.backbone import preprocess_spec


class DeviceAugment:
    """The training augmentation of loaders.train_transform, batched on the training device:
    uint8 images [B, 3, S, S] -> normalised float32 batch. Same steps and parameter
    distributions: horizontal flip (aug_hflip), zero padding + random crop back to S
    (aug_pad, as v2.RandomCrop(S, padding=aug_pad)), colour jitter (aug_color_jitter:
    brightness, contrast, saturation factors uniform in [max(0, 1 - s), 1 + s], as
    v2.ColorJitter, but always in that order and on float pixels, where ColorJitter picks a
    random order per image and rounds to uint8 after each step), the backbone's mean/std
    normalisation, then random erasing (aug_random_erasing, v2.RandomErasing's defaults:
    area 2-33% of the image, aspect ratio 0.3-3.3 log-uniform, up to 10 tries, filled with 0,
    or with aug_erasing_fill: pixel per-pixel N(0, 1) noise).

    Every random number comes from the `generator` passed to each call (on the images'
    device), a fixed number of draws per batch: seeding it from (seed, epoch, rank) at each
    epoch start makes the augmentation of a resumed run identical to an uninterrupted one.
    """

    ERASE_SCALE, ERASE_RATIO, ERASE_TRIES = (0.02, 0.33), (0.3, 3.3), 10

    def __init__(self, config, spec):
        self.hflip, self.pad = config["aug_hflip"], config["aug_pad"]
        self.jitter, self.erasing = config["aug_color_jitter"], config["aug_random_erasing"]
        self.erase_noise = config["aug_erasing_fill"] == "pixel"
        # x / 255 then (x - mean) / std folded into one multiply-add per pixel; ITU-R 601-2
        # luma weights of the grayscale that contrast and saturation blend towards (as
        # torchvision).
        std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
        self.constants = {"scale": 1.0 / (255.0 * std),
                          "shift": -torch.tensor(spec["mean"]).view(1, 3, 1, 1) / std,
                          "luma": torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)}
        self.on_device = {}

    def _constants(self, device):
        """The constants on `device`, copied there once: a copy from host memory at every
        step would make the host wait for the GPU."""
        if device not in self.on_device:
            self.on_device[device] = {name: value.to(device)
                                      for name, value in self.constants.items()}
        return self.on_device[device]

    def __call__(self, images, generator):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DeviceAugment takes uint8 images [B, 3, S, S], got "
                             f"{images.dtype} {tuple(images.shape)}")
        constants = self._constants(images.device)
        images = self._flip_and_crop(images, generator)
        if self.jitter > 0:
            images = self._color_jitter(images.float().div_(255.0), generator, constants["luma"])
            images = images.mul_(255.0)
        else:
            images = images.float()
        images = images.mul_(constants["scale"]).add_(constants["shift"])
        if self.erasing > 0:
            mask = self._erase_mask(images, generator)
            if self.erase_noise:
                noise = torch.randn(images.shape, generator=generator, device=images.device)
                images = torch.where(mask, noise, images)
            else:
                images = images.masked_fill_(mask, 0.0)
        return images

    def _uniform(self, shape, generator, device, low=0.0, high=1.0):
        return torch.rand(shape, generator=generator, device=device).mul_(high - low).add_(low)

    def _flip_and_crop(self, images, generator):
        """One gather for both. With symmetric padding, flipping before padding and cropping
        is reading the padded image's columns right to left from the mirrored offset."""
        batch, _, height, width = images.shape
        device, pad = images.device, self.pad
        if self.hflip <= 0 and pad <= 0:
            return images
        flip = torch.rand(batch, generator=generator, device=device) < self.hflip
        top = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
        left = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
        padded_width = width + 2 * pad
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)).flatten(2)
        rows = top[:, None] + torch.arange(height, device=device)
        cols = left[:, None] + torch.arange(width, device=device)
        cols = torch.where(flip[:, None], padded_width - 1 - cols, cols)
        # Flat pixel index per sample, shared by the three channels (expand: no copy).
        index = (rows[:, :, None] * padded_width + cols[:, None, :]).view(batch, 1, -1)
        return padded.gather(2, index.expand(-1, 3, -1)).view(batch, 3, height, width)

    def _color_jitter(self, images, generator, luma):
        batch, device = images.shape[0], images.device
        low, high = max(0.0, 1.0 - self.jitter), 1.0 + self.jitter
        brightness, contrast, saturation = (
            self._uniform((batch, 1, 1, 1), generator, device, low, high) for _ in range(3))
        images = images.mul_(brightness).clamp_(0.0, 1.0)
        mean = (images * luma).sum(dim=1, keepdim=True).mean(dim=(1, 2, 3), keepdim=True)
        images = images.mul_(contrast).add_((1.0 - contrast) * mean).clamp_(0.0, 1.0)
        gray = (images * luma).sum(dim=1, keepdim=True)
        return images.mul_(saturation).add_((1.0 - saturation) * gray).clamp_(0.0, 1.0)

    def _erase_mask(self, images, generator):
        """[B, 1, H, W] bool: the rectangle to erase of each image (none if not chosen or
        if all tries fail), drawn like v2.RandomErasing.get_params, tries vectorised."""
        batch, _, height, width = images.shape
        device, tries = images.device, self.ERASE_TRIES
        chosen = torch.rand(batch, generator=generator, device=device) < self.erasing
        area = height * width * self._uniform((batch, tries), generator, device,
                                              *self.ERASE_SCALE)
        log_ratio = self._uniform((batch, tries), generator, device,
                                  *map(math.log, self.ERASE_RATIO))
        ratio = torch.exp(log_ratio)
        h = torch.sqrt(area * ratio).round().long()
        w = torch.sqrt(area / ratio).round().long()
        fits = (h < height) & (w < width)
        first = fits.int().argmax(dim=1, keepdim=True)  # first try that fits, as the loop
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        chosen &= fits.any(dim=1)
        top = (torch.rand(batch, generator=generator, device=device) * (height - h + 1)).long()
        left = (torch.rand(batch, generator=generator, device=device) * (width - w + 1)).long()
        rows = torch.arange(height, device=device)[None, :]
        cols = torch.arange(width, device=device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None]) & chosen[:, None]
        in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
        return (in_rows[:, None, :, None] & in_cols[:, None, None, :])


def device_augment(config):
    """The DeviceAugment the training step must apply to each train batch (moved to the
    device), or None when the train loader augments itself (augment_on: loader)."""
    if config["augment_on"] != "device":
        return None
    return DeviceAugment(config, preprocess_spec(config))
