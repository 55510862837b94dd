"""The network: the CLIP backbone, the identity heads every method shares, losses."""
