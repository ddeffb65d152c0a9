"""Per-kind adapters of the conformance runner: ``<kind>.run_case(case, tensors, weights, folder)``."""
