"""Input data that works offline: only images and data sets shipped inside installed packages."""
