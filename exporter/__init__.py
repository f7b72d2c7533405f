"""nvml-exporter: NVIDIA GPU health for Prometheus, read straight from NVML."""

__version__ = "0.1.0"
