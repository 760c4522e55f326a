"""Offline quality evaluation of KV-cache compression methods (`centroidkv eval`).

data.py (offline texts), tasks.py (seeded tasks), model.py (offline model + evaluation
attention), methods.py (methods under one budget), runner.py (the loop), report.py (tables,
plots), cli.py (the command)."""
