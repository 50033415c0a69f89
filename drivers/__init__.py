"""Instrument bindings: which ophyd devices set which campaign parameters, and Bluesky plans to run them."""
