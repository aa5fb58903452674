"""Calibration methods that choose better codes (GPTQ, AWQ, ...): see the open issues."""
