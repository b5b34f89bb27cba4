"""Plain-Python twins of the guest kernels, shipped so benchmarks and other implementations can
check against them."""
