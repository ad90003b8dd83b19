"""Data sources (images, videos, embedded default data) shared by every task."""
