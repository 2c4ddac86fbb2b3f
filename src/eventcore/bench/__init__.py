"""`eventcore bench`: the reference report's workloads run against a real store, and its tables.

workloads (the bank and shop commands and events the workloads run), runner (runs a workload and
measures it; `BenchStore` opens the store a run asks for), report (the tables).
"""
