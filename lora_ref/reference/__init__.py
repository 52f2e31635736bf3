"""Reference outputs: the reference vectors, their standalone checker, and a PyTorch twin of the model for the benchmarks."""
