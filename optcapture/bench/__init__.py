"""``python -m optcapture.bench``: optcapture side by side with eager, fused and stock torch.compile.

Every method steps the same optimizer over the same params and grads in one process; the table
reports steady step time (CUDA events around 30 steps in a row, as in
the baseline), host time per call, first-call time, kernels per step, peak memory over eager,
the fraction of the bandwidth floor reached, and whether the method's params agree with eager's.
"""
