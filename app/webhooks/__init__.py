"""Webhooks: signed notifications when a fine-tuning job reaches a terminal status."""
