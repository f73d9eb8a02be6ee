"""Unit Scaling Explorer's Qt program. Imports unitscale_core, never the reverse."""
