"""Microsoft Azure: Blob Storage containers (``blob``) and storage queues (``queue``), both
authenticated by ``auth``."""
