"""Cheap parsing of S3 ListObjectsV2 pages, plugged into botocore's own pipeline.

botocore turns a 1,000-key page into a dict by walking its XML tree against the service
model, one generic call per element (``_parse_shape`` → ``_handle_structure`` → …), and S3's
"200 with an error inside" check parses every body a second time. That was ~80 % of the
source's listing CPU. Everything else botocore does for a listing stays as it is: credentials,
region and endpoint resolution, SigV4, the HTTP pool, retries, headers, ``ResponseMetadata``
and the after-call handlers (the URL-decoding of keys for ``EncodingType=url``).

:func:`install` hooks :func:`fast_list_handler` into botocore's ``before-parse`` event for
ListObjectsV2, ahead of botocore's "200 with an error" check (see there). When the body is a
well-formed ``ListBucketResult`` of the shape below, it parses it with the same XML parser
botocore uses (expat through ElementTree: entities, character references, CDATA, line-end
normalisation and namespaces come out exactly as botocore's), walks the tree once with fixed
tag names, hands the payload over in ``customized_response_dict`` and empties
the body, so botocore's parser only does the headers and the response metadata. In every other
case (a status other than 200, an ``<Error>`` root, a truncated or malformed body, an element
or a value this walker does not know) it returns without touching anything: botocore parses
the page, maps the error and retries exactly as it did before this module existed.

The dict is the one botocore builds for these members: ``Contents`` (``Key``,
``LastModified`` as an aware datetime, ``ETag``, ``Size``, ``StorageClass``,
``ChecksumAlgorithm``, ``ChecksumType``), ``CommonPrefixes``, ``IsTruncated``, ``KeyCount``,
``MaxKeys``, ``Name``, ``Prefix``, ``Delimiter``, ``EncodingType``, ``ContinuationToken``,
``NextContinuationToken``, ``StartAfter``. ``tests/test_s3_listing.py`` compares both parsers.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any
from xml.etree.ElementTree import Element, ParseError, TreeBuilder, XMLParser

from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

OPERATION = "ListObjectsV2"
EVENT = f"before-parse.s3.{OPERATION}"
WILDCARD_EVENT = "before-parse.s3.*"

# Top-level members: XML name -> kind. Members of the shape not listed here (none S3 sends
# for ListObjectsV2 without FetchOwner/OptionalObjectAttributes) make the page fall back.
_STRING, _INT, _BOOL, _CONTENTS, _PREFIXES = range(5)
_TOP = {
    "Name": _STRING,
    "Prefix": _STRING,
    "Delimiter": _STRING,
    "EncodingType": _STRING,
    "ContinuationToken": _STRING,
    "NextContinuationToken": _STRING,
    "StartAfter": _STRING,
    "MaxKeys": _INT,
    "KeyCount": _INT,
    "IsTruncated": _BOOL,
    "Contents": _CONTENTS,
    "CommonPrefixes": _PREFIXES,
}
# Members of the output shape the walker does not build: seen at the top level, they make the
# page fall back to botocore (which would parse them) instead of being dropped.
_TOP_UNSUPPORTED = {"RequestCharged"}
_OBJECT_STRINGS = ("Key", "ETag", "StorageClass", "ChecksumType")
_TIMESTAMP_CACHE_MAX = 4096


class _Unsupported(Exception):
    """The page holds something the fast walker does not build: botocore parses it."""


def fast_timestamp(value: Any) -> datetime:
    """botocore's timestamp parser, with a fast path for S3's ISO 8601 strings."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                return parsed
    result: datetime = DEFAULT_TIMESTAMP_PARSER(value)
    return result


# Objects written together share their LastModified text; a datetime is immutable, so one
# parsed value can be handed out again. Bounded: cleared when full.
_timestamps: dict[str, datetime] = {}


def _timestamp(text: str) -> datetime:
    ts = _timestamps.get(text)
    if ts is None:
        ts = fast_timestamp(text)  # ValueError: botocore's parser raises the same on this page
        if len(_timestamps) >= _TIMESTAMP_CACHE_MAX:
            _timestamps.clear()
        _timestamps[text] = ts
    return ts


def _dom(body: bytes) -> Element:
    # What botocore's BaseXMLResponseParser._parse_xml_string_to_dom does, minus its wrapping.
    parser = XMLParser(target=TreeBuilder(), encoding="utf-8")
    parser.feed(body)
    return parser.close()


def _strip(tag: str) -> str:
    return tag.rpartition("}")[2]


def parse_list_objects_v2(body: bytes) -> dict[str, Any] | None:
    """The payload members botocore would parse from a ListObjectsV2 body, or None when the
    body is not a plain ListBucketResult (error documents, malformed XML, unknown members)."""
    if not body:
        return None
    try:
        root = _dom(body)
    except ParseError:
        return None
    tag = root.tag
    ns = tag[: tag.index("}") + 1] if tag.startswith("{") else ""
    if tag[len(ns) :] != "ListBucketResult":
        return None
    try:
        return _walk(root, ns)
    except (_Unsupported, ValueError, TypeError):
        return None


