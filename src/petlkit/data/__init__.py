"""Data sets: readers for real files, and here-scale tasks that install from packages."""
