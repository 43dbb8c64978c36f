"""Float reference models (torch) and their export to ONNX, the format the integer engine consumes."""
