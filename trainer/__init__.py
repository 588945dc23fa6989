"""ultramesh's trainer: a Hydra-configured PyTorch Lightning trainer over N-D device meshes."""
