"""The checkpoint format a training run hands to evaluation, search and export, and the
conversions of first-release files."""
