"""The studio's features: each part of the window (a panel, a view, a menu) with what it owns and does."""
