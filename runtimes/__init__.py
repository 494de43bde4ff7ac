"""Model runtimes: one `Runtime` interface and its TFLite and ONNX Runtime backends."""
