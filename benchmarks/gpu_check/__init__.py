"""The prepared GPU check: `python -m benchmarks.gpu_check --out DIR` (`make gpu-check OUT=DIR`)."""
