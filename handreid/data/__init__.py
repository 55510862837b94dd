"""Images to batches: a user's image files, the split protocol, datasets, loaders and
augmentation."""
