# The etcd-autodefrag image: the service (`serve`, deploy/) and the defrag Jobs it creates
# (exporter/kubernetes/jobs.py), both started as `etcd-autodefrag ...`.
#
#   docker build -t registry.example.com/etcd-autodefrag:0.1.0 . && docker push ...
#
# No official image is published yet: push it to your registry and name it in `images:` of
# deploy/base/kustomization.yaml (docs/install.md). .github/workflows/release.yml builds it for
# linux/amd64 and linux/arm64 on a release tag.
#
# Runs as the numeric non-root user 65532 (the Deployment's and the Jobs' runAsUser; Kubernetes can
# only check runAsNonRoot against a numeric USER) with a read-only root file system: the only
# writable place it needs is /tmp (an emptyDir in the pods), where `defrag` keeps its lock file.

FROM python:3.12-slim-bookworm AS build
# Build in a virtualenv that is copied whole into the final image; pip, wheels and any compiler
# stay in this stage.
RUN python -m venv /opt/etcd-autodefrag
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN /opt/etcd-autodefrag/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/etcd-autodefrag/bin/pip uninstall --yes --quiet pip

FROM python:3.12-slim-bookworm
COPY --from=build /opt/etcd-autodefrag /opt/etcd-autodefrag
ENV PATH=/opt/etcd-autodefrag/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ETCD_AUTODEFRAG_LOCK_DIR=/tmp
USER 65532:65532
EXPOSE 9479
ENTRYPOINT ["etcd-autodefrag"]
CMD ["serve"]
