"""Training: the loop, optimisers, ``fit``, calibration, shared steps and TensorBoard."""
