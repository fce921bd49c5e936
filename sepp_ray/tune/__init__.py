"""`sepp sweep`: Ray Tune sweeps over thresholds, K, methods and backbones."""
