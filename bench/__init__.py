"""Overhead benchmark of the bridge: the same load DIRECT to a fake LLM and THROUGH broker + connector.

Run ``python -m bench`` (about 3 minutes) or ``python -m bench --quick`` (about 1 minute).
"""
