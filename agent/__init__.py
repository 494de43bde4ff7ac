"""The edge agent: its CLI today; the daemon (pipelines, MQTT link, OTA) as it lands."""

__version__ = "0.1.0"
