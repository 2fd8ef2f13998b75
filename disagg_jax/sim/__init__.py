"""Simulation and planning: step-time profiles and a discrete-event replay of the schedulers."""
