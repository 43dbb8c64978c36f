"""Device profiles and the memory/cost simulator: does a training run fit a device, and what would backprop need."""
