"""A gallery outside the protocol: top-k search in bounded memory, the persistent gallery
index, features files and the search feature cache."""
