"""The re-identification protocol over the splits and what it reports: feature encoding, the
results files and plots, intervals and paired comparisons."""
