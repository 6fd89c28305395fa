"""Megatron-core integration of AdamPower and GPAS.

Not implemented yet: this package reserves the promised import path. The
design (thin, version-checked, reversible patches applied by `apply()`) is
tracked in the project's Megatron integration issue.
"""
