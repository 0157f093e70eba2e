"""Helpers shared by the benchmarks and the kernel lab; training never imports them."""