def _walk(root: Element, ns: str) -> dict[str, Any]:
    top = {ns + name: (name, kind) for name, kind in _TOP.items()}
    c_key, c_mod, c_etag, c_size = ns + "Key", ns + "LastModified", ns + "ETag", ns + "Size"
    c_class, c_algo, c_ctype = ns + "StorageClass", ns + "ChecksumAlgorithm", ns + "ChecksumType"
    p_prefix = ns + "Prefix"
    timestamp = _timestamp
    out: dict[str, Any] = {}
    contents: list[dict[str, Any]] = []
    prefixes: list[dict[str, Any]] = []
    for node in root:
        member = top.get(node.tag)
        if member is None:
            if not isinstance(node.tag, str):  # a comment or processing instruction
                continue
            name = _strip(node.tag)
            if name in _TOP or name in _TOP_UNSUPPORTED:
                raise _Unsupported(name)  # a known member in another namespace
            continue  # botocore ignores elements outside the shape
        name, kind = member
        if kind == _CONTENTS:
            obj: dict[str, Any] = {}
            for child in node:
                ctag = child.tag
                text = child.text or ""
                if ctag == c_key:
                    if "Key" in obj:
                        raise _Unsupported("Key")
                    obj["Key"] = text
                elif ctag == c_mod:
                    if "LastModified" in obj:
                        raise _Unsupported("LastModified")
                    obj["LastModified"] = timestamp(text)
                elif ctag == c_etag:
                    if "ETag" in obj:
                        raise _Unsupported("ETag")
                    obj["ETag"] = text
                elif ctag == c_size:
                    if "Size" in obj:
                        raise _Unsupported("Size")
                    obj["Size"] = int(text)
                elif ctag in (c_class, c_ctype):
                    field = _strip(ctag)
                    if field in obj:
                        raise _Unsupported(field)
                    obj[field] = text
                elif ctag == c_algo:
                    obj.setdefault("ChecksumAlgorithm", []).append(text)
                else:
                    raise _Unsupported(str(ctag))  # Owner, RestoreStatus, anything new
            if "Key" not in obj:
                raise _Unsupported("Contents without Key")
            contents.append(obj)
        elif kind == _PREFIXES:
            found = [child for child in node if child.tag == p_prefix]
            if len(found) != 1 or len(node) != 1:
                raise _Unsupported("CommonPrefixes")
            prefixes.append({"Prefix": found[0].text or ""})
        else:
            if name in out:
                raise _Unsupported(name)  # repeated scalar: botocore makes a list of it
            if len(node):
                raise _Unsupported(name)  # a scalar with children
            text = node.text or ""
            if kind == _STRING:
                out[name] = text
            elif kind == _INT:
                out[name] = int(text)
            else:
                out[name] = text == "true"
    if contents:
        out["Contents"] = contents
    if prefixes:
        out["CommonPrefixes"] = prefixes
    return out


def fast_list_handler(
    response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **kwargs: Any
) -> bool:
    """Parse a plain 200 ListObjectsV2 page into ``customized_response_dict`` and empty the body
    (botocore's parser then only does headers and metadata). False: nothing was touched."""
    if response_dict.get("status_code") != 200:
        return False
    body = response_dict.get("body")
    if not isinstance(body, bytes):
        return False
    parsed = parse_list_objects_v2(body)
    if parsed is None:
        return False
    customized_response_dict.update(parsed)
    response_dict["body"] = b""
    return True


def install(events: Any) -> None:
    """Plug the fast parser into one client's event emitter (``client.meta.events``, the
    client's own copy: other clients keep botocore's handlers).

    botocore's ``_handle_200_error`` (``before-parse.s3.*``) parses every 200 body to look
    for an ``<Error>`` root and comes before any handler on ``before-parse.s3.ListObjectsV2``
    (the wildcard sorts first at the same depth). So it is replaced on this client by one
    handler that, for ListObjectsV2, tries the fast parse first (a ``ListBucketResult`` is
    exactly the case where that check finds nothing) and calls botocore's check for every
    other page and every other operation. If botocore no longer has that handler, the fast
    parse runs after it on the operation's own event: still correct, one parse more.
    """
    from botocore import handlers

    check = getattr(handlers, "_handle_200_error", None)
    if check is None or not any(
        event == WILDCARD_EVENT and handler is check
        for event, handler, *_ in handlers.BUILTIN_HANDLERS
    ):
        events.register(EVENT, fast_list_handler)
        return

    def before_parse(
        operation_model: Any,
        response_dict: dict[str, Any],
        customized_response_dict: dict[str, Any],
        **kwargs: Any,
    ) -> None:
        if operation_model.name == OPERATION and fast_list_handler(
            response_dict, customized_response_dict
        ):
            return
        check(operation_model=operation_model, response_dict=response_dict, **kwargs)

    events.unregister(WILDCARD_EVENT, check)
    events.register_first(WILDCARD_EVENT, before_parse, unique_id="ingest-fast-list-objects-v2")
