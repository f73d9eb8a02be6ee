"""Reusable views shared by the panels."""
