"""Amazon Web Services: S3 buckets (``s3``, ``s3_xml``) and SQS event queues (``sqs``), both
built by ``client``."""
