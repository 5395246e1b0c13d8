"""Kedro hooks of the project."""

from __future__ import annotations

import os

from kedro.framework.hooks import hook_impl

#: Environment variables that switch off usage telemetry of Kedro, DVC and Great Expectations.
TELEMETRY_OFF = {
    "KEDRO_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
}


class TelemetryOffHooks:
    """Make sure no run of the project sends usage telemetry (Kedro, DVC, GX)."""

    @hook_impl
    def after_context_created(self, context) -> None:  # noqa: ARG002 (hook signature)
        for key, value in TELEMETRY_OFF.items():
            os.environ.setdefault(key, value)
