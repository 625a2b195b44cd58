"""Plumbing every stage uses: errors, logs, files written whole, seeds, devices, torch.distributed and torchrun."""
