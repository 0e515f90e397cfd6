"""Sections of a page that have grown into their own module: each draws one part of a page, called by that page."""
