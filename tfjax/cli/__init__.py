"""Thin command-line entry points: parse flags, load the config, call one function."""
