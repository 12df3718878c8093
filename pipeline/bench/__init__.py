"""What exists to measure, demonstrate and test the pipeline, kept apart from the product.

server     a static file server on 127.0.0.1 (the demo, the tests)
faults     the same server with routes that misbehave (the fault tests and benchmark)
workload   photo-like JPEGs, and a keep-alive server of several processes for them
baselines  the simple designs the pipeline is compared with (sequential, threads, ...)
sweep      ``pipeline bench``: sweep worker counts, compare strategies, keep the best
demo       ``pipeline demo``: serve the sample images and run the pipeline on them

and, each run as ``python -m pipeline.bench.NAME``: hostile (slow and broken servers), deadhosts
(refusing hosts), buffered (memory against slow large bodies), readback (reading outputs back),
interrupt (Ctrl-C to exit), transform_modes (CPU per image of a few chains)
"""
