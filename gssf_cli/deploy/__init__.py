"""Deployment: the ONNX exporter, the bundle and its runtime, serving, the faiss index and index folders. All but
the exporter are torch-free."""
