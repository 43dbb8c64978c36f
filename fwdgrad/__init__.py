"""Forward-gradient training of integer neural networks on inference-only hardware."""
