"""The Alertmanager webhook payload (version 4) as the webhook accepts it. Pure: pydantic models only.

Alertmanager docs, "webhook_config"; prometheus/alertmanager notify/webhook.
"""

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

PAYLOAD_VERSION = "4"


class AlertStatus(StrEnum):
    """An alert's (or a group's) state as Alertmanager reports it."""

    FIRING = "firing"
    RESOLVED = "resolved"


class _Payload(BaseModel):
    # Alertmanager adds fields over time (truncatedAlerts, routeLabels, notification_reason, ...):
    # ignore what we do not use rather than answer 400 and lose the notification.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class AlertmanagerAlert(_Payload):
    """One alert of a webhook notification."""

    status: AlertStatus
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: datetime = Field(alias="startsAt")
    ends_at: datetime | None = Field(default=None, alias="endsAt")
    generator_url: str = Field(default="", alias="generatorURL")
    fingerprint: str = ""

    @property
    def name(self) -> str:
        """The alertname label ("" when missing)."""
        return self.labels.get("alertname", "")


class AlertmanagerPayload(_Payload):
    """A webhook notification (Alertmanager docs, "webhook_config"; payload version 4)."""

    version: str
    group_key: str = Field(alias="groupKey")
    status: AlertStatus
    receiver: str
    group_labels: dict[str, str] = Field(default_factory=dict, alias="groupLabels")
    common_labels: dict[str, str] = Field(default_factory=dict, alias="commonLabels")
    common_annotations: dict[str, str] = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field(default="", alias="externalURL")
    truncated_alerts: int = Field(default=0, alias="truncatedAlerts")
    alerts: list[AlertmanagerAlert]

    @field_validator("version")
    @classmethod
    def _known_version(cls, version: str) -> str:
        if version != PAYLOAD_VERSION:
            raise ValueError(
                f"unsupported webhook payload version {version!r} (expected {PAYLOAD_VERSION!r})"
            )
        return version
