"""Tools for lowbit's tests and benchmarks, not for quantizing models: malformed-input generators
(:mod:`lowbit.testing.fuzz`) and synthetic models of real architectures (:mod:`lowbit.testing.synthetic`)."""
