"""augment_on: device — the batched augmentation against the per-image loader path: same
distributions of flips, crop offsets, colour jitter and erased rectangles (not the same
pixels: each path draws its own random numbers), same normalisation, exact reproducibility
from the generator."""
import pytest
import torch

from handreid.data.device_augment import DeviceAugment, device_augment
from handreid.data.loaders import (eval_transform, get_train_val_loaders, set_loader_epoch,
                                   train_transform)
from handreid.model.backbone import preprocess_spec

SIDE, PAD, SAMPLES = 32, 4, 3000
IDENTITY = {"image_size": SIDE, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def settings(hflip=0.0, pad=0, jitter=0.0, erasing=0.0, fill="zero"):
    return {"aug_hflip": hflip, "aug_pad": pad, "aug_color_jitter": jitter,
            "aug_random_erasing": erasing, "aug_erasing_fill": fill}


def both_paths(config, images, seed=0):
    """(device path output, loader path output) as 0-255 floats, identity normalisation."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    on_device = DeviceAugment(config, IDENTITY)(images, generator)
    torch.manual_seed(seed)
    transform = train_transform(config, IDENTITY)
    on_loader = torch.stack([transform(image) for image in images])
    return on_device * 255, on_loader * 255


def coordinate_images(count):
    """Every pixel names its own position: red = row + 1, green = column + 1 (0 = padding)."""
    grid = torch.arange(1, SIDE + 1, dtype=torch.uint8)
    image = torch.stack([grid[:, None].expand(SIDE, SIDE), grid[None, :].expand(SIDE, SIDE),
                         torch.full((SIDE, SIDE), 200, dtype=torch.uint8)])
    return image.expand(count, 3, SIDE, SIDE).contiguous()


def flips_and_offsets(images):
    """Per image: flipped?, crop top and crop left in padded coordinates (0..2*PAD), read
    from the coordinates at the centre pixel."""
    images = images.round().long()
    centre = SIDE // 2
    red, green = images[:, 0, centre, centre], images[:, 1, centre, centre]
    flipped = images[:, 1, centre, centre + 1] < green
    top = red - 1 - centre + PAD
    left = torch.where(flipped, SIDE - green, green - 1) - centre + PAD
    return flipped, top, left


def test_flips_and_crop_offsets_have_the_loader_distribution():
    config = settings(hflip=0.5, pad=PAD)
    device_out, loader_out = both_paths(config, coordinate_images(SAMPLES))
    uniform = torch.full((2 * PAD + 1,), 1 / (2 * PAD + 1))
    for images in (device_out, loader_out):
        flipped, top, left = flips_and_offsets(images)
        assert abs(flipped.float().mean().item() - 0.5) < 0.04
        for offsets in (top, left):
            assert offsets.min() >= 0 and offsets.max() <= 2 * PAD
            share = torch.bincount(offsets, minlength=2 * PAD + 1) / SAMPLES
            assert (share - uniform).abs().max() < 0.03
    # Each device output is exactly the padded, flipped, shifted source image.
    source = coordinate_images(1)[0]
    padded = torch.nn.functional.pad(source, (PAD, PAD, PAD, PAD))
    for image, flip, top, left in zip(device_out[:200], *flips_and_offsets(device_out[:200])):
        view = padded.flip(-1) if flip else padded
        assert torch.equal(image.round().to(torch.uint8),
                           view[:, top:top + SIDE, left:left + SIDE])


def test_colour_jitter_has_the_loader_distribution():
    # A flat colour that never leaves 0-255: brightness, contrast and saturation then
    # commute, so the fixed order of the device path matches ColorJitter's random order.
    colour = torch.tensor([130, 100, 70], dtype=torch.uint8).view(1, 3, 1, 1)
    images = colour.expand(SAMPLES, 3, SIDE, SIDE).contiguous()
    device_out, loader_out = both_paths(settings(jitter=0.4), images)
    device_px, loader_px = device_out[:, :, 0, 0], loader_out[:, :, 0, 0]
    assert (device_px.mean(0) - loader_px.mean(0)).abs().max() < 2.0
    assert (device_px.std(0) - loader_px.std(0)).abs().max() < 2.0
    assert device_px.std(0).min() > 5  # it did jitter
    # Brightness cancels from the chroma (R - B) / G: its spread is contrast x saturation.
    device_chroma, loader_chroma = ((px[:, 0] - px[:, 2]) / px[:, 1]
                                    for px in (device_px, loader_px))
    assert abs(device_chroma.mean() - loader_chroma.mean()) < 0.02
    assert abs(device_chroma.std() - loader_chroma.std()) < 0.02
    # Flat images stay flat (one factor per image, applied to every pixel).
    assert torch.equal(device_out.amin(dim=(2, 3)), device_out.amax(dim=(2, 3)))


def test_random_erasing_has_the_loader_distribution():
    images = torch.full((SAMPLES, 3, SIDE, SIDE), 128, dtype=torch.uint8)
    device_out, loader_out = both_paths(settings(erasing=0.7), images)
    stats = []
    for out in (device_out, loader_out):
        erased = out[:, 0] == 0                              # value 0 after normalisation
        rows, cols = erased.any(dim=2), erased.any(dim=1)
        height, width = rows.sum(1), cols.sum(1)
        hit = height > 0
        # The erased pixels form one rectangle, the same on all channels.
        assert torch.equal(erased.sum((1, 2)), height * width)
        assert torch.equal(out == 0, erased[:, None].expand_as(out))
        area = (height * width)[hit].float() / SIDE ** 2
        aspect = (height[hit].float() / width[hit].float()).log()
        stats.append(torch.stack([hit.float().mean(), area.mean(), area.std(), aspect.mean(),
                                  aspect.std()]))
    device_stats, loader_stats = stats
    assert abs(device_stats[0] - 0.7) < 0.04
    # Hit rate, mean and spread of the erased area's share, of its log aspect ratio.
    tolerance = torch.tensor([0.04, 0.01, 0.01, 0.08, 0.05])
    assert ((device_stats - loader_stats).abs() < tolerance).all(), (device_stats, loader_stats)


def test_pixel_erasing_fills_with_unit_normal_noise_on_both_paths():
    # CLIP-ReID's timm RandomErasing(mode='pixel'): N(0, 1) per pixel in normalised space.
    images = torch.full((400, 3, SIDE, SIDE), 128, dtype=torch.uint8)
    for out in both_paths(settings(erasing=0.5, fill="pixel"), images):
        out = out / 255
        erased = out != 128 / 255
        assert 0.4 < erased.flatten(1).any(1).float().mean() < 0.6
        noise = out[erased]
        assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1.0) < 0.02


def test_normalisation_matches_the_eval_transform(make_config):
    config = make_config(aug_hflip=0.0, aug_pad=0, aug_random_erasing=0.0,
                         augment_on="device")
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    out = device_augment(config)(images, torch.Generator())
    spec_transform = eval_transform(preprocess_spec(config))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.stack([spec_transform(x) for x in images]), atol=1e-5)


def test_same_generator_seed_same_batch():
    augment = DeviceAugment(settings(hflip=0.5, pad=PAD, jitter=0.3, erasing=0.5), IDENTITY)
    images = torch.randint(0, 256, (16, 3, SIDE, SIDE), dtype=torch.uint8)

    def run(seed):
        generator = torch.Generator()
        generator.manual_seed(seed)
        return augment(images, generator), augment(images, generator)

    first, second = run(7)
    assert torch.equal(torch.stack((first, second)), torch.stack(run(7)))
    assert not torch.equal(first, second)           # the generator moves on per batch
    assert not torch.equal(first, run(8)[0])
    with pytest.raises(ValueError, match="uint8 images"):
        augment(images.float(), torch.Generator())


def test_device_mode_loader_hands_over_uint8(make_config):
    config = make_config(batch_size=8, augment_on="device")
    loader, _, _ = get_train_val_loaders(config)
    assert loader.num_workers == 0                   # cached images: nothing for workers to do
    set_loader_epoch(loader, 0)
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 64, 64)
    batch = device_augment(config)(images, torch.Generator())
    assert batch.dtype == torch.float32 and batch.shape == images.shape
    assert device_augment(make_config(augment_on="loader")) is None
    # Without the cache the workers decode, and still hand over uint8.
    loader, _, _ = get_train_val_loaders(make_config(batch_size=8, augment_on="device",
                                                     cache_images=False, num_workers=1))
    assert loader.num_workers == 1 and next(iter(loader))[0].dtype == torch.uint8
