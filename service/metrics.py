"""attnserve's Prometheus metrics, recorded through Ray Serve's metrics API.

Ray exports them (prefixed `ray_`, with application/deployment/replica labels added) on the
Ray metrics agent's /metrics endpoint beside Serve's own `ray_serve_*` metrics; a plain
prometheus_client registry inside a replica would not be scraped.
"""

from __future__ import annotations

from functools import cache

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
TOKEN_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SHARE_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
NATS_BUCKETS = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0]  # Ray's boundaries are positive
MODEL_TAGS = ("model", "version")


@cache
def request_latency() -> Histogram:
    """End-to-end time in the ingress, by rpc and gRPC status code."""
    return Histogram(
        "attnserve_request_latency_seconds",
        description="Time to answer a request in the attnserve ingress, by rpc and status code.",
        boundaries=LATENCY_BUCKETS_S,
        tag_keys=(*MODEL_TAGS, "rpc", "code"),
    )


@cache
def request_errors() -> Counter:
    """Failed requests by rpc and gRPC status code."""
    return Counter(
        "attnserve_request_errors_total",
        description="Requests answered with a non-OK gRPC status, by rpc and code.",
        tag_keys=(*MODEL_TAGS, "rpc", "code"),
    )


@cache
def queue_wait() -> Histogram:
    """Time a request waited in its model's queue before it joined the running batch."""
    return Histogram(
        "attnserve_queue_wait_seconds",
        description="Time from a request being admitted to its model's engine to its first decoder step.",
        boundaries=LATENCY_BUCKETS_S,
        tag_keys=MODEL_TAGS,
    )


@cache
def batch_size() -> Histogram:
    """Decoder rows per step of the running batch."""
    return Histogram(
        "attnserve_batch_size",
        description="Decoder rows (requests, beams counted) in the running batch at each decoder step.",
        boundaries=BATCH_BUCKETS,
        tag_keys=MODEL_TAGS,
    )


@cache
def decode_latency() -> Histogram:
    """Time of one decoder step."""
    return Histogram(
        "attnserve_batch_decode_seconds",
        description="Time of one decoder step of the running batch (encoding requests joining it included).",
        boundaries=LATENCY_BUCKETS_S,
        tag_keys=MODEL_TAGS,
    )


@cache
def output_tokens() -> Counter:
    """Output tokens produced."""
    return Counter(
        "attnserve_output_tokens_total",
        description="Output tokens generated.",
        tag_keys=MODEL_TAGS,
    )


@cache
def execution_provider() -> Gauge:
    """1 for each ONNX Runtime execution provider a model replica really uses."""
    return Gauge(
        "attnserve_execution_provider_info",
        description="ONNX Runtime execution providers in use by a model replica (value 1).",
        tag_keys=(*MODEL_TAGS, "provider"),
    )


@cache
def queue_depth() -> Gauge:
    """Requests waiting in a model's queue."""
    return Gauge(
        "attnserve_queue_depth",
        description="Requests waiting in the model's engine queue (sampled when requests join the batch).",
        tag_keys=MODEL_TAGS,
    )


@cache
def rejections() -> Counter:
    """Requests refused at admission, by reason."""
    return Counter(
        "attnserve_rejections_total",
        description="Requests refused before queueing: queue_full, queue_wait, deadline, shutting_down.",
        tag_keys=(*MODEL_TAGS, "reason"),
    )


@cache
def drops() -> Counter:
    """Queued requests dropped without decoding, by reason."""
    return Counter(
        "attnserve_dropped_total",
        description="Queued requests dropped without decoding: deadline (passed or unmeetable), cancelled.",
        tag_keys=(*MODEL_TAGS, "reason"),
    )


@cache
def auth_failures() -> Counter:
    """Calls refused for want of a valid token, by reason (never the token)."""
    return Counter(
        "attnserve_auth_failures_total",
        description="Calls answered UNAUTHENTICATED, by rpc and reason: missing, malformed, unknown.",
        tag_keys=("rpc", "reason"),
    )


@cache
def attention_entropy() -> Histogram:
    """Per answer: mean entropy of its attention rows over log(source tokens), 0 sharp to 1 uniform."""
    return Histogram(
        "attnserve_attention_entropy",
        description="Per answer, the mean entropy of its cross-attention rows over log(source tokens): "
        "0 attends to one source token, 1 spreads evenly.",
        boundaries=SHARE_BUCKETS,
        tag_keys=MODEL_TAGS,
    )


@cache
def source_coverage() -> Histogram:
    """Per answer: the share of source tokens its output attends to."""
    return Histogram(
        "attnserve_source_coverage",
        description="Per answer, the share of source tokens whose attention summed over the output "
        "is 0.5 or more.",
        boundaries=SHARE_BUCKETS,
        tag_keys=MODEL_TAGS,
    )


@cache
def token_nll() -> Histogram:
    """Per scored answer: the mean negative log-probability of its output tokens, in nats."""
    return Histogram(
        "attnserve_token_nll",
        description="Per scored answer (asked for, or sampled by quality_sample), the mean negative "
        "natural-log probability of its output tokens (0 is certain; higher is less likely).",
        boundaries=NATS_BUCKETS,
        tag_keys=MODEL_TAGS,
    )
