"""Talking to etcd: the v3 JSON gateway client, TLS, and observing a cluster."""
