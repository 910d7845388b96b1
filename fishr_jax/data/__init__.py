"""Datasets split into domains."""
