"""unCLIP with PyTorch Lightning + Hydra."""
