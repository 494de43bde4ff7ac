"""Model families (YOLOX today), the model package format and the bundled models."""
