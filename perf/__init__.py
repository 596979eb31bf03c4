"""Load tests, benchmarks and query timings for tenantserve; not part of the installed package."""
