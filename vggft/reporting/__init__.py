"""Numbers and pictures: metrics, text tables and every plot."""
