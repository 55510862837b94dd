"""Numbers from a similarity matrix: ranking (CMC, mAP, mINP), verification and open set,
re-ranking, exact counts."""
