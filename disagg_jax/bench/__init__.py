"""Benchmarking: workloads, arrival processes, vLLM-compatible metrics, reports and plots."""
