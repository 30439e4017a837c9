"""Base image builds. ``images.manifest`` defines the manifest format the gateway checks images against."""
