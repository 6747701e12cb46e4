"""Whole-slide images: opening a slide, reading ROIs from it, decoding its JPEG tiles."""
