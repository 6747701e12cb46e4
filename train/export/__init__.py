"""Export trained models into a Triton-style model repository (config.yaml + ONNX + card)."""
