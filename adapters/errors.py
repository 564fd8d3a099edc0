"""Why an adapter or its source was refused: one class per stable code (docs/adapters.md).

Everything derives from `server.errors.LoraplexError`, so the admin API renders these as the usual
OpenAI error JSON and the registry can store `error_code` + `message` on a rejected version.
"""

from __future__ import annotations

from server.errors import LoraplexError


class AdapterRejected(LoraplexError):
    """The adapter's files are not something the served engine may load (validation)."""

    status = 422
    code = "adapter_rejected"
    type = "invalid_request_error"


class AdapterPickleRefused(AdapterRejected):
    code = "adapter_pickle_refused"


class AdapterConfigMissing(AdapterRejected):
    code = "adapter_config_missing"


class AdapterConfigInvalid(AdapterRejected):
    code = "adapter_config_invalid"


class AdapterNotLora(AdapterRejected):
    code = "adapter_not_lora"


class AdapterFeatureUnsupported(AdapterRejected):
    """A peft feature vLLM refuses (DoRA, LoRA bias, PiSSA-style init, modules_to_save, ...)."""

    code = "adapter_feature_unsupported"


class AdapterWeightsMissing(AdapterRejected):
    code = "adapter_weights_missing"


class AdapterHeaderCorrupt(AdapterRejected):
    code = "adapter_header_corrupt"


class AdapterRankTooHigh(AdapterRejected):
    code = "adapter_rank_too_high"


class AdapterTargetUnsupported(AdapterRejected):
    code = "adapter_target_unsupported"


class AdapterShapeMismatch(AdapterRejected):
    code = "adapter_shape_mismatch"


class AdapterBaseMismatch(AdapterRejected):
    code = "adapter_base_mismatch"


class AdapterBaseUnknown(AdapterRejected):
    code = "adapter_base_unknown"


class AdapterTooLarge(AdapterRejected):
    status = 413
    code = "adapter_too_large"


class BaseModelInvalid(LoraplexError):
    """The served base model directory cannot be identified (a deployment error)."""

    status = 500
    code = "base_model_invalid"
    type = "server_error"


class SourceError(LoraplexError):
    """Fetching or unpacking an adapter source failed (catch this for every source failure)."""

    status = 422
    code = "source_error"
    type = "invalid_request_error"


class SourceInvalid(SourceError):
    """The URI itself is unusable: unknown scheme, relative path, malformed."""

    status = 400
    code = "source_invalid"


class SourceNotFound(SourceError):
    """The URI is well formed but names nothing (HTTP 404, NoSuchKey, empty prefix, no path)."""

    code = "source_not_found"


class SourceDenied(SourceError):
    """The store refused our credentials, or a local path lies outside the allowed roots."""

    code = "source_denied"


class SourceUnreachable(SourceError):
    """Network failure, timeout or a 5xx from the store: an upstream failure, retry later."""

    status = 502
    code = "source_unreachable"
    type = "server_error"


class ArchiveInvalid(SourceError):
    code = "archive_invalid"


class ArchiveUnsafe(SourceError):
    code = "archive_unsafe"


class ArchiveTooLarge(SourceError):
    status = 413
    code = "archive_too_large"


REJECTIONS: tuple[type[AdapterRejected], ...] = (
    AdapterPickleRefused,
    AdapterConfigMissing,
    AdapterConfigInvalid,
    AdapterNotLora,
    AdapterFeatureUnsupported,
    AdapterWeightsMissing,
    AdapterHeaderCorrupt,
    AdapterRankTooHigh,
    AdapterTargetUnsupported,
    AdapterShapeMismatch,
    AdapterBaseMismatch,
    AdapterBaseUnknown,
    AdapterTooLarge,
)
SOURCE_ERRORS: tuple[type[SourceError], ...] = (
    SourceInvalid,
    SourceNotFound,
    SourceDenied,
    SourceUnreachable,
    ArchiveInvalid,
    ArchiveUnsafe,
    ArchiveTooLarge,
)
