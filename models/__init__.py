"""PyTorch models, datasets and the training CLI (training and export only; never imported by the service)."""
