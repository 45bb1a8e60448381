"""Figures, one module per area (experiments, diagnostics); every figure comes from saved runs."""
