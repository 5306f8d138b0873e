"""Compression techniques applied to torch weights: prune, finetune, calibrate, palettize, quantize, and the layer-by-layer and package-precision helpers."""
