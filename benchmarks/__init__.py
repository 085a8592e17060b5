"""Benchmarks that drive any CRI endpoint (pouchd, containerd, CRI-O) through a client.

Run each one as a module from the repository root, e.g.
``python -m benchmarks.rpc_latency --endpoint unix:///run/pouch/pouch.sock``.
Shared pieces (statistics, alternation, tables, JSON reports, CRI
connections) live in :mod:`benchmarks._common`; see ``benchmarks/README.md``.
"""
