"""Simulated instruments built from ophyd simulation devices, usable from a campaign by import path."""
