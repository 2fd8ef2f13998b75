"""Scheduling policies shared by the engine and the simulator (no devices, threads or clocks)."""
