"""S3 event notifications from an SQS queue, read with aiobotocore.

``worker.events = "sqs"``: S3 event notifications (``Records[]``, or the same JSON inside an SNS
envelope) in the SQS queue whose URL is ``worker.events_queue``, long-polled (up to 10 messages
per call) and parsed by ``ingest.providers.events.parse_s3_message``. The region comes from the
queue URL when it names one, else ``source.region``; credentials as for the S3 source (the AWS
default chain or ``source.profile``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Sequence
from typing import Any
from urllib.parse import urlparse

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
)

from ingest.config import Config
from ingest.errors import AccessDenied, SourceError, SourceRetryable
from ingest.log import without_userinfo
from ingest.providers import Delivery
from ingest.providers.aws.client import AwsClient, ClientSpec, credentials_problem
from ingest.providers.events import (
    CALL_BUDGET_S,
    CONNECT_TIMEOUT_S,
    LONGEST_POLL_S,
    READ_TIMEOUT_S,
    RETRIES,
    VISIBILITY_TIMEOUT_S,
    bounded,
    log,
    parse_s3_message,
)

SQS_MAX_MESSAGES = 10  # per ReceiveMessage / DeleteMessageBatch call
SQS_MAX_WAIT_S = LONGEST_POLL_S  # longest long poll SQS allows

_SQS_REGION = re.compile(
    r"^(?:sqs\.([a-z0-9-]+)\.amazonaws\.com|([a-z0-9-]+)\.queue\.amazonaws\.com)"
)


class SqsEventSource:
    """S3 event notifications from an SQS queue (``worker.events_queue`` is the queue URL)."""

    def __init__(
        self,
        cfg: Config,
        *,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        visibility_timeout_s: int = VISIBILITY_TIMEOUT_S,
        retries: int = RETRIES,
    ) -> None:
        self.queue_url = cfg.worker.events_queue
        self.bucket = cfg.source.bucket
        self.prefix = cfg.source.prefix
        self.endpoint_url = cfg.worker.events_endpoint_url
        self.profile = cfg.source.profile
        region = cfg.source.region
        if not self.endpoint_url:
            m = _SQS_REGION.match(urlparse(self.queue_url).hostname or "")
            if m:
                region = m.group(1) or m.group(2)
        self.region = region
        self.visibility_timeout_s = visibility_timeout_s
        self.retries = retries
        self._client = AwsClient(
            ClientSpec(
                "sqs",
                connect_timeout_s=CONNECT_TIMEOUT_S,
                read_timeout_s=READ_TIMEOUT_S,
                max_attempts=1 + retries,
                region=region,
                profile=self.profile,
                endpoint_url=self.endpoint_url,
                access_key_id=aws_access_key_id,
                secret_access_key=aws_secret_access_key,
            )
        )

    async def _sqs(self) -> Any:
        return await self._client.get()

    async def close(self) -> None:
        await self._client.close()

    def _map(self, e: BaseException, what: str) -> SourceError:
        where = f"SQS queue '{without_userinfo(self.queue_url)}'"
        if isinstance(e, TimeoutError):
            return SourceRetryable(f"{what} {where}: no answer in time")
        problem = credentials_problem(e, self.profile)
        if problem is not None:
            return AccessDenied(f"{what} {where}: {problem}")
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if "NonExistentQueue" in code or code.endswith("QueueDoesNotExist"):
                return SourceError(f"{where} does not exist: check worker.events_queue")
            if status == 403 or code in (
                "AccessDenied",
                "InvalidClientTokenId",
                "KMS.AccessDenied",
            ):
                return AccessDenied(
                    f"access denied to {where} ({code or status}): the credentials need "
                    "sqs:ReceiveMessage and sqs:DeleteMessage"
                )
            return SourceRetryable(f"{what} {where}: SQS error {code or status}")
        return SourceRetryable(f"{what} {where}: cannot reach SQS ({type(e).__name__})")

    async def _call(self, what: str, aw: Awaitable[Any], budget_s: float) -> Any:
        try:
            return await bounded(aw, budget_s)
        except (ClientError, BotoCoreError, TimeoutError) as e:
            raise self._map(e, what) from None

    async def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        out: list[Delivery] = []
        if max_messages < 1:
            return out
        sqs = await self._sqs()
        wait = min(SQS_MAX_WAIT_S, max(0, math.ceil(wait_s)))
        while len(out) < max_messages:
            n = min(SQS_MAX_MESSAGES, max_messages - len(out))
            try:
                resp = await self._call(
                    "receive from",
                    sqs.receive_message(
                        QueueUrl=self.queue_url,
                        MaxNumberOfMessages=n,
                        WaitTimeSeconds=wait,
                        VisibilityTimeout=self.visibility_timeout_s,
                    ),
                    wait + CALL_BUDGET_S,
                )
            except SourceError as e:
                if not out:
                    raise
                # What was received is delivered; the next receive will meet the error again.
                log.warning("%s (after %d messages)", e, len(out))
                break
            messages = resp.get("Messages", [])
            for m in messages:
                events = parse_s3_message(
                    str(m.get("Body", "")),
                    self.bucket,
                    self.prefix,
                    message_id=m.get("MessageId", ""),
                )
                out.append(Delivery(events, str(m["ReceiptHandle"])))
            if len(messages) < n:
                break
            wait = 0  # the queue has more: take it without waiting
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        sqs = await self._sqs()
        failed: list[str] = []
        for i in range(0, len(deliveries), SQS_MAX_MESSAGES):
            chunk = deliveries[i : i + SQS_MAX_MESSAGES]
            entries = [{"Id": str(j), "ReceiptHandle": str(d.receipt)} for j, d in enumerate(chunk)]
            resp = await self._call(
                "delete from",
                sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries),
                CALL_BUDGET_S,
            )
            failed += [str(f.get("Code", "?")) for f in resp.get("Failed", [])]
        if failed:
            # Typically an expired receipt (the message became visible again): it will be
            # delivered again, which at-least-once allows.
            log.warning(
                "%d event messages not deleted from SQS queue '%s' (%s): they will be "
                "delivered again",
                len(failed),
                self.queue_url,
                ", ".join(sorted(set(failed))),
            )
