"""Model architectures written in ferrum's IR; one file per family. Installed as ``ferrum.models``."""
