"""Shared utilities every layer may use: sizes as QEMU writes them, log-safe
text, the socket-path policy, the glue to the C helper."""
