"""Sellfern Webhooks: delivers domain events from RabbitMQ to customers' HTTPS endpoints."""

__version__ = "0.1.0"
