"""The dev and course layer: embedded brokers, the playground, the benchmark, the fuzzer.

Not the framework: ``import nestpy_mini`` never loads this package, and
nothing in the framework imports it.  It imports the framework, and it is
the only place where processes are started.
"""
