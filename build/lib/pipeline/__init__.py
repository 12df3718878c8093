"""pipeline: download folders of image-URL lists with threads, transform them in a process pool."""

__version__ = "0.1.0"
