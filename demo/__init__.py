"""The embedded demo model: its procedural dataset, its training, its quality scorer and the chapter's experiments."""
