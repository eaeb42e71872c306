"""Reusable widgets: forms generated from declared parameters, message bars, layouts, plot files."""
