"""Every failure a user can meet: one `ResDxError` base with a short code and what to do.

The CLI prints ``error [code]: message`` and the hint, without a traceback (``--debug`` shows
it). `RejectedCase` ends one case, never the run: its text reaches `index.csv`, so it never
holds PHI (no names, UIDs, dates or paths).
"""

from __future__ import annotations


class ResDxError(Exception):
    """A failure with a machine-readable `code`, a `message` and a `hint` that says what to do."""

    code = "error"
    hint = ""

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message


class RejectedCase(ResDxError):
    """One case that cannot be used: a reason code and a PHI-free sentence."""

    code = "rejected"
    hint = "see the reason; the other cases go on"

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}", code=code)
        self.reason = reason


def unexpected_reason(err: BaseException, doing: str, case_id: str = "") -> str:
    """The reason text for an unexpected failure of one case: a fixed sentence with the error type only.

    The library's own message can quote a file's path or header values (PHI); it goes to the
    ``pipeline`` debug log on this machine (``resdx --debug``), never to an output.
    """
    import logging

    logging.getLogger("pipeline").debug("case %s: %s failed", case_id or "?", doing, exc_info=err)
    return f"{type(err).__name__} while {doing} (an error in ResDx or a library; `resdx --debug` logs it)"


# Failures of a whole command, each its own class (callers catch it by name): base, code, what to do.
_KINDS: dict[str, tuple[type, str, str]] = {
    "ConfigError": (ValueError, "bad_params", "fix the named key in configs/params.yaml (or the -S override)"),
    "ManifestError": (ValueError, "bad_manifest", "the manifest needs case_id, patient_id, modality, path, label"),
    "IngestFailed": (RuntimeError, "ingest_failed", "read the reasons in index.csv; fix the inputs or raise "
                     "ingest.max_rejected_fraction"),
    "MissingInput": (FileNotFoundError, "missing_input", "run the earlier stages first (dvc repro)"),
    "PlanError": (ValueError, "bad_plan", "re-run the ingest stage so that plan.json is written by this version"),
    "RegistryError": (ValueError, "registry", "check register.model_name, the version and mlflow.tracking_uri"),
    "EngineError": (RuntimeError, "engine", "install the Ray extra (pip install 'resdx[ray]') and check "
                    "ingest.ray_address / --ray-address (`ray status` on the head node)"),
    # `resdx review import` and the stored verdict tables; each refusal sets its own code (review_*).
    "ReviewError": (ValueError, "bad_review", "export the verdicts again from the current report "
                    "(reports/explain/report.html) and import that file"),
}
ConfigError, ManifestError, IngestFailed, MissingInput, PlanError, RegistryError, EngineError, ReviewError = (
    type(name, (ResDxError, base), {"code": code, "hint": hint, "__module__": __name__, "__doc__": hint})
    for name, (base, code, hint) in _KINDS.items())


# The error classes (tests/test_config_cli.py checks each has a code and a hint); `unexpected_reason` is
# imported by name.
__all__ = ["ResDxError", "RejectedCase", "ConfigError", "ManifestError", "IngestFailed", "MissingInput",
           "PlanError", "RegistryError", "EngineError", "ReviewError"]
