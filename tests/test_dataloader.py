"""Loaders over prepared synthetic 11k: labels, transforms, fast path, failure paths."""
import shutil

import pytest
import torch

from handreid.data.loaders import (decode_image, eval_loader, get_train_val_loaders, list_split,
                              set_loader_epoch)
from handreid.core.config_files import dataset_dir
from handreid.core.errors import UserError


def test_train_val_loaders_use_sorted_identity_names(make_config):
    config = make_config(batch_size=8, augment_on="loader")
    train_loader, val_loader, num_classes = get_train_val_loaders(config)
    classes = train_loader.dataset.classes
    train_names = {name for _, name in list_split(config, "train")}
    assert classes == sorted(train_names) and num_classes == len(classes)
    images, labels = next(iter(train_loader))
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < num_classes
    # val: exactly one image per training identity, same class indices as train.
    val_labels = torch.cat([labels for _, labels in val_loader])
    assert sorted(val_labels.tolist()) == list(range(num_classes))
    for path, label in zip(val_loader.dataset.paths, val_loader.dataset.targets):
        assert classes[label] == path.split("/")[-2]


def test_eval_labels_are_identity_names_with_distractors(make_config):
    config = make_config()
    query = list_split(config, "query0")
    gallery = list_split(config, "gallery0_all")
    query_ids = {name for _, name in query}
    gallery_ids = {name for _, name in gallery}
    assert query_ids <= gallery_ids and len(gallery_ids) > len(query_ids)
    assert all(isinstance(name, str) for name in gallery_ids)
    assert any("__" in name for name in gallery_ids - query_ids)


def test_epoch_order_is_a_function_of_seed_and_epoch(make_config):
    def order(epoch, seed=0):
        loader, _, _ = get_train_val_loaders(make_config(seed=seed, batch_size=4))
        set_loader_epoch(loader, epoch)
        return list(loader.sampler)

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert order(3) != order(3, seed=1)


def test_cached_and_uncached_eval_images_match(make_config):
    config = make_config()
    paths = [path for path, _ in list_split(config, "val")][:6]
    cached = torch.cat([x for x, _ in eval_loader(make_config(cache_images=True), paths)])
    plain = torch.cat([x for x, _ in eval_loader(make_config(cache_images=False), paths)])
    # Images this small are decoded at full size in both paths: identical pixels.
    assert torch.equal(cached, plain)


def test_augmentation_changes_train_images(make_config):
    config = make_config(batch_size=4, aug_random_erasing=1.0, augment_on="loader")
    loader, _, _ = get_train_val_loaders(config)
    image, _ = loader.dataset[0]
    again, _ = loader.dataset[0]
    assert not torch.equal(image, again)


def test_missing_dataset_names_path_and_prepare_command(make_config, tmp_path):
    config = make_config(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"nowhere/train_val_test_split_dorsal_r/train.*"
                                        r"datasets/prepare_11k.py"):
        get_train_val_loaders(config)


def test_corrupt_image_names_the_file(make_config, tmp_path):
    config = make_config()
    copy_root = tmp_path / "data"
    shutil.copytree(dataset_dir(config), copy_root / dataset_dir(config).name)
    config = make_config(data_dir=str(copy_root), cache_images=False)
    victim = list_split(config, "train")[0][0]
    with open(victim, "wb") as handle:
        handle.write(b"not a jpeg")
    loader, _, _ = get_train_val_loaders(config)
    with pytest.raises(UserError, match=f"cannot read image {victim}"):
        list(loader)
    with pytest.raises(UserError, match="cannot read image"):
        decode_image(victim, 64)


def test_draft_decoding_stays_within_tolerance(synthetic_11k_raw, tmp_path):
    """The fast path decodes large JPEGs in draft mode; on a photo-sized image its pixels
    stay within a few levels of the full decode (benchmarks/bench_data_path.py measures
    the same on 1600x1200 images)."""
    from PIL import Image
    source = sorted((synthetic_11k_raw / "Hands").glob("*.jpg"))[0]
    big = tmp_path / "big.jpg"
    with Image.open(source) as image:
        image.resize((1600, 1200), Image.BICUBIC).save(big, quality=90)
    full = decode_image(big, 224).float()
    draft = decode_image(big, 224, draft=True).float()
    difference = (full - draft).abs()
    assert difference.max() <= 12 and difference.mean() <= 1.0
