"""Plumbing every stage uses: errors, logs, files written whole, background work, seeds, devices, torchrun."""
