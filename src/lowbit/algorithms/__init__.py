"""Calibration methods that choose better codes (importance matrices, GPTQ, AWQ, ...)."""
