"""YOLOX: letterbox preprocess, head decode + NMS, and the detector that joins them."""
