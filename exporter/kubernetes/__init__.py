"""Kubernetes: API calls, Job and CronJob manifests, discovery, the variants."""
