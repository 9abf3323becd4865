"""The long-lived worker: schedule, object events, health and metrics, graceful shutdown."""
