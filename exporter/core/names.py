"""Kubernetes' name syntax, the one place it is checked. Pure: no I/O.

Cluster names end up in Job names and label values, namespaces and object names in manifests, and
a typo must fail at start-up or on the command line, not at the API server. The rules are
apimachinery's (k8s.io/apimachinery/pkg/util/validation: IsDNS1123Label, IsDNS1123Subdomain):
https://kubernetes.io/docs/concepts/overview/working-with-objects/names/
"""

import re

DNS_LABEL_MAX_CHARS = 63
DNS_SUBDOMAIN_MAX_CHARS = 253

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL = re.compile(rf"{_LABEL}")
_DNS_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")


def is_dns_label(text: str, *, max_chars: int = DNS_LABEL_MAX_CHARS) -> bool:
    """An RFC 1123 label: lowercase letters, digits and '-', alphanumeric at both ends, <= max_chars."""
    return len(text) <= min(max_chars, DNS_LABEL_MAX_CHARS) and _DNS_LABEL.fullmatch(text) is not None


def is_dns_subdomain(text: str, *, max_chars: int = DNS_SUBDOMAIN_MAX_CHARS) -> bool:
    """An RFC 1123 subdomain: dot-separated labels, <= max_chars (object names, DNS domains)."""
    return len(text) <= min(max_chars, DNS_SUBDOMAIN_MAX_CHARS) and _DNS_SUBDOMAIN.fullmatch(text) is not None
