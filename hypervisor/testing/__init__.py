"""Plain-Python twins of the hypervisor kernels, shipped so benchmarks and other
implementations can check against them."""
