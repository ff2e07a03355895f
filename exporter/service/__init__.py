"""The aiohttp service: app, refresh loop, /metrics, the Alertmanager webhook."""
