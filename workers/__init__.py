"""GPU side of moe-tune: kernels, quantizers, reference, timing and the BenchmarkWorker.

Nothing here imports ``tuner``: workers run where the driver's code need not be importable.
"""
