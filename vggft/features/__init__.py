"""The feature cache: the frozen prefix run once per image, its rows on disk and their fingerprints."""
