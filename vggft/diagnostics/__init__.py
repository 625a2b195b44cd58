"""Looking at a trained model: eval, Grad-CAM, near-duplicates, summary and show-batch."""
