"""Google Cloud: Cloud Storage buckets (``gcs``)."""
