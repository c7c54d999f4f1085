"""Pipelines join feature extraction and heads into the jobs the CLI runs."""
