"""Workflows: the operations the CLI, the app and the tests share (one code path each).

Each takes a caller-owned session and never commits.
"""
