"""Executors: start a defrag run for a cluster, locally or as a Kubernetes Job."""
