"""GLoRA benchmarks: python -m bench.run [--quick] [--device cpu|cuda]."""
