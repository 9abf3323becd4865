"""A local V7 API held to docs/v7-contract.md: for tests, the demo, benchmarks and dry runs."""
