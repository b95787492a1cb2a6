"""A trained quantized model as an integer model (QDQ ONNX) and its parity with the simulated
one in onnxruntime."""
