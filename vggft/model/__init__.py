"""Networks and the files that hold them: build, safe loading, pretrained and trained weights, checkpoints,
inference, export."""
