"""Evidence for casework: scores to calibrated, bounded likelihood ratios."""
