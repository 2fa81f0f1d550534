"""s2match: cross-season keypoint matching and co-registration for Sentinel-2 scenes."""
